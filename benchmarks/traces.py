"""Long scripted reasoning traces, generated deterministically, and the two "models" that play
them on the loopback servers.

A trace is one conversation: a maths question (carrying its number, ``Problem #17``), the small
model's paragraphs, and what the target model writes wherever it is asked to take over. Some
paragraphs open with a reflection, affirmation or verification word (the keyword sits inside
the 20-token probe window, at its start or a few tokens in); the rest are neutral. The target
writes different text: usually a reflection of its own (which feeds rule 3's counter), sometimes
a verification (which triggers rule 2's longer takeover). Both models are pure functions of the
prompt text, as greedy decoding is, so every policy sees the same models.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

from specthink.rules import TakeoverRules
from specthink.testing.models import Continuation, Tokenizer, assistant_text, last_user_message

__all__ = [
    "SmallTraceModel",
    "TargetTraceModel",
    "Trace",
    "TraceSpec",
    "conversation_of",
    "make_trace",
    "messages_for",
]

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The prompt the authors used for maths sets (see specs/takeover-rules.md)."""

_PROBLEM = re.compile(r"Problem #(\d+):")
_RULES = TakeoverRules.paper()
_TOKENIZER = Tokenizer()

# Sentence banks. None may hold a keyword of the paper preset, even as a substring ("threshold
# on" holds "hold on"): make_trace asserts it, so an edit here cannot silently add takeovers.
_NOUNS = ("value", "length", "area", "perimeter", "sum", "product", "slope", "radius", "height",
          "average")
_SHAPES = ("triangle", "square", "sequence", "circle", "set", "expression", "polygon")
_VARS = ("x", "y", "n", "k", "m")
_OPS = ("plus", "minus", "times")
_ORDINALS = ("first", "second", "third", "fourth", "fifth")

_SMALL_SENTENCES = (
    "The {noun} of the {shape} is {a}.",
    "So {var} equals {a} {op} {b}, which gives {c}.",
    "Now I multiply both sides by {a} to clear the fraction.",
    "Adding {a} to both sides gives {var} = {b}.",
    "That means the {noun} is {a} units long.",
    "Next, I look at the {ordinal} term of the sequence.",
    "The sum of the first {a} terms is {c}.",
    "Since {a} is odd, the {noun} cannot be even.",
    "Let me write the equation as {var} squared minus {a} {var} plus {b} = 0.",
    "Factoring gives ({var} minus {a}) times ({var} minus {b}).",
    "The remainder when {c} is divided by {a} is {b}.",
    "So the area of the triangle is one half times {a} times {b}.",
    "Then the ratio of the two parts is {a} to {b}.",
    "Using the formula for an arithmetic series, I get {c}.",
)
_TARGET_SENTENCES = (
    "Going back to the {noun}, the correct value is {a}, not {b}.",
    "The mistake was in the sign of the {ordinal} term.",
    "Carrying the {a} through the computation gives {c}.",
    "Both expressions agree, because {a} {op} {b} is {c}.",
    "So the {noun} must be {c} after the correction.",
    "It is cleaner to substitute {var} = {a} first.",
    "This matches the constraint on the {shape}.",
    "The two cases give {a} and {b}, and only {a} fits.",
)
_CLOSINGS = (" So this step holds.", " That settles this part.", " With that, we move on.",
             " Good, the rest follows.")

_SMALL_OPENERS = {
    "reflect": ("Wait, ", "Hold on, ", "Alternatively, ", "Hmm, another way to see it: "),
    "affirm": ("Yes, ", "Yeah, so ", "I am confident that "),
    "verify": ("Let me verify ", "Let me check ", "To recap, "),
}
_LATE_KEYWORDS = (" but wait,", " or alternatively,", " so, to recap,")
_DEEP_KEYWORD = " Let me check the units once more."
_TARGET_OPENERS = {
    "negative": ("Wait, no. ", "Hold on. ", "Wait, that is not right. ", "Alternatively, "),
    "verify": ("Let me check this: ", "Let me verify the step: ", "To recap, "),
    "neutral": ("So ", "Right, ", "Indeed, "),
}

# Share of small paragraphs by kind, and of target takeover texts by kind: chosen so that the
# target writes roughly a fifth of the text, as in the paper's 1.5B + 32B runs (0.17 - 0.21).
_SMALL_KINDS = (("neutral", 0.70), ("reflect", 0.12), ("affirm", 0.04), ("verify", 0.05),
                ("late", 0.09))
