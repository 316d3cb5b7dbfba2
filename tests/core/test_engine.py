"""The engine against in-process scripted models: every rule of specs/takeover-rules.md.

Each scenario is derived by hand from the rules: the scripts say what each model would write,
and the expected text/takeovers follow from the paper preset's numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from specthink import SpeculativeThinker, TakeoverRules
from specthink.errors import BackendConnectionError, ConfigError, TargetFallbackWarning
from specthink.testing.inprocess import ScriptedBackend
from specthink.testing.models import Continuation, Script, ScriptedModel, Tokenizer, assistant_text
from specthink.trace import FallbackEvent, Rule, TakeoverEvent, TextEvent

PairFactory = Callable[..., Any]
"""The ``make_pair`` fixture of conftest.py: the same scenario in-process and over TGI."""

QUESTION = [{"role": "user", "content": "What is x?"}]
TOKENS = Tokenizer()


def first_tokens(text: str, count: int, tokenizer: Tokenizer = TOKENS) -> str:
    return "".join(tokenizer.tokenize(text)[:count])


def pair(small: ScriptedModel | object, target: ScriptedModel | object, *,
         tokenizer: Tokenizer | None = None, **options: object) -> SpeculativeThinker:
    return SpeculativeThinker(
        small=ScriptedBackend(small, tokenizer=tokenizer, url="inprocess://small"),  # type: ignore[arg-type]
        target=ScriptedBackend(target, tokenizer=tokenizer, url="inprocess://target"),  # type: ignore[arg-type]
        small_template="chatml", target_template="chatml", **options)  # type: ignore[arg-type]


def takeover_rules(result_events: tuple[object, ...]) -> list[Rule]:
    return [e.rule for e in result_events if isinstance(e, TakeoverEvent)]


TARGET_FIX = ("Actually x is two because both terms are equal and their sum doubles one of them "
              "so we keep going with two here and more words follow" + " on and on" * 20)


async def test_reflection_keyword_hands_twenty_tokens_to_the_target(make_pair: PairFactory) -> None:
    fix20 = first_tokens(TARGET_FIX, 20)
    small = ScriptedModel([
        # the probe goes on long after "Wait", so the server is still writing when it is cut
        Script("", "Let x be 2.\n\nWait, x is 3" + " indeed" * 40 + ".\n\nSo x is 3."),
        Script(fix20, "\n\nSo the answer is 2."),
    ])
    target = ScriptedModel([Script("Let x be 2.\n\n", TARGET_FIX)])
    duo = make_pair(small, target)

    result = await duo.agenerate(QUESTION)

    assert result.text == "Let x be 2.\n\n" + fix20 + "\n\nSo the answer is 2."
    assert takeover_rules(result.events) == [Rule.AFFIRM_REFLECT]
    stats = result.stats
    assert stats.target_tokens == 20
    assert stats.discarded_tokens == 1  # decided the moment "Wait" completed
    assert stats.requests == {"small": 2, "target": 1}
    assert stats.finish_reason == "stop"
    assert duo.closed_early("small") == [True, False]  # the probe's stream was cut at once
    assert duo.closed_early("target") == [True]  # rule 2 did not apply: cut after n1
    assert [s.source for s in result.segments()] == ["small", "target", "small"]


async def test_affirmation_keyword_also_takes_over(make_pair: PairFactory) -> None:
    fix20 = first_tokens(TARGET_FIX, 20)
    small = ScriptedModel([
        Script("", "Two plus two.\n\nYes, that is four."),
        Script(fix20, " Done."),
    ])
    target = ScriptedModel([Script("Two plus two.\n\n", TARGET_FIX)])

    result = await make_pair(small, target).agenerate(QUESTION)

    assert result.text == "Two plus two.\n\n" + fix20 + " Done."
    assert result.stats.takeovers["rule1"] == 1
    assert result.stats.discarded_tokens == 1


async def test_neutral_paragraph_is_kept_and_never_resampled(make_pair: PairFactory) -> None:
    text = "First we add.\n\nThen we multiply the terms.\n\nThe result is 12."
    thinker = make_pair(ScriptedModel.single(text), ScriptedModel.single("never used"))

    result = await thinker.agenerate(QUESTION)

    assert result.text == text
    assert result.stats.total_takeovers == 0
    assert result.stats.requests == {"small": 1, "target": 0}
    assert result.stats.discarded_tokens == 0
    assert result.stats.small_tokens == TOKENS.count(text)


async def test_verify_word_in_target_text_extends_the_takeover_with_rule_2(
        make_pair: PairFactory) -> None:
    verify_text = ("Let me verify this carefully by substituting the value back into both sides "
                   "of the equation and checking that they match . Both sides equal 4 .")
    small = ScriptedModel([Script("", "x is 2.\n\nWait, maybe not.")])
    target = ScriptedModel([Script("x is 2.\n\n", verify_text)])

    result = await make_pair(small, target).agenerate(QUESTION)

    assert result.text == "x is 2.\n\n" + verify_text
    assert takeover_rules(result.events) == [Rule.AFFIRM_REFLECT, Rule.VERIFY]
    rules = [s.rule for s in result.segments() if s.source == "target"]
    assert rules == [Rule.AFFIRM_REFLECT, Rule.VERIFY]
    assert result.stats.target_tokens == TOKENS.count(verify_text)
    assert result.stats.requests["target"] == 1  # one request serves n1 and n2
    assert result.stats.finish_reason == "stop"  # the target ended the answer


async def test_an_extension_decided_on_the_budgets_last_token_is_not_carried_out(
        make_pair: PairFactory) -> None:
    """The target's 20th token holds rule 2's decision and is the last the budget allows: it is
    accepted, the call ends with ``length``, and no VERIFY takeover is reported (failing: the
    engine notes an extension it never carried out, or drops the token that decided it)."""
    verify_text = ("Let me verify this carefully by substituting the value back into both sides "
                   "of the equation and checking that they match . Both sides equal 4 .")
    small = ScriptedModel([Script("", "x is 2.\n\nWait, maybe not.")])
    target = ScriptedModel([Script("x is 2.\n\n", verify_text)])
    budget = TOKENS.count("x is 2.\n\n") + 20

    result = await make_pair(small, target).agenerate(QUESTION, max_new_tokens=budget)

    assert result.text == "x is 2.\n\n" + first_tokens(verify_text, 20)
    assert takeover_rules(result.events) == [Rule.AFFIRM_REFLECT]
    assert result.stats.takeovers[Rule.VERIFY.value] == 0
    assert result.stats.target_tokens == 20
    assert result.stats.finish_reason == "length"


class ReflectingSmall:
    """Opens every paragraph with "Wait" until it has written ``paragraphs`` breaks."""

    def __init__(self, paragraphs: int) -> None:
        self.paragraphs = paragraphs

    def continuation(self, prompt: str) -> Continuation:
        written = assistant_text(prompt)
        done = written.count("\n\n")
        if done >= self.paragraphs:
            return Continuation(" End.", True)
        return Continuation(f" step {done}.\n\nWait, step {done} again.", True)


class DoubtingTarget:
    """Always doubts itself: its text scores negative, so each rule-1 takeover counts."""

    def continuation(self, prompt: str) -> Continuation:
        return Continuation(" hmm wait" * 40, False)


async def test_excessive_reflection_fires_twice_and_the_threshold_grows(
        make_pair: PairFactory) -> None:
    rules = TakeoverRules.paper(n1=2, reflection_threshold=2, threshold_step=1, n3=3, n3_step=2)
    thinker = make_pair(ReflectingSmall(paragraphs=9), DoubtingTarget(), rules=rules)

    result = await thinker.agenerate(QUESTION)

    # c counts negative rule-1 texts; rule 3 fires at c >= 2, then at c >= 3
    assert takeover_rules(result.events) == [
        Rule.AFFIRM_REFLECT, Rule.AFFIRM_REFLECT, Rule.EXCESSIVE_REFLECTION,
        Rule.AFFIRM_REFLECT, Rule.AFFIRM_REFLECT, Rule.AFFIRM_REFLECT,
        Rule.EXCESSIVE_REFLECTION, Rule.AFFIRM_REFLECT, Rule.AFFIRM_REFLECT,
    ]
    rule3_runs = [s for s in result.segments() if s.rule is Rule.EXCESSIVE_REFLECTION]
    interventions = [s.text for s in rule3_runs if s.source == "intervention"]
    assert interventions == [rules.intervention_text] * 2
    target_rule3 = [TOKENS.count(s.text) for s in rule3_runs if s.source == "target"]
    assert target_rule3 == [3, 5]  # n3 grows by n3_step
    assert result.text.count("\n\n" + rules.intervention_text) == 2  # right after the delimiter


async def test_earliest_trigger_wins_when_probe_windows_overlap(make_pair: PairFactory) -> None:
    # The keyword lies in both the first and the second trigger's windows: the first wins and
    # everything after it is thrown away.
    fix20 = first_tokens(TARGET_FIX, 20)
    small = ScriptedModel([
        Script("", "One.\n\nTwo.\n\nThree wait."),
        Script(fix20, " Fine."),
    ])
    target = ScriptedModel([Script("One.\n\n", TARGET_FIX)])

    result = await make_pair(small, target).agenerate(QUESTION)

    assert result.text == "One.\n\n" + fix20 + " Fine."
    assert result.stats.discarded_tokens == TOKENS.count("Two.\n\nThree wait")


async def test_keyword_beyond_the_first_window_picks_the_second_trigger(
        make_pair: PairFactory) -> None:
    filler = " a" * 18  # the first window (20 tokens) ends before the keyword
    fix20 = first_tokens(TARGET_FIX, 20)
    small = ScriptedModel([
        Script("", f"One.\n\nTwo{filler}.\n\nThree wait."),
        Script(fix20, " Fine."),
    ])
    target = ScriptedModel([Script(f"One.\n\nTwo{filler}.\n\n", TARGET_FIX)])

    result = await make_pair(small, target).agenerate(QUESTION)

    assert result.text == f"One.\n\nTwo{filler}.\n\n" + fix20 + " Fine."
    assert result.events[0] == TextEvent("small", "One", None)


async def test_keyword_inside_a_longer_word_counts_as_a_substring_only(
        make_pair: PairFactory) -> None:
    fix20 = first_tokens(TARGET_FIX, 20)
    small_text = "Sum is 4.\n\nChecking the sum gives 4."
    small = ScriptedModel([Script("", small_text), Script(fix20, " Ok.")])
    target = ScriptedModel([Script("Sum is 4.\n\n", TARGET_FIX)])

    paper = await make_pair(small, target).agenerate(QUESTION)
    word_rules = TakeoverRules.paper(match="word")
    words = await make_pair(small, target, rules=word_rules).agenerate(QUESTION)

    assert paper.stats.takeovers["rule1"] == 1  # "checking" counts as "check" (authors' code)
    assert words.stats.total_takeovers == 0
    assert words.text == small_text


async def test_end_of_sequence_from_the_target_ends_the_answer(make_pair: PairFactory) -> None:
    small = ScriptedModel([Script("", "x is 2.\n\nWait, hmm.")])
    target = ScriptedModel([Script("x is 2.\n\n", "So x is 2.")])

    result = await make_pair(small, target).agenerate(QUESTION)

    assert result.text == "x is 2.\n\nSo x is 2."
    assert result.stats.finish_reason == "stop"
    assert result.stats.requests == {"small": 1, "target": 1}


async def test_budget_counts_every_accepted_token_of_both_models(make_pair: PairFactory) -> None:
    fix20 = first_tokens(TARGET_FIX, 20)
    small = ScriptedModel([
        Script("", "x is 2.\n\nWait, hmm."),
        Script(fix20, " and then many more words keep coming here without end"),
    ])
    target = ScriptedModel([Script("x is 2.\n\n", TARGET_FIX)])
    budget = TOKENS.count("x is 2.\n\n") + 20 + 3

    result = await make_pair(small, target).agenerate(QUESTION, max_new_tokens=budget)

    assert result.stats.output_tokens == budget
    assert result.text == "x is 2.\n\n" + fix20 + " and then many"
    assert result.stats.finish_reason == "length"


async def test_instruct_preset_begins_with_the_target_and_takes_every_trigger(
        make_pair: PairFactory) -> None:
    rules = TakeoverRules.paper_instruct(begin_tokens=3, n1=2)
    small = ScriptedModel([
        Script("", "never"),
        Script("Plan: add", " the numbers.\n\nThen check.\n\nDone."),
        Script("Step one", " two."),
    ])
    target = ScriptedModel([Script("", "Plan: add more"), Script("\n\n", "Step one")])

    result = await make_pair(small, target, rules=rules).agenerate(QUESTION)

    assert takeover_rules(result.events) == [Rule.BEGIN, Rule.EVERY_TRIGGER]
    assert result.text == "Plan: add the numbers.\n\nStep one two."
    assert [s.source for s in result.segments()] == ["target", "small", "target", "small"]
    assert result.stats.discarded_tokens == 0  # no probe in instruct mode


async def test_delimiter_split_across_two_tokens_is_a_trigger(make_pair: PairFactory) -> None:
    split = Tokenizer(split_newlines=True)
    fix20 = first_tokens(TARGET_FIX, 20, split)
    small = ScriptedModel([Script("", "x is 2.\n\nWait, hmm."), Script(fix20, " Ok.")])
    target = ScriptedModel([Script("x is 2.\n\n", TARGET_FIX)])

    result = await make_pair(small, target, tokenizer=split).agenerate(QUESTION)

    assert result.text == "x is 2.\n\n" + fix20 + " Ok."
    assert result.stats.takeovers["rule1"] == 1


async def test_stop_sequence_cuts_the_text_and_is_never_shown(make_pair: PairFactory) -> None:
    fix20 = first_tokens(TARGET_FIX, 20)
    small = ScriptedModel([
        Script("", "x is 2.\n\nWait, hmm."),
        Script(fix20, " Observation: the tool said 5."),
    ])
    target = ScriptedModel([Script("x is 2.\n\n", TARGET_FIX)])
    shown: list[str] = []

    async for event in make_pair(small, target).astream(QUESTION, stop=["Observation:"]):
        if isinstance(event, TextEvent):
            shown.append(event.text)

    assert "".join(shown) == "x is 2.\n\n" + fix20 + " "
    assert "Observ" not in "".join(shown)


async def test_stop_sequence_spanning_target_and_small_text(make_pair: PairFactory) -> None:
    fix20 = first_tokens(TARGET_FIX, 20)  # the target's part ends with "... keep going"
    small = ScriptedModel([Script("", "x is 2.\n\nWait, hmm."), Script(fix20, " and more")])
    target = ScriptedModel([Script("x is 2.\n\n", TARGET_FIX)])

    result = await make_pair(small, target).agenerate(QUESTION, stop=["going and"])

    assert result.text == "x is 2.\n\n" + fix20.removesuffix("going")
    assert result.stats.finish_reason == "stop"


async def test_probe_text_is_held_back_until_known_neutral(make_pair: PairFactory) -> None:
    text = "A.\n\nB is fine.\n\nC."
    thinker = make_pair(ScriptedModel.single(text), ScriptedModel.single("unused"))
    events = [e async for e in thinker.astream(QUESTION)]
    texts = [e.text for e in events if isinstance(e, TextEvent)]
    # "A", ".", "\n\n" stream at once; each probe window is released as a whole
    assert texts[:3] == ["A", ".", "\n\n"]
    assert "".join(texts) == text


async def test_dropped_small_stream_resumes_with_nothing_lost_or_repeated(
        make_pair: PairFactory) -> None:
    fix20 = first_tokens(TARGET_FIX, 20)
    small = ScriptedModel([
        Script("", "Let x be 2.\n\nNow x is 3 so far.\n\nWait, x is 3."),
        Script(fix20, "\n\nSo the answer is 2."),
    ])
    target = ScriptedModel([Script("Now x is 3 so far.\n\n", TARGET_FIX)])
    clean = await make_pair(small, target).agenerate(QUESTION)

    flaky = make_pair(small, target)
    flaky.drop_small_after(9)  # inside the second paragraph's probe window
    result = await flaky.agenerate(QUESTION)

    assert result.text == clean.text
    assert result.stats.resumed_streams["small"] == 1
    assert result.stats.takeovers == clean.stats.takeovers


async def test_target_down_falls_back_to_the_small_model() -> None:
    text = "x is 2.\n\nWait, it is 2.\n\nDone."
    thinker = pair(ScriptedModel.single(text), ScriptedModel.single("unused"))
    assert isinstance(thinker.target, ScriptedBackend)
    thinker.target.fail_connections()

    with pytest.warns(TargetFallbackWarning, match="small model continues"):
        result = await thinker.agenerate(QUESTION)

    assert result.text == text
    assert result.stats.fallback
    assert any(isinstance(e, FallbackEvent) for e in result.events)


async def test_target_down_raises_when_asked_to() -> None:
    thinker = pair(ScriptedModel.single("x.\n\nWait."), ScriptedModel.single("unused"),
                   on_target_error="raise")
    assert isinstance(thinker.target, ScriptedBackend)
    thinker.target.fail_connections()

    with pytest.raises(BackendConnectionError) as caught:
        await thinker.agenerate(QUESTION)
    assert caught.value.role == "target"


async def test_small_down_is_a_clear_error_before_any_text() -> None:
    thinker = pair(ScriptedModel.single("x"), ScriptedModel.single("y"))
    assert isinstance(thinker.small, ScriptedBackend)
    thinker.small.fail_connections()
    seen: list[object] = []
    with pytest.raises(BackendConnectionError, match="small server"):
        async for event in thinker.astream(QUESTION):
            seen.append(event)
    assert seen == []


async def test_thinking_scope_stops_takeovers_after_the_reasoning() -> None:
    text = "x is 2.</think>\n\nWait, the answer is 2."
    rules = TakeoverRules.paper(scope="thinking")
    result = await pair(ScriptedModel.single(text), ScriptedModel.single("no"),
                        rules=rules).agenerate(QUESTION)
    assert result.text == text
    assert result.stats.total_takeovers == 0


@pytest.mark.parametrize("bad", [
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"max_new_tokens": 0},
    {"stop": [""]},
])
async def test_bad_input_is_refused_before_any_request(bad: dict[str, object]) -> None:
    thinker = pair(ScriptedModel.single("x"), ScriptedModel.single("y"))
    messages = bad.pop("messages", QUESTION)
    with pytest.raises(ConfigError):
        await thinker.agenerate(messages, **bad)  # type: ignore[arg-type]
    assert isinstance(thinker.small, ScriptedBackend)
    assert thinker.small.requests == []


async def test_prompt_over_the_servers_input_limit_is_refused() -> None:
    thinker = SpeculativeThinker(
        small=ScriptedBackend(ScriptedModel.single("x"), max_input_tokens=5),
        target=ScriptedBackend(ScriptedModel.single("y")),
        small_template="chatml", target_template="chatml")
    with pytest.raises(ConfigError, match="max_input_tokens=5"):
        await thinker.agenerate([{"role": "user", "content": "a long question " * 10}])


async def test_leaving_the_stream_early_closes_the_small_stream() -> None:
    thinker = pair(ScriptedModel.single("word " * 50), ScriptedModel.single("y"))
    stream = thinker.astream(QUESTION)
    async for _event in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert isinstance(thinker.small, ScriptedBackend)
    assert thinker.small.requests[0].closed_early


async def test_sync_generate_works_inside_a_running_loop() -> None:
    thinker = pair(ScriptedModel.single("Four."), ScriptedModel.single("y"))
    # a notebook calls the sync API while its own loop runs
    result = await asyncio.to_thread(thinker.generate, QUESTION)
    assert result.text == "Four."
    assert thinker.generate(QUESTION).text == "Four."


def test_sync_stream_yields_the_same_text() -> None:
    thinker = pair(ScriptedModel.single("A.\n\nB."), ScriptedModel.single("y"))
    texts = [e.text for e in thinker.stream(QUESTION) if isinstance(e, TextEvent)]
    assert "".join(texts) == "A.\n\nB."


async def test_concurrent_conversations_do_not_mix() -> None:
    thinker = pair(ReflectingSmall(paragraphs=4), DoubtingTarget(),
                   rules=TakeoverRules.paper(n1=3))
    solo = await thinker.agenerate(QUESTION)
    together = await asyncio.gather(*(thinker.agenerate(QUESTION) for _ in range(32)))
    assert {r.text for r in together} == {solo.text}


async def test_reasoning_tokens_are_counted_until_the_think_block_closes() -> None:
    text = "<think>\nx is 2.</think>\n\nThe answer is 2."
    result = await pair(ScriptedModel.single(text), ScriptedModel.single("no")).agenerate(
        QUESTION)
    assert result.stats.reasoning_tokens == TOKENS.count("<think>\nx is 2.</think>")
    plain = await pair(ScriptedModel.single("The answer is 2."),
                       ScriptedModel.single("no")).agenerate(QUESTION)
    assert plain.stats.reasoning_tokens == 0


async def test_stop_sequence_spanning_many_tokens_and_a_released_probe(
        make_pair: PairFactory) -> None:
    # The stop sequence begins in the small model's plain text and ends inside a probe window
    # released as one piece: the accepted text is kept in pieces, so the search must look back
    # across them.
    text = "So x is 4.\n\nWe say the answer is 4 and more words follow here."
    thinker = make_pair(ScriptedModel.single(text), ScriptedModel.single("unused"))
    stop = ["x is 4.\n\nWe say the answer"]
    shown = [e.text async for e in thinker.astream(QUESTION, stop=stop)
             if isinstance(e, TextEvent)]
    result = await thinker.agenerate(QUESTION, stop=stop)
    assert "".join(shown) == result.text == "So "
    assert result.stats.finish_reason == "stop"
