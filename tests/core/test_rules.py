"""The takeover rules: presets to the letter of specs/takeover-rules.md, scoring, validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from specthink import TakeoverRules
from specthink.rules import PRESETS

PAPER = TakeoverRules.paper()
WORDS = st.sampled_from(
    ["wait", "Yes", "yeah", "final answer", "confident", "alternatively", "hold on", "another",
     "verify", "think again", "recap", "check", "checking", "so", "the", "x", " ", "\n\n", "."])


def test_paper_preset_has_every_number_and_word_of_the_spec() -> None:
    assert PAPER.delimiter == "\n\n"
    assert PAPER.positive == ("yeah", "yes", "final answer", "confident")
    assert PAPER.negative == ("wait", "alternatively", "hold on", "another")
    assert PAPER.verify == ("verify", "think again", "recap", "check")
    assert PAPER.match == "substring"
    assert (PAPER.probe_tokens, PAPER.n1, PAPER.n2) == (20, 20, 125)
    assert (PAPER.n3, PAPER.n3_step, PAPER.n3_max) == (125, 25, 200)
    assert (PAPER.reflection_threshold, PAPER.threshold_step, PAPER.threshold_max) == (15, 5, 30)
    assert PAPER.intervention_text == "Let me check whether there are some wrong steps:"
    assert PAPER.mode == "reasoning" and PAPER.begin_tokens == 0
    assert PAPER.scope == "all"


def test_instruct_preset_lets_the_target_begin_and_take_every_trigger() -> None:
    instruct = TakeoverRules.paper_instruct()
    assert instruct.mode == "instruct"
    assert instruct.begin_tokens == 100
    assert instruct.n1 == 20


def test_ablation_presets() -> None:
    for threshold in (3, 50):
        fixed = TakeoverRules.fixed_threshold(threshold)
        assert fixed.reflection_threshold == fixed.threshold_max == threshold
        assert fixed.threshold_step == 0
    reduced = TakeoverRules.reduced_keywords()
    assert (reduced.positive, reduced.negative, reduced.verify) == (("yes",), ("wait",),
                                                                     ("verify",))
    assert set(PRESETS) == {"paper", "paper_instruct", "fixed_threshold_3",
                            "fixed_threshold_50", "reduced_keywords"}
    assert TakeoverRules.preset("paper") == PAPER


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="paper_instruct"):
        TakeoverRules.preset("papper")


@pytest.mark.parametrize(("text", "expected"), [
    ("Yes, that is right.", 1),
    ("Wait, that is wrong.", -1),
    ("Let me verify.", -1),
    ("Yes, but wait.", -1),  # a tie with keywords counts as reflection
    ("Yes yes, wait.", 1),
    ("So the sum is 4.", 0),
    ("Checking the sum.", -1),  # substring: "checking" counts as "check"
    ("ANOTHER way", -1),  # lower-cased
])
def test_paper_scoring(text: str, expected: int) -> None:
    assert PAPER.score(text) == expected


def test_word_matching_needs_whole_words() -> None:
    words = TakeoverRules.paper(match="word")
    assert words.score("Checking the sum.") == 0
    assert words.score("Let me check.") == -1
    assert words.score("hold on, a moment") == -1
    assert not words.has_keyword("we check", complete=False)  # may still become "checking"
    assert words.has_keyword("we check", complete=True)
    assert words.has_keyword("we check it", complete=False)


@given(st.lists(WORDS, max_size=12).map(" ".join))
def test_score_is_nonzero_exactly_when_a_keyword_occurs(text: str) -> None:
    for rules in (PAPER, TakeoverRules.paper(match="word")):
        assert (rules.score(text) != 0) == rules.has_keyword(text)


@given(st.lists(WORDS, max_size=12).map(" ".join))
def test_score_follows_the_counts(text: str) -> None:
    positive = PAPER.count(text, PAPER.positive)
    negative = PAPER.count(text, PAPER.negative) + PAPER.count(text, PAPER.verify)
    score = PAPER.score(text)
    assert score in (-1, 0, 1)
    if positive > negative:
        assert score == 1
    elif positive or negative:
        assert score == -1
    else:
        assert score == 0


@given(st.text(max_size=40), st.text(max_size=40))
def test_substring_keywords_never_disappear_when_text_grows(prefix: str, suffix: str) -> None:
    # why early decisions are sound: a keyword seen in a probe stays there
    if PAPER.has_keyword(prefix):
        assert PAPER.has_keyword(prefix + suffix)


def test_verify_words_trigger_rule_2() -> None:
    assert PAPER.has_verify("let me double-check")
    assert not PAPER.has_verify("wait, no")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("n1", 0, "greater than 0"),
    ("n2", -5, "greater than 0"),
    ("probe_tokens", 0, "greater than 0"),
    ("delimiter", "", "at least 1 character"),
    ("threshold_max", 10, "threshold_max \\(10\\) must be >= reflection_threshold \\(15\\)"),
    ("n3_max", 100, "n3_max \\(100\\) must be >= n3 \\(125\\)"),
    ("negative", ("wait", " "), "keywords must be non-empty"),
])
def test_invalid_numbers_get_a_clear_error(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        TakeoverRules.paper(**{field: value})
    assert field in str(caught.value) or "must be" in str(caught.value)


def test_rules_are_frozen_and_copyable() -> None:
    with pytest.raises(ValidationError):
        PAPER.n1 = 5  # type: ignore[misc]
    assert PAPER.model_copy(update={"n1": 5}).n1 == 5


@given(st.lists(st.text(alphabet="ab.|*( ", min_size=1, max_size=4).filter(str.strip),
                min_size=1, max_size=4),
       st.text(alphabet="abAB.|*( x", max_size=30))
def test_substring_keywords_are_literal_text(words: list[str], text: str) -> None:
    # one compiled scan serves every keyword: regex characters in a keyword must stay literal
    rules = TakeoverRules.paper(positive=tuple(words), negative=("wait",), verify=("verify",))
    lowered = text.lower()
    assert rules.has_keyword(text) == any(w in lowered for w in rules.keywords)