_TARGET_KINDS = (("negative", 0.45), ("verify", 0.20), ("neutral", 0.35))
_TARGET_SLOT_TOKENS = 230
"""Longer than any single takeover asks for (n1 + n2 = 145, n3 up to 200)."""


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """How to generate the traces of a run; conversation ``k`` gets its own trace."""

    seed: int = 0
    paragraphs: int = 40
    """Small-model paragraphs per trace (~45 tokens each), the closing two included."""
    takeover_free: bool = False
    """Only neutral paragraphs: the small model streams alone (a client throughput test)."""
    rule2: bool = True
    """The target sometimes verifies (rule 2: 125 more tokens). Off, conversations vary less in
    length, so a cell of many is not held up by its few longest."""

    def __post_init__(self) -> None:
        if self.paragraphs < 3:
            raise ValueError(f"a trace needs at least 3 paragraphs, got {self.paragraphs}")


@dataclass(frozen=True)
class Trace:
    """One conversation's script."""

    conversation: int
    question: str
    small: tuple[str, ...]
    """The small model's paragraphs; the answer is ``"\\n\\n".join(small)``, then EOS."""
    closings: tuple[str, ...]
    """Per paragraph slot: what the small model writes after the target took the slot over."""
    target_slots: tuple[str, ...]
    """Per paragraph slot: what the target writes when it takes over there (no EOS)."""
    target_answer: str
    """The target model's own answer, when it writes alone."""

    @cached_property
    def small_answer(self) -> str:
        return "\n\n".join(self.small)

    @cached_property
    def small_tokens(self) -> int:
        return _TOKENIZER.count(self.small_answer)

    @cached_property
    def target_tokens(self) -> int:
        return _TOKENIZER.count(self.target_answer)


def messages_for(trace: Trace) -> list[dict[str, str]]:
    """The chat messages of the trace's conversation."""
    return [{"role": "user", "content": trace.question}]


def conversation_of(prompt: str) -> int:
    """The conversation number a rendered prompt belongs to."""
    found = _PROBLEM.search(last_user_message(prompt) or prompt)
    if found is None:
        raise ValueError("the prompt carries no 'Problem #N:' marker")
    return int(found.group(1))


@lru_cache(maxsize=4096)
def make_trace(spec: TraceSpec, conversation: int) -> Trace:
    """The trace of ``conversation`` under ``spec`` (the same in every call and process)."""
    rng = random.Random(f"specthink-bench/{spec.seed}/{conversation}")
    answer = rng.randint(10, 999)
    question = (f"{INSTRUCTION} Problem #{conversation}: "
                + _sentences(rng, _SMALL_SENTENCES, 4).replace("I ", "we ")
                + " What is the final value?")
    body = spec.paragraphs - 2
    small = [f"Okay, so I need to work out problem {conversation}. "
             + _sentences(rng, _SMALL_SENTENCES, rng.randint(2, 4))]
    for _ in range(body - 1):
        kind = "neutral" if spec.takeover_free else _pick(rng, _SMALL_KINDS)
        small.append(_small_paragraph(rng, kind, deep_keyword=not spec.takeover_free))
    small.append(f"So the result is {answer}.\n</think>")
    small.append(f"The answer is $\\boxed{{{answer}}}$.")
    closings = tuple(rng.choice(_CLOSINGS) for _ in small)
    kinds = _TARGET_KINDS if spec.rule2 else tuple(k for k in _TARGET_KINDS if k[0] != "verify")
    target_slots = tuple(_target_slot(rng, kinds) for _ in small)
    own = [_sentences(rng, _TARGET_SENTENCES, rng.randint(2, 4))
           for _ in range(max(1, round(0.7 * body)))]
    target_answer = "\n\n".join([*own, f"So the result is {answer}.\n</think>",
                                 f"The answer is $\\boxed{{{answer}}}$."])
    trace = Trace(conversation, question, tuple(small), closings, target_slots, target_answer)
    _check(trace, spec)
    return trace


def _pick(rng: random.Random, weights: tuple[tuple[str, float], ...]) -> str:
    roll = rng.random() * sum(weight for _, weight in weights)
    for kind, weight in weights:
        roll -= weight
        if roll < 0:
            return kind
    return weights[-1][0]


def _sentence(rng: random.Random, bank: tuple[str, ...]) -> str:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    return rng.choice(bank).format(noun=rng.choice(_NOUNS), shape=rng.choice(_SHAPES),
                                   var=rng.choice(_VARS), op=rng.choice(_OPS),
                                   ordinal=rng.choice(_ORDINALS), a=a, b=b, c=a * b + 1)


