"""The takeover policy alone: events in, actions out, no engine, no streams.

Three layers. The golden scenarios of ``test_engine.py`` are replayed on the policy with the same
tokens, and must give the same decisions. Hypothesis then drives it with arbitrary token streams
(random splits of texts with delimiters and keywords, random drops) against an oracle read
directly from ``specs/takeover-rules.md``. Last, invariants over whole answers: counters within
their caps, nothing released after a takeover decided on it, the reassembled stream equal to the
input minus the discarded probe.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from specthink import SpeculativeThinker, TakeoverRules
from specthink.rules import (
    ACCEPT,
    HAND_BACK,
    HOLD,
    Extend,
    Handover,
    Intervene,
    PolicyStateError,
    Release,
    SmallAction,
    TakeoverPolicy,
)
from specthink.testing.inprocess import ScriptedBackend
from specthink.testing.models import Continuation, Tokenizer, assistant_text
from specthink.trace import Rule, TakeoverEvent

TOKENS = Tokenizer()
PAPER = TakeoverRules.paper()
TARGET_FIX = ("Actually x is two because both terms are equal and their sum doubles one of them "
              "so we keep going with two here and more words follow" + " on and on" * 20)


# ---- a tiny executor: what the engine does with the actions, minus the I/O ----------------

@dataclass
class Stream:
    """One small-model part as the policy saw it: what was accepted, held, thrown away."""

    accepted: list[str] = field(default_factory=list)
    accepted_tokens: int = 0
    handover: Handover | None = None
    consumed: int = 0
    """Tokens of the input fed to the policy, counted from the start of the part."""


def carry_out(policy: TakeoverPolicy, action: SmallAction, token: str | None,
              stream: Stream) -> None:
    """Apply ``action`` as the engine does, checking what the engine relies on."""
    if action is ACCEPT:
        assert token is not None
        stream.accepted.append(token)
        stream.accepted_tokens += 1
        return
    while isinstance(action, Release):
        assert action.text and action.tokens > 0
        stream.accepted.append(action.text)
        stream.accepted_tokens += action.tokens
        action = action.then
    if isinstance(action, Handover):
        assert policy.handover is action and policy.state == "target"
        assert policy.held == ()  # the probe is gone with the decision
        stream.handover = action
    else:
        assert action is HOLD
        assert policy.handover is None


def small_part(policy: TakeoverPolicy, tokens: Sequence[str], *,
               drops: Sequence[int] = ()) -> Stream:
    """Feed ``tokens`` as the small model's part (one stream, resumed after each drop the way
    the engine does: from the accepted text), then end it unless a takeover came first."""
    stream = Stream()
    pending_drops = list(drops)
    position = 0
    in_stream = 0
    while position < len(tokens):
        if pending_drops and in_stream == pending_drops[0]:
            pending_drops.pop(0)
            policy.small_dropped()
            # the resumed stream writes again from the accepted text
            position = stream.accepted_tokens
            in_stream = 0
            assert policy.held == ()
            continue
        token = tokens[position]
        position += 1
        in_stream += 1
        carry_out(policy, policy.small_token(token), token, stream)
        stream.consumed = max(stream.consumed, position)
        held = policy.held
        if stream.handover is not None:
            return stream
        # every token fed is accepted or held, in order; the held part is one probe at most
        assert stream.accepted_tokens + len(held) == position
        assert "".join(stream.accepted) + "".join(held) == "".join(tokens[:position])
        assert len(held) <= policy.rules.probe_tokens
    carry_out(policy, policy.small_ended(), None, stream)
    if stream.handover is None:
        assert stream.accepted_tokens == len(tokens)
    return stream


@dataclass
class TargetPart:
    written: list[str] = field(default_factory=list)
    extended: Extend | None = None
    handed_back: bool = False


def target_part(policy: TakeoverPolicy, tokens: Iterator[str]) -> TargetPart:
    part = TargetPart()
    handover = policy.handover
    assert handover is not None
    while True:
        left = policy.target_left
        assert 0 < left <= handover.up_to
        token = next(tokens)
        part.written.append(token)
        action = policy.target_token(token)
        if action is HAND_BACK:
            part.handed_back = True
            assert policy.handover is None
            return part
        if isinstance(action, Extend):
            assert part.extended is None and len(part.written) == handover.tokens
            part.extended = action
        else:
            assert action is ACCEPT


def tokens_of(text: str, tokenizer: Tokenizer = TOKENS) -> list[str]:
    return tokenizer.tokenize(text)


# ---- the golden scenarios of test_engine.py, on the policy ---------------------------------

def test_reflection_keyword_hands_twenty_tokens_to_the_target() -> None:
    policy = TakeoverPolicy(PAPER)
    assert policy.start() is None
    stream = small_part(policy, tokens_of("Let x be 2.\n\nWait, x is 3" + " indeed" * 40))
    assert "".join(stream.accepted) == "Let x be 2.\n\n"
    assert stream.handover == Handover(Rule.AFFIRM_REFLECT, 20, discard=1, up_to=145)
    assert stream.consumed == len(tokens_of("Let x be 2.\n\nWait"))  # decided at "Wait"

    part = target_part(policy, iter(tokens_of(TARGET_FIX)))
    assert part.extended is None and len(part.written) == 20  # no verify word: back after n1
    assert policy.state == "small" and policy.reflection_count == 0  # the fix scores 0


def test_affirmation_keyword_also_takes_over() -> None:
    stream = small_part(TakeoverPolicy(PAPER), tokens_of("Two plus two.\n\nYes, that is four."))
    assert stream.handover is not None and stream.handover.rule is Rule.AFFIRM_REFLECT
    assert stream.handover.discard == 1


def test_neutral_probe_is_released_as_a_whole_and_never_resampled() -> None:
    policy = TakeoverPolicy(PAPER)
    text = "A.\n\nB is fine.\n\nC."
    actions = [policy.small_token(token) for token in tokens_of(text)]
    # "A", ".", "\n\n" are accepted at once; the probe after the trigger is held
    assert actions[:3] == [ACCEPT, ACCEPT, ACCEPT]
    assert all(action is HOLD for action in actions[3:])
    # the stream ends: each window closes with what it holds, the earliest first
    assert policy.small_ended() == Release("B is fine.\n\n", 5, Release("C.", 2, HOLD))


def test_verify_word_in_target_text_extends_the_takeover_with_rule_2() -> None:
    verify_text = ("Let me verify this carefully by substituting the value back into both sides "
                   "of the equation and checking that they match . Both sides equal 4 .")
    policy = TakeoverPolicy(PAPER)
    small_part(policy, tokens_of("x is 2.\n\nWait, maybe not."))
    part = target_part(policy, itertools.chain(tokens_of(verify_text), itertools.repeat(" .")))
    assert part.extended == Extend(Rule.VERIFY, 125)
    assert len(part.written) == 20 + 125  # one request's worth: n1, then n2
    assert policy.reflection_count == 1  # "verify", "checking": the first 20 tokens score < 0


def test_excessive_reflection_fires_twice_and_the_threshold_grows() -> None:
    rules = TakeoverRules.paper(n1=2, reflection_threshold=2, threshold_step=1, n3=3, n3_step=2)
    policy = TakeoverPolicy(rules)
    decided: list[Rule] = []
    rule3_tokens: list[int] = []
    for done in range(9):
        stream = small_part(policy, tokens_of(f" step {done}.\n\nWait, step {done} again."))
        assert stream.handover is not None
        decided.append(stream.handover.rule)
        if isinstance(stream.handover, Intervene):
            assert stream.handover.text == rules.intervention_text
            # the intervention comes right after the delimiter: the probe is not written
            assert "".join(stream.accepted).endswith("\n\n")
            rule3_tokens.append(stream.handover.tokens)
        target_part(policy, itertools.repeat(" hmm wait"))
    assert decided == [
        Rule.AFFIRM_REFLECT, Rule.AFFIRM_REFLECT, Rule.EXCESSIVE_REFLECTION,
        Rule.AFFIRM_REFLECT, Rule.AFFIRM_REFLECT, Rule.AFFIRM_REFLECT,
        Rule.EXCESSIVE_REFLECTION, Rule.AFFIRM_REFLECT, Rule.AFFIRM_REFLECT,
    ]
    assert rule3_tokens == [3, 5]  # n3 grows by n3_step
    assert (policy.reflection_threshold, policy.n3) == (4, 7)


def test_earliest_trigger_wins_when_probe_windows_overlap() -> None:
    stream = small_part(TakeoverPolicy(PAPER), tokens_of("One.\n\nTwo.\n\nThree wait."))
    assert "".join(stream.accepted) == "One.\n\n"
    assert stream.handover is not None
    assert stream.handover.discard == TOKENS.count("Two.\n\nThree wait")


def test_keyword_beyond_the_first_window_picks_the_second_trigger() -> None:
    filler = " a" * 18
    stream = small_part(TakeoverPolicy(PAPER), tokens_of(f"One.\n\nTwo{filler}.\n\nThree wait."))
    assert "".join(stream.accepted) == f"One.\n\nTwo{filler}.\n\n"
    assert stream.accepted[0] == "One"
    # the first window closed neutral after its 20 tokens and was released as one piece
    assert stream.accepted[3:] == [f"Two{filler}.", "\n\n"]


def test_keyword_inside_a_longer_word_counts_as_a_substring_only() -> None:
    tokens = tokens_of("Sum is 4.\n\nChecking the sum gives 4.")
    assert small_part(TakeoverPolicy(PAPER), tokens).handover is not None
    words = small_part(TakeoverPolicy(TakeoverRules.paper(match="word")), tokens)
    assert words.handover is None and words.accepted_tokens == len(tokens)


def test_word_match_waits_for_the_next_character_of_a_keyword_at_the_end() -> None:
    rules = TakeoverRules.paper(match="word")
    policy = TakeoverPolicy(rules)
    assert [policy.small_token(t) for t in ["x.", "\n\n", " check"]] == [ACCEPT, ACCEPT, HOLD]
    assert policy.small_token("ing") is HOLD  # "checking" is no keyword under word matching
    policy = TakeoverPolicy(rules)
    for token in ["x.", "\n\n", " check"]:
        policy.small_token(token)
    decided = policy.small_token(" it")
    assert isinstance(decided, Handover) and decided.discard == 2
    policy = TakeoverPolicy(rules)
    for token in ["x.", "\n\n", " check"]:
        policy.small_token(token)
    at_end = policy.small_ended()  # the stream ended: the window text is complete
    assert isinstance(at_end, Handover) and at_end.discard == 1


def test_instruct_preset_begins_with_the_target_and_takes_every_trigger() -> None:
    rules = TakeoverRules.paper_instruct(begin_tokens=3, n1=2)
    policy = TakeoverPolicy(rules)
    begin = policy.start()
    assert begin == Handover(Rule.BEGIN, 3)
    part = target_part(policy, iter(tokens_of("Plan: add more")))
    assert "".join(part.written) == "Plan: add" and part.extended is None
    stream = small_part(policy, tokens_of(" the numbers.\n\nThen check.\n\nDone."))
    assert "".join(stream.accepted) == " the numbers.\n\n"  # the trigger token itself is kept
    assert stream.handover == Handover(Rule.EVERY_TRIGGER, 2, discard=0, up_to=2 + 125)
    with pytest.raises(PolicyStateError):
        policy.start()


def test_delimiter_split_across_two_tokens_is_a_trigger() -> None:
    split = Tokenizer(split_newlines=True)
    stream = small_part(TakeoverPolicy(PAPER), tokens_of("x is 2.\n\nWait, hmm.", split))
    assert "".join(stream.accepted) == "x is 2.\n\n"
    assert stream.handover is not None and stream.handover.discard == 1


@pytest.mark.parametrize("drop_after", range(1, 16))
def test_dropped_small_stream_resumes_with_the_same_decisions(drop_after: int) -> None:
    tokens = tokens_of("Let x be 2.\n\nNow x is 3 so far.\n\nWait, x is 3.")
    clean = small_part(TakeoverPolicy(PAPER), tokens)
    flaky = small_part(TakeoverPolicy(PAPER), tokens, drops=[drop_after])
    assert flaky.accepted_tokens == clean.accepted_tokens
    assert "".join(flaky.accepted) == "".join(clean.accepted) == "Let x be 2.\n\n"
    assert flaky.handover == clean.handover


def test_dropped_stream_goes_back_to_the_earliest_open_window() -> None:
    policy = TakeoverPolicy(TakeoverRules.paper(probe_tokens=4))
    for token in ["A", "\n\n", " b", "\n\n", " c"]:
        policy.small_token(token)
    assert policy.held == (" b", "\n\n", " c")  # two windows open
    policy.small_dropped()
    assert policy.held == ()
    # the resumed stream writes " b" again: it is held in the window of the first trigger
    assert policy.small_token(" b") is HOLD
    assert policy.small_token("\n\n") is HOLD  # and its trigger opens the second window again
    assert policy.small_token(" d") is HOLD
    # the first window is full (4 tokens) and neutral: released up to the second window
    assert policy.small_token(" e") == Release(" b\n\n", 2, HOLD)
    assert policy.small_token(" f") is HOLD
    assert policy.small_token(" g") == Release(" d e f g", 4, HOLD)


def test_a_resumed_stream_finds_the_trigger_a_half_delimiter_began() -> None:
    # The trigger token ends with half a delimiter, which the window's first token completes:
    # after a drop the resumed stream must start from the tail as it was at the window.
    tokens = ["A", "\n\nx\n", "\nB", " c", " d", " wait"]
    rules = TakeoverRules.paper(probe_tokens=3)
    clean = small_part(TakeoverPolicy(rules), tokens)
    assert clean.handover is not None and clean.handover.discard == 3
    assert "".join(clean.accepted) == "A\n\nx\n\nB"  # the second trigger's window wins
    for drop in range(1, 6):
        assert small_part(TakeoverPolicy(rules), tokens, drops=[drop]) == clean


def test_rule_3_counters_stop_at_their_caps() -> None:
    rules = TakeoverRules.paper(n1=1, reflection_threshold=1, threshold_step=1,
                                threshold_max=2, n3=1, n3_step=1, n3_max=2)
    policy = TakeoverPolicy(rules)
    interventions: list[tuple[int, int]] = []
    for _ in range(12):
        stream = small_part(policy, tokens_of(" a.\n\nWait, no."))
        assert stream.handover is not None
        if isinstance(stream.handover, Intervene):
            interventions.append((stream.handover.tokens, policy.reflection_threshold))
        target_part(policy, itertools.repeat(" wait"))
    # n3: 1, then 2 (capped); the threshold: 1 -> 2 (capped), so rule 3 fires every third time
    assert interventions == [(1, 2), (2, 2), (2, 2), (2, 2)]


def test_thinking_scope_stops_takeovers_after_the_reasoning() -> None:
    rules = TakeoverRules.paper(scope="thinking")
    stream = small_part(TakeoverPolicy(rules), tokens_of("x is 2.</think>\n\nWait, it is 2."))
    assert stream.handover is None
    # the end of the reasoning in the target's text counts as well
    policy = TakeoverPolicy(rules)
    small_part(policy, tokens_of("x.\n\nWait, no."))
    target_part(policy, iter(tokens_of("so x is 2.</think>" + " fine" * 30)))
    assert not policy.in_scope
    assert small_part(policy, tokens_of(" so.\n\nWait, again.")).handover is None


def test_target_failure_ends_every_handoff() -> None:
    policy = TakeoverPolicy(PAPER)
    small_part(policy, tokens_of("x.\n\nWait, no."))
    policy.target_failed()
    assert policy.state == "small" and not policy.handoffs
    stream = small_part(policy, tokens_of(" so.\n\nWait, again.\n\nYes."))
    assert stream.handover is None and "".join(stream.accepted) == " so.\n\nWait, again.\n\nYes."


def test_constrained_answers_never_hand_over() -> None:
    rules = TakeoverRules.paper_instruct()
    policy = TakeoverPolicy(rules, handoffs=False)
    assert policy.start() is None
    assert small_part(policy, tokens_of("a.\n\nWait.\n\nb.")).handover is None


@pytest.mark.parametrize("off", ["reflection_takeover", "excessive_reflection_takeover"])
def test_switched_off_rules_do_not_fire(off: str) -> None:
    rules = TakeoverRules.paper(reflection_threshold=1, **{off: False})
    policy = TakeoverPolicy(rules)
    if off == "reflection_takeover":
        assert small_part(policy, tokens_of("a.\n\nWait.\n\nb.")).handover is None
        return
    for _ in range(3):
        stream = small_part(policy, tokens_of(" a.\n\nWait, no."))
        assert stream.handover is not None and stream.handover.rule is Rule.AFFIRM_REFLECT
        target_part(policy, itertools.repeat(" wait"))
    assert policy.reflection_count == 3


def test_rule_2_switched_off_hands_back_after_n1() -> None:
    policy = TakeoverPolicy(TakeoverRules.paper(verify_takeover=False, n1=3))
    stream = small_part(policy, tokens_of("a.\n\nWait."))
    assert stream.handover == Handover(Rule.AFFIRM_REFLECT, 3, discard=1, up_to=3)
    part = target_part(policy, itertools.repeat(" verify"))
    assert part.extended is None and len(part.written) == 3


def test_events_the_state_does_not_allow_are_refused() -> None:
    policy = TakeoverPolicy(PAPER)
    with pytest.raises(PolicyStateError, match="target token while the small model"):
        policy.target_token("x")
    small_part(policy, tokens_of("a.\n\nWait."))
    for event in (lambda: policy.small_token("x"), policy.small_ended, policy.small_dropped):
        with pytest.raises(PolicyStateError, match="while the target model holds the turn"):
            event()


# ---- hypothesis: arbitrary streams against the specification --------------------------------

KEYWORDS = ["wait", "Yes", "yeah", "final answer", "confident", "alternatively", "hold on",
            "another", "verify", "think again", "recap", "check", "checking", "Checked"]
NEUTRAL = ["so", "the", "x", "is", "two", "we", "add", "it", ".", ",", "4"]
WORD = st.one_of(st.sampled_from(NEUTRAL), st.sampled_from(NEUTRAL), st.sampled_from(KEYWORDS))
PARAGRAPH = st.lists(WORD, min_size=1, max_size=10).map(" ".join)
TEXT = st.lists(PARAGRAPH, min_size=1, max_size=6).map("\n\n".join)
RULES = st.builds(lambda probe, match: TakeoverRules.paper(probe_tokens=probe, match=match),
                  st.integers(1, 6), st.sampled_from(["substring", "word"]))


@st.composite
def split_text(draw: st.DrawFn) -> list[str]:
    """A text cut into tokens anywhere (so a delimiter or a keyword may span tokens)."""
    text = draw(TEXT)
    cuts = draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=len(text)))
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(text)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def trigger_tokens(tokens: Sequence[str], delimiter: str) -> list[int]:
    """Indices of the tokens in which a delimiter completes (the texts drawn here never run
    two delimiters together, so their occurrences are unambiguous)."""
    ends = list(itertools.accumulate(len(t) for t in tokens))
    completes = [m.end() for m in re.finditer(re.escape(delimiter), "".join(tokens))]
    return sorted({i for i, end in enumerate(ends) for c in completes
                   if end - len(tokens[i]) < c <= end})


def oracle(tokens: Sequence[str], rules: TakeoverRules) -> tuple[int, int | None, int]:
    """(tokens accepted, the trigger token that wins or None, tokens discarded), read from the
    specification for one stream of a fresh answer (so rule 3 cannot fire yet)."""
    triggers = trigger_tokens(tokens, rules.delimiter)
    probe = rules.probe_tokens
    last = len(tokens) - 1
    for rank, trigger in enumerate(triggers):
        if not rules.has_keyword("".join(tokens[trigger + 1: trigger + 1 + probe])):
            continue
        # the earliest trigger whose window holds a keyword wins, and it is decided as soon as
        # its keyword completes, once every earlier window has closed without one
        earlier_closed = max((k + probe for k in triggers[:rank]), default=0)
        for at in range(max(trigger + 1, earlier_closed), min(trigger + probe, last) + 1):
            seen = "".join(tokens[trigger + 1: at + 1])
            if rules.has_keyword(seen, complete=at - trigger >= probe):
                return trigger + 1, trigger, at - trigger
        return trigger + 1, trigger, last - trigger  # decided when the stream ended
    return len(tokens), None, 0


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(split_text(), RULES)
def test_any_token_stream_gets_the_specifications_decision(
        tokens: list[str], rules: TakeoverRules) -> None:
    stream = small_part(TakeoverPolicy(rules), tokens)
    accepted, trigger, discarded = oracle(tokens, rules)
    assert stream.accepted_tokens == accepted
    assert "".join(stream.accepted) == "".join(tokens[:accepted])
    if trigger is None:
        assert stream.handover is None
    else:
        assert stream.handover is not None
        assert stream.handover.rule is Rule.AFFIRM_REFLECT
        # discarded == the tokens after the winning window's start, up to the decision
        assert stream.handover.discard == discarded
        assert stream.consumed == accepted + discarded
        # reassembly: what was accepted plus the discarded probe is exactly what was read
        assert stream.accepted_tokens + stream.handover.discard == stream.consumed


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(split_text(), RULES, st.lists(st.integers(0, 12), max_size=3))
def test_dropped_streams_change_no_decision(tokens: list[str], rules: TakeoverRules,
                                            drops: list[int]) -> None:
    clean = small_part(TakeoverPolicy(rules), tokens)
    flaky = small_part(TakeoverPolicy(rules), tokens, drops=drops)
    assert flaky.accepted_tokens == clean.accepted_tokens
    assert "".join(flaky.accepted) == "".join(clean.accepted)
    assert flaky.handover == clean.handover


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(split_text(), st.integers(1, 4))
def test_instruct_mode_takes_every_trigger_and_holds_nothing(tokens: list[str], n1: int) -> None:
    policy = TakeoverPolicy(TakeoverRules.paper_instruct(n1=n1))
    triggers = trigger_tokens(tokens, "\n\n")
    for index, token in enumerate(tokens):
        action = policy.small_token(token)
        if index in triggers:
            # no probe: the trigger token is accepted and the target takes over at once
            assert action == Release(token, 1, Handover(Rule.EVERY_TRIGGER, n1, 0, n1 + 125))
            return
        assert action is ACCEPT
    assert not triggers and policy.small_ended() is HOLD


TARGET_WORDS = st.lists(st.sampled_from([" wait", " yes", " verify", " so", " the", " x"]),
                        min_size=1, max_size=8)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(split_text(), TARGET_WORDS), min_size=1, max_size=12),
       st.sampled_from(["paper", "paper_instruct", "fixed_threshold_3"]),
       st.integers(1, 3), st.integers(0, 2))
def test_whole_answers_keep_the_counters_within_their_caps(
        rounds: list[tuple[list[str], list[str]]], preset: str, threshold: int,
        step: int) -> None:
    base = TakeoverRules.preset(preset)
    rules = base.model_copy(update={
        "n1": 3, "n2": 2, "n3": 2, "n3_step": 1, "n3_max": 4, "begin_tokens": 2,
        "reflection_threshold": threshold, "threshold_step": step,
        "threshold_max": threshold + 2 * step})
    policy = TakeoverPolicy(rules)
    start = policy.start()
    if start is not None:
        assert start.rule is Rule.BEGIN
        target_part(policy, itertools.repeat(" wait"))
        assert policy.reflection_count == 0  # the opening does not count
    for small, target in rounds:
        count, limit, n3 = policy.reflection_count, policy.reflection_threshold, policy.n3
        stream = small_part(policy, small)
        if stream.handover is None:
            continue
        handover = stream.handover
        part = target_part(policy, itertools.cycle(target))
        first = "".join(part.written[:handover.tokens])
        if isinstance(handover, Intervene):
            assert handover.rule is Rule.EXCESSIVE_REFLECTION and handover.tokens == n3
            assert count >= limit and policy.reflection_count == 0
            assert policy.reflection_threshold == min(limit + step, rules.threshold_max)
            assert policy.n3 == min(n3 + rules.n3_step, rules.n3_max)
            assert part.extended is None and len(part.written) == n3
        else:
            assert handover.rule in (Rule.AFFIRM_REFLECT, Rule.EVERY_TRIGGER)
            assert (handover.rule is Rule.EVERY_TRIGGER) == (rules.mode == "instruct")
            assert policy.reflection_count == count + (rules.score(first) < 0)
            assert (part.extended is not None) == rules.has_verify(first)
            assert len(part.written) == handover.tokens + (rules.n2 if part.extended else 0)
        assert 0 <= policy.reflection_count
        assert rules.reflection_threshold <= policy.reflection_threshold <= rules.threshold_max
        assert rules.n3 <= policy.n3 <= rules.n3_max


def test_every_rule_has_a_label_and_says_whether_it_hands_over() -> None:
    # a new Rule member needs a label (traces, reports) and tells the bench whether it opens a
    # target request: rule 2 is the only one that lengthens another's
    assert all(rule.label != rule.value for rule in Rule)
    assert [rule for rule in Rule if not rule.hands_over] == [Rule.VERIFY]


# ---- the engine carries the policy's decisions out, and nothing else ----------------------

TARGET_TEXTS = [" fine" * 400, " hmm wait" * 300, " let me verify" * 300,
                (" yes" * 3 + " check") * 100]
"""What the target writes wherever it is asked: neutral, doubting (rule 3 comes), verifying
(rule 2), or affirming with a verify word."""


class ScriptFollower:
    """A small model writing ``script``; after a takeover it goes on with the paragraph after
    the one the target took over (the target writes no paragraph break)."""

    def __init__(self, script: str) -> None:
        self.script = script

    def continuation(self, prompt: str) -> Continuation:
        written = assistant_text(prompt)
        if self.script.startswith(written):
            return Continuation(self.script[len(written):])
        rest = self.script.split("\n\n")[written.count("\n\n") + 1:]
        return Continuation("\n\n" + "\n\n".join(rest) if rest else "")


def simulate(model: ScriptFollower, rules: TakeoverRules,
             target_text: str) -> tuple[str, list[Rule], int]:
    """The answer as the policy alone decides it, the I/O done by hand: the accepted text,
    the takeovers in order and the discarded tokens."""
    policy = TakeoverPolicy(rules)
    text = ""
    decided: list[Rule] = []
    discarded = 0
    handover = policy.start()
    while True:
        if handover is not None:
            decided.append(handover.rule)
            discarded += handover.discard
            if isinstance(handover, Intervene):
                text += handover.text
            for token in TOKENS.tokenize(target_text):
                text += token
                action = policy.target_token(token)
                if isinstance(action, Extend):
                    decided.append(action.rule)
                elif action is HAND_BACK:
                    break
        prompt = "<|im_start|>assistant\n" + text
        stream = small_part(policy, TOKENS.tokenize(model.continuation(prompt).text))
        text += "".join(stream.accepted)
        handover = stream.handover
        if handover is None:
            return text, decided, discarded


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXT, st.integers(1, 6), st.sampled_from(["substring", "word"]),
       st.sampled_from(["reasoning", "instruct"]), st.integers(1, 3),
       st.sampled_from(TARGET_TEXTS))
@example("so\n\nx\n\nthe", 6, "substring", "reasoning", 1, TARGET_TEXTS[0])  # two windows end
@example("x\n\nwait\n\nso\n\nwait\n\nso\n\nwait", 2, "word", "reasoning", 1, TARGET_TEXTS[1])
def test_the_engine_carries_out_exactly_the_policys_decisions(
        script: str, probe: int, match: str, mode: str, threshold: int,
        target_text: str) -> None:
    rules = TakeoverRules.paper(probe_tokens=probe, match=match, mode=mode, n1=3, n2=4, n3=3,
                                reflection_threshold=threshold, threshold_max=threshold + 5,
                                begin_tokens=2 if mode == "instruct" else 0)
    model = ScriptFollower(script)
    expected_text, expected_rules, expected_discarded = simulate(model, rules, target_text)
    thinker = SpeculativeThinker(
        small=ScriptedBackend(model), target=ScriptedBackend(EchoText(target_text)),
        small_template="chatml", target_template="chatml", rules=rules)

    result = asyncio.run(thinker.agenerate([{"role": "user", "content": "Go."}],
                                           max_new_tokens=100_000))

    assert result.text == expected_text
    assert [e.rule for e in result.events if isinstance(e, TakeoverEvent)] == expected_rules
    assert result.stats.discarded_tokens == expected_discarded
    assert result.stats.finish_reason == "stop"


class EchoText:
    """A target that writes ``text`` wherever it is asked (and never ends on its own)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def continuation(self, prompt: str) -> Continuation:
        return Continuation(self.text, eos=False)
