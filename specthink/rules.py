"""The takeover rules of Speculative Thinking, as data and pure functions (no I/O).

Every number and word list of the paper is a field, with the paper's value as the default and
``TakeoverRules.paper()`` as the preset that reproduces the authors' code to the letter
(see ``docs/rules.md``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cached_property
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["PRESETS", "TakeoverRules"]

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
    """"all": rules fire everywhere (paper); "thinking": only before ``thinking_end``."""
    thinking_end: str = Field(default="</think>", min_length=1)

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
        """A preset by name: one of ``PRESETS``."""
        try:
            factory = PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown rules preset {name!r}; choose one of {sorted(PRESETS)}") from None
        return factory()

    # ---- scoring (pure) ------------------------------------------------------------------

    @cached_property
    def keywords(self) -> tuple[str, ...]:
        return self.positive + self.negative + self.verify

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
            return any(w in lowered for w in self.keywords)
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