def _sentences(rng: random.Random, bank: tuple[str, ...], count: int) -> str:
    return " ".join(_sentence(rng, bank) for _ in range(count))


def _small_paragraph(rng: random.Random, kind: str, *, deep_keyword: bool) -> str:
    text = _sentences(rng, _SMALL_SENTENCES, rng.randint(2, 4))
    if kind == "neutral":
        if deep_keyword and rng.random() < 0.1 and _TOKENIZER.count(text) > 24:
            # beyond the probe window: must not cause a takeover
            text += _DEEP_KEYWORD
        return text
    if kind == "late":
        # a keyword a few tokens into the window: the probe's first tokens are written for
        # nothing in either loop, and the authors' loop pays for the rest of the 20 as well
        lead = _sentence(rng, _SMALL_SENTENCES).rstrip(".")
        return f"{lead},{rng.choice(_LATE_KEYWORDS)} {text[0].lower()}{text[1:]}"
    return rng.choice(_SMALL_OPENERS[kind]) + text[0].lower() + text[1:]


def _target_slot(rng: random.Random, kinds: tuple[tuple[str, float], ...]) -> str:
    opener = rng.choice(_TARGET_OPENERS[_pick(rng, kinds)])
    text = opener
    while _TOKENIZER.count(text) < _TARGET_SLOT_TOKENS:
        sentence = _sentence(rng, _TARGET_SENTENCES)
        text += (sentence[0].lower() + sentence[1:]) if text == opener else " " + sentence
    return text


def _check(trace: Trace, spec: TraceSpec) -> None:
    """Guard the banks: keywords only where a kind puts them, no stray paragraph breaks."""
    for text in (trace.question, *trace.closings):
        assert not _RULES.has_keyword(text.removeprefix(INSTRUCTION)), text
    for text in (*trace.small, *trace.target_slots, trace.target_answer):
        assert "</s>" not in text
    for text in (*trace.small, *trace.target_slots, *trace.closings):
        assert "\n\n" not in text, text
    if spec.takeover_free:
        for paragraph in trace.small:
            assert not _RULES.has_keyword(paragraph), paragraph
    if not spec.rule2:
        for text in trace.target_slots:
            assert not _RULES.has_verify(text), text


# --------------------------------------------------------------------------- the models


def _slot_and_tail(written: str) -> tuple[int, str]:
    """Which paragraph slot the text is in, and what has been written in it so far."""
    slot = written.count("\n\n")
    at = written.rfind("\n\n")
    return slot, written if at < 0 else written[at + 2:]


class SmallTraceModel:
    """The small model: writes its paragraphs, and after text the target wrote in a slot, a
    short closing clause, then the next paragraphs. Ends with end-of-sequence."""

    def __init__(self, spec: TraceSpec) -> None:
        self.spec = spec

    def continuation(self, prompt: str) -> Continuation:
        trace = make_trace(self.spec, conversation_of(prompt))
        slot, tail = _slot_and_tail(assistant_text(prompt))
        if slot >= len(trace.small):
            return Continuation("")
        paragraph = trace.small[slot]
        if paragraph.startswith(tail):
            head = paragraph[len(tail):]
        else:
            closing = trace.closings[slot]
            done = next(k for k in range(len(closing), -1, -1) if tail.endswith(closing[:k]))
            head = closing[done:]
        rest = trace.small[slot + 1:]
        return Continuation(head + ("\n\n" + "\n\n".join(rest) if rest else ""))


class TargetTraceModel:
    """The target model: its own answer from an empty assistant turn; elsewhere the takeover
    text of the current slot (after rule 3's intervention text too), which never ends."""

    def __init__(self, spec: TraceSpec, intervention_text: str = _RULES.intervention_text) -> None:
        self.spec = spec
        self.intervention_text = intervention_text

    def continuation(self, prompt: str) -> Continuation:
        trace = make_trace(self.spec, conversation_of(prompt))
        written = assistant_text(prompt)
        if trace.target_answer.startswith(written):
            return Continuation(trace.target_answer[len(written):])
        slot, tail = _slot_and_tail(written)
        text = trace.target_slots[min(slot, len(trace.target_slots) - 1)]
        tail = tail.removeprefix(self.intervention_text)
        if text.startswith(tail):
            return Continuation(text[len(tail):], eos=False)
        return Continuation(text, eos=False)
