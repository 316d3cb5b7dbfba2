"""The takeover rules of Speculative Thinking: the numbers, and the decisions (no I/O).

Every number and word list of the paper is a field of :class:`TakeoverRules`, with the paper's
value as the default and ``TakeoverRules.paper()`` as the preset that reproduces the authors' code
to the letter (see ``docs/rules.md``).

:class:`TakeoverPolicy` makes every decision of one answer, in the manner of h11's ``Connection``:
it is told what happened (a small-model token arrived, the small stream ended or dropped, a target
token arrived, the target failed) and answers with what to do (hold, accept, release held tokens,
hand over to the target, extend, intervene, hand back). It never touches a stream, a clock or a
socket, so every transition is testable with plain strings; the engine carries the actions out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._constants import Role
from .errors import ConfigError, SpecthinkError
from .formats import THINK_HERMES, OutputFormat
from .trace import Rule

__all__ = [
    "ACCEPT",
    "HAND_BACK",
    "HOLD",
    "PRESETS",
    "Extend",
    "Handover",
    "Intervene",
    "PolicyStateError",
    "Release",
    "Signal",
    "SmallAction",
    "TakeoverPolicy",
    "TakeoverRules",
    "TargetAction",
    "known_preset",
    "resolve_rules",
]

PAPER_POSITIVE = ("yeah", "yes", "final answer", "confident")
PAPER_NEGATIVE = ("wait", "alternatively", "hold on", "another")
PAPER_VERIFY = ("verify", "think again", "recap", "check")
PAPER_INTERVENTION = "Let me check whether there are some wrong steps:"


class TakeoverRules(BaseModel):
    """When the target model takes over, and for how many tokens.

    Build one from a preset (``TakeoverRules.paper()``) and change fields with
    ``rules.model_copy(update={...})`` or by passing them to the preset.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    delimiter: str = Field(default="\n\n", min_length=1)
    """Text whose completion inside a small-model token makes a trigger point (paper: "\\n\\n")."""
    positive: tuple[str, ...] = PAPER_POSITIVE
    """Affirmation keywords (paper: yeah, yes, final answer, confident)."""
    negative: tuple[str, ...] = PAPER_NEGATIVE
    """Reflection keywords (paper: wait, alternatively, hold on, another)."""
    verify: tuple[str, ...] = PAPER_VERIFY
    """Verification keywords (paper: verify, think again, recap, check)."""
    match: Literal["substring", "word"] = "substring"
    """"substring": lower-cased ``str.count`` as the authors do ("checking" counts as "check");
    "word": only whole words count."""
    probe_tokens: int = Field(default=20, gt=0)
    """Small-model tokens after a trigger point inspected for keywords (paper: 20 tokens)."""
    n1: int = Field(default=20, gt=0)
    """Target tokens written at a rule-1 takeover (paper: 20 tokens)."""
    n2: int = Field(default=125, gt=0)
    """Further target tokens when the rule-1 text holds a verify word (paper: 125 tokens)."""
    n3: int = Field(default=125, gt=0)
    """Target tokens after the intervention text at the first rule-3 takeover (paper: 125)."""
    n3_step: int = Field(default=25, ge=0)
    """Tokens added to ``n3`` after each rule-3 takeover (paper: 25)."""
    n3_max: int = Field(default=200, gt=0)
    """Cap of ``n3`` (paper: 200 tokens)."""
    reflection_threshold: int = Field(default=15, gt=0)
    """Negative rule-1 takeovers that make rule 3 fire (paper: 15)."""
    threshold_step: int = Field(default=5, ge=0)
    """Added to the threshold after each rule-3 takeover (paper: 5; 0 keeps it fixed)."""
    threshold_max: int = Field(default=30, gt=0)
    """Cap of the threshold (paper: 30)."""
    intervention_text: str = PAPER_INTERVENTION
    """Appended after the delimiter before the target's rule-3 tokens."""
    reflection_takeover: bool = True
    """Rule 1 (and with it rule 2) is on."""
    verify_takeover: bool = True
    """Rule 2 is on."""
    excessive_reflection_takeover: bool = True
    """Rule 3 is on."""
    mode: Literal["reasoning", "instruct"] = "reasoning"
    """"instruct": the small model does not reason, so the target writes ``begin_tokens`` first
    and ``n1`` tokens at every trigger, without a probe."""
    begin_tokens: int = Field(default=0, ge=0)
    """Target tokens at the start of the answer (paper, instruct small model: 100)."""
    scope: Literal["all", "thinking"] = "all"
    """"all": rules fire everywhere (paper); "thinking": only before the reasoning ends."""
    thinking_end: str | None = Field(default=None, min_length=1)
    """Where the reasoning ends, for ``scope`` and the statistics; ``None``: where the output
    format closes it (``</think>`` in ``specthink.formats.THINK_HERMES``)."""

    @field_validator("positive", "negative", "verify")
    @classmethod
    def _lower_nonempty_words(cls, words: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(w.lower() for w in words)
        if any(not w.strip() for w in cleaned):
            raise ValueError(f"keywords must be non-empty text, got {list(words)!r}")
        return cleaned

    @model_validator(mode="after")
    def _caps_not_below_start(self) -> Self:
        if self.threshold_max < self.reflection_threshold:
            raise ValueError(
                f"threshold_max ({self.threshold_max}) must be >= reflection_threshold "
                f"({self.reflection_threshold})")
        if self.n3_max < self.n3:
            raise ValueError(f"n3_max ({self.n3_max}) must be >= n3 ({self.n3})")
        if self.mode == "reasoning" and self.reflection_takeover and not self.keywords:
            raise ValueError(
                "reasoning mode needs at least one keyword in positive/negative/verify")
        return self

    # ---- presets -------------------------------------------------------------------------

    @classmethod
    def paper(cls, **overrides: object) -> TakeoverRules:
        """The authors' configuration for a reasoning small model (R1-Distill 1.5B/7B + 32B)."""
        return cls.model_validate(overrides)

    @classmethod
    def paper_instruct(cls, **overrides: object) -> TakeoverRules:
        """The authors' configuration for a non-reasoning small model (Qwen2.5-7B-Instruct)."""
        return cls.model_validate({"mode": "instruct", "begin_tokens": 100, **overrides})

    @classmethod
    def fixed_threshold(cls, threshold: int, **overrides: object) -> TakeoverRules:
        """Ablation: rule 3 with a constant threshold (the authors tried 3 and 50)."""
        return cls.model_validate({"reflection_threshold": threshold, "threshold_step": 0,
                                   "threshold_max": threshold, **overrides})

    @classmethod
    def reduced_keywords(cls, **overrides: object) -> TakeoverRules:
        """Ablation: one keyword per class ("yes", "wait", "verify") instead of four."""
        return cls.model_validate({"positive": ("yes",), "negative": ("wait",),
                                   "verify": ("verify",), **overrides})

    @classmethod
    def preset(cls, name: str) -> TakeoverRules:
        """A preset by name: one of ``PRESETS`` (else a ``ConfigError`` naming them)."""
        return PRESETS[known_preset(name)]()

    # ---- scoring (pure) ------------------------------------------------------------------

    @cached_property
    def keywords(self) -> tuple[str, ...]:
        return self.positive + self.negative + self.verify

    @cached_property
    def _any_keyword(self) -> re.Pattern[str]:
        # One scan for every keyword: a probe window is searched at every held token.
        return re.compile("|".join(re.escape(w) for w in self.keywords))

    @cached_property
    def _word_patterns(self) -> dict[str, re.Pattern[str]]:
        return {w: re.compile(rf"(?<!\w){re.escape(w)}(?!\w)") for w in self.keywords}

    def count(self, text: str, words: tuple[str, ...]) -> int:
        """Occurrences of ``words`` in ``text`` under this rule set's ``match``."""
        lowered = text.lower()
        if self.match == "substring":
            return sum(lowered.count(w) for w in words)
        patterns = self._word_patterns
        return sum(len(patterns[w].findall(lowered)) for w in words)

    def score(self, text: str) -> int:
        """+1 affirmation, -1 reflection or verification (ties with keywords count as -1),
        0 when no keyword occurs: so ``score(text) != 0`` exactly when a keyword occurs."""
        positive = self.count(text, self.positive)
        negative = self.count(text, self.negative) + self.count(text, self.verify)
        if positive > negative:
            return 1
        if negative > positive or (negative == positive and positive > 0):
            return -1
        return 0

    def has_keyword(self, text: str, *, complete: bool = True) -> bool:
        """Whether ``text`` holds any keyword.

        With ``complete=False`` the text may still grow: under ``match="word"`` a keyword that
        touches the end of ``text`` might become part of a longer word, so it does not count yet.
        """
        lowered = text.lower()
        if self.match == "substring":
            return self._any_keyword.search(lowered) is not None
        for pattern in self._word_patterns.values():
            for found in pattern.finditer(lowered):
                if complete or found.end() < len(lowered):
                    return True
        return False

    def has_verify(self, text: str) -> bool:
        """Whether ``text`` holds a verify word (rule 2)."""
        return self.count(text, self.verify) > 0


PRESETS: dict[str, Callable[[], TakeoverRules]] = {
    "paper": TakeoverRules.paper,
    "paper_instruct": TakeoverRules.paper_instruct,
    "fixed_threshold_3": lambda: TakeoverRules.fixed_threshold(3),
    "fixed_threshold_50": lambda: TakeoverRules.fixed_threshold(50),
    "reduced_keywords": TakeoverRules.reduced_keywords,
}


def known_preset(name: object) -> str:
    """``name`` when it is one of ``PRESETS``; else a ``ConfigError`` naming them (also a
    ``ValueError``, so a pydantic field checked with it reports the same message)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown rules preset {name!r}; choose one of {sorted(PRESETS)}",
                          field="rules")
    return name


def resolve_rules(rules: TakeoverRules | str) -> TakeoverRules:
    """``rules`` itself, or the preset it names (an unknown name is a ``ConfigError``)."""
    if isinstance(rules, TakeoverRules):
        return rules
    return TakeoverRules.preset(rules)


# ---- the policy: events in, actions out ---------------------------------------------------------

class Signal(Enum):
    """The policy's frequent answers, which carry no data (so a token costs no allocation)."""

    HOLD = "hold"
    """Nothing to carry out now: what is held stays held, read the next token."""
    ACCEPT = "accept"
    """Accept the token just given as it is (no probe window is open), read the next one."""
    HAND_BACK = "hand_back"
    """The target's part is over (its last token is accepted): close its stream, and the small
    model writes again."""


HOLD: Final = Signal.HOLD
ACCEPT: Final = Signal.ACCEPT
HAND_BACK: Final = Signal.HAND_BACK


@dataclass(frozen=True, slots=True)
class Handover:
    """Close the small model's stream and let the target write ``tokens`` tokens.

    The ``discard`` held probe tokens are thrown away (never shown, never in the text); one
    target request may ask for ``up_to`` tokens, since rule 2 may extend the takeover after
    ``tokens`` (the policy answers :class:`Extend` or ``HAND_BACK`` then).
    """

    rule: Rule
    tokens: int
    discard: int = 0
    up_to: int = 0

    def __post_init__(self) -> None:
        if self.up_to < self.tokens:
            object.__setattr__(self, "up_to", self.tokens)


@dataclass(frozen=True, slots=True)
class Intervene(Handover):
    """Rule 3: accept ``text`` (the intervention) after the delimiter, then the target writes
    ``tokens`` (the current ``n3``)."""

    text: str = ""


@dataclass(frozen=True, slots=True)
class Extend:
    """Rule 2: the target's first tokens held a verify word, so it goes on for ``tokens`` more
    under ``rule`` (the same request continues)."""

    rule: Rule
    tokens: int


@dataclass(frozen=True, slots=True)
class Release:
    """Held probe tokens turned out neutral: accept ``text`` (``tokens`` small-model tokens) as
    small-model text, then carry out ``then``."""

    text: str
    tokens: int
    then: SmallAction


SmallAction = Signal | Release | Handover
"""What the policy answers to a small-model event: ``HOLD``, ``ACCEPT``, a :class:`Release`
(followed by its ``then``), or a :class:`Handover` / :class:`Intervene`."""
TargetAction = Signal | Extend
"""What the policy answers to a target token (always accepted first): ``ACCEPT`` (read on),
an :class:`Extend`, or ``HAND_BACK``."""


class PolicyStateError(SpecthinkError, RuntimeError):
    """The policy was told of an event its state does not allow (a bug in its caller), such as
    a small-model token while the target holds the turn."""


@dataclass(slots=True)
class _Window:
    """An open probe window: held tokens from ``start`` on belong to it."""

    start: int
    pending_delimiter: str
    """The small run's delimiter tail as it was when the window opened (to resume from)."""


class TakeoverPolicy:
    """Every takeover decision of one answer, as a state machine without I/O.

    One policy per answer. Its caller (the engine) streams tokens and reports what happened; the
    policy answers with what to do::

        policy = TakeoverPolicy(rules)
        handover = policy.start()            # instruct preset: the target begins
        action = policy.small_token(" Wait")   # HOLD, ACCEPT, Release(...), Handover(...)
        action = policy.small_ended()          # windows close with what they hold
        policy.small_dropped()                 # held tokens go back to the earliest window
        action = policy.target_token(" so")    # ACCEPT, Extend(...), HAND_BACK
        policy.target_failed()                 # no more handoffs: the small model goes on alone

    While the small model writes, ``handover`` is ``None``; a :class:`Handover` or
    :class:`Intervene` answer puts it there until the target's part ends (``HAND_BACK`` or
    ``target_failed``). The counters of rule 3 (``reflection_count``, ``reflection_threshold``,
    ``n3``) and the scope live here too; an event the state does not allow raises
    :class:`PolicyStateError`.

    ``handoffs=False`` keeps the small model alone from the start (grammar-constrained output,
    whose grammar would restart with every request).
    """

    __slots__ = (
        "_count", "_counts_reflection", "_delimiter", "_end_tail", "_extend", "_first",
        "_first_parts", "_got", "_handoffs", "_handover", "_held", "_in_scope", "_instruct",
        "_n3", "_pending", "_probe", "_started", "_tail_len", "_threshold", "_up_to",
        "_watch_scope", "_windows", "output_format", "rules",
    )

    def __init__(self, rules: TakeoverRules, *, handoffs: bool = True,
                 output_format: OutputFormat = THINK_HERMES) -> None:
        self.rules = rules
        self.output_format = output_format.with_reasoning_end(rules.thinking_end)
        """The output's markup, the reasoning closed where the rules say."""
        self._delimiter = rules.delimiter
        self._tail_len = len(rules.delimiter) - 1
        self._probe = rules.probe_tokens
        self._instruct = rules.mode == "instruct"
        self._handoffs = handoffs
        self._in_scope = True
        self._watch_scope = rules.scope == "thinking"
        self._end_tail = ""
        self._count = 0
        self._threshold = rules.reflection_threshold
        self._n3 = rules.n3
        self._extend = Extend(Rule.VERIFY, rules.n2)
        self._started = False
        # the small model's run
        self._pending = ""
        self._held: list[str] = []
        self._windows: list[_Window] = []
        # the target's part
        self._handover: Handover | None = None
        self._got = 0
        self._first = 0
        self._up_to = 0
        self._counts_reflection = False
        self._first_parts: list[str] = []

    def __repr__(self) -> str:
        return (f"TakeoverPolicy(state={self.state!r}, held={len(self._held)}, "
                f"windows={len(self._windows)}, reflection_count={self._count}, "
                f"reflection_threshold={self._threshold}, n3={self._n3}, "
                f"in_scope={self._in_scope}, handoffs={self._handoffs})")

    # ---- state (read-only) -----------------------------------------------------------------

    @property
    def state(self) -> Role:
        """Who holds the turn: the small model, or the target during a takeover."""
        return "small" if self._handover is None else "target"

    @property
    def handover(self) -> Handover | None:
        """The takeover being carried out, or ``None`` while the small model writes."""
        return self._handover

    @property
    def target_left(self) -> int:
        """Target tokens this takeover may still take (``up_to`` minus those written)."""
        return self._up_to - self._got if self._handover is not None else 0

    @property
    def held(self) -> tuple[str, ...]:
        """Small-model tokens held back in open probe windows (not accepted yet)."""
        return tuple(self._held)

    @property
    def reflection_count(self) -> int:
        """``c``: rule-1 target texts that scored negative since the last rule-3 takeover."""
        return self._count

    @property
    def reflection_threshold(self) -> int:
        """``c_threshold``: rule 3 fires at a trigger once ``reflection_count`` reaches it."""
        return self._threshold

    @property
    def n3(self) -> int:
        """Target tokens of the next rule-3 takeover."""
        return self._n3

    @property
    def in_scope(self) -> bool:
        """Rules may fire here (``scope="thinking"`` ends it at ``thinking_end``)."""
        return self._in_scope

    @property
    def handoffs(self) -> bool:
        """Takeovers may still happen (false once the target failed, or when constrained)."""
        return self._handoffs

    # ---- events --------------------------------------------------------------------------

    def start(self) -> Handover | None:
        """The answer begins: the instruct preset hands the first ``begin_tokens`` to the
        target; otherwise the small model writes (``None``)."""
        if self._started:
            raise PolicyStateError("start() was already called for this answer")
        self._started = True
        rules = self.rules
        if self._instruct and rules.begin_tokens and self._handoffs and self._in_scope:
            return self._hand_over(Handover(Rule.BEGIN, rules.begin_tokens), counts=False)
        return None

    def small_token(self, text: str) -> SmallAction:
        """A small-model token (its text; special tokens are not reported) arrived."""
        if self._handover is not None:
            raise self._refuse("a small-model token")
        releases: list[tuple[str, int]] | None = None
        if self._windows:
            self._held.append(text)
            releases, takeover = self._resolve(complete=False)
            if takeover is not None:
                return _chain(releases, takeover)
        elif self._watch_scope:
            self._note_accepted(text)
        # A trigger point is the end of the token in which the delimiter completes; the tail of
        # the run's text since the last delimiter is all that can complete one.
        combined = self._pending + text
        cut = combined.rfind(self._delimiter)
        tail_len = self._tail_len
        if cut < 0:
            self._pending = combined[-tail_len:] if tail_len else ""
        else:
            after = combined[cut + len(self._delimiter):]
            self._pending = after[-tail_len:] if tail_len else ""
            if self._handoffs and self._in_scope:
                decided = self._trigger()
                if decided is not None:
                    if releases is None:
                        return Release(text, 1, decided)  # the trigger token itself is accepted
                    return _chain(releases, decided)
        if releases is None:
            return ACCEPT
        return _chain(releases, HOLD) if releases else HOLD

    def small_ended(self) -> SmallAction:
        """The small model's stream ended (end-of-sequence or a length limit): open windows
        close with what they hold."""
        if self._handover is not None:
            raise self._refuse("the end of a small-model stream")
        if not self._windows:
            return HOLD
        releases, takeover = self._resolve(complete=True)
        return _chain(releases, takeover if takeover is not None else HOLD)

    def small_dropped(self) -> None:
        """The small model's stream broke: held tokens were never accepted, so everything goes
        back to the earliest open window, whose tokens the resumed stream writes again."""
        if self._handover is not None:
            raise self._refuse("a dropped small-model stream")
        windows = self._windows
        if windows:
            self._pending = windows[0].pending_delimiter
            del windows[1:]
            windows[0].start = 0
            self._held.clear()

    def target_token(self, text: str) -> TargetAction:
        """A target token arrived (and is accepted, whatever the answer)."""
        if self._handover is None:
            raise self._refuse("a target token")
        if self._watch_scope:
            self._note_accepted(text)
        got = self._got = self._got + 1
        first = self._first
        if got <= first and self._counts_reflection:
            self._first_parts.append(text)
        if got == first:
            if self._counts_reflection:
                rules = self.rules
                written = "".join(self._first_parts)
                if rules.score(written) < 0:
                    self._count += 1
                if self._up_to > first and rules.has_verify(written):
                    return self._extend
            return self._hand_back()
        if got >= self._up_to:
            return self._hand_back()
        return ACCEPT

    def target_failed(self) -> None:
        """The target failed (and the caller chose to go on): the small model writes alone,
        from a fresh run."""
        self._handoffs = False
        self._handover = None

    # ---- internals -----------------------------------------------------------------------

    def _trigger(self) -> Handover | None:
        """At a trigger point with handoffs allowed and in scope."""
        rules = self.rules
        if self._instruct:
            return self._hand_over(self._rule1(Rule.EVERY_TRIGGER, 0), counts=True)
        if (rules.excessive_reflection_takeover and not self._windows
                and self._count >= self._threshold):
            return self._intervene()
        if rules.reflection_takeover:
            self._windows.append(_Window(len(self._held), self._pending))
        return None

    def _rule1(self, rule: Rule, discard: int) -> Handover:
        rules = self.rules
        extra = rules.n2 if rules.verify_takeover else 0
        return Handover(rule, rules.n1, discard, rules.n1 + extra)

    def _intervene(self) -> Intervene:
        rules = self.rules
        n3 = self._n3
        # Nothing reads the counters while the target writes its n3 tokens, so they adapt now.
        self._count = 0
        self._n3 = min(n3 + rules.n3_step, rules.n3_max)
        self._threshold = min(self._threshold + rules.threshold_step, rules.threshold_max)
        if self._watch_scope:
            self._note_accepted(rules.intervention_text)
        intervene = Intervene(Rule.EXCESSIVE_REFLECTION, n3, text=rules.intervention_text)
        self._hand_over(intervene, counts=False)
        return intervene

    def _hand_over(self, handover: Handover, *, counts: bool) -> Handover:
        self._handover = handover
        self._got = 0
        self._first = handover.tokens
        self._up_to = handover.up_to
        self._counts_reflection = counts
        self._first_parts = []
        # the small model's next run starts afresh: its probe was thrown away
        self._pending = ""
        self._held = []
        self._windows = []
        return handover

    def _hand_back(self) -> Signal:
        self._handover = None
        return HAND_BACK

    def _resolve(self, *, complete: bool) -> tuple[list[tuple[str, int]], Handover | None]:
        """Decide open windows in order: the earliest whose probe holds a keyword wins.

        Held tokens before the earliest open window are released (returned as (text, tokens)),
        so that the earliest open window starts at 0 again.
        """
        rules = self.rules
        probe = self._probe
        held = self._held
        windows = self._windows
        releases: list[tuple[str, int]] = []
        while windows:
            first = windows[0]
            end = first.start + probe
            window_complete = complete or len(held) >= end
            if rules.has_keyword("".join(held[first.start:end]), complete=window_complete):
                # Substring keywords never disappear as text grows (and word matches wait for
                # the next character), so the decision is final the moment one completes.
                takeover = self._rule1(Rule.AFFIRM_REFLECT, len(held) - first.start)
                return releases, self._hand_over(takeover, counts=True)
            if not window_complete:
                break
            windows.pop(0)
            release = windows[0].start if windows else len(held)
            if release:
                text = "".join(held[:release])
                releases.append((text, release))
                if self._watch_scope:
                    self._note_accepted(text)
                del held[:release]
                for window in windows:
                    window.start -= release
        return releases, None

    def _note_accepted(self, text: str) -> None:
        """``scope="thinking"``: the rules stop once the reasoning has closed."""
        if not self._in_scope:
            return
        end = self.output_format.reasoning.close
        seen = self._end_tail + text
        if end in seen:
            self._in_scope = False
        else:
            keep = len(end) - 1
            self._end_tail = seen[-keep:] if keep else ""

    def _refuse(self, what: str) -> PolicyStateError:
        return PolicyStateError(f"{what} while the {self.state} model holds the turn ({self!r})")


def _chain(releases: list[tuple[str, int]] | None, last: SmallAction) -> SmallAction:
    action = last
    for text, tokens in reversed(releases or ()):
        action = Release(text, tokens, action)
    return action
