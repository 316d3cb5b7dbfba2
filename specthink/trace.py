"""Events the engine yields, and the statistics of one request."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

from .formats import THINK_HERMES, OutputFormat

Source = Literal["small", "target", "intervention"]


class Rule(StrEnum):
    """Why the target model wrote a piece of text."""

    AFFIRM_REFLECT = "rule1"
    """Rule 1: the probe after a trigger held an affirmation or reflection keyword."""
    VERIFY = "rule2"
    """Rule 2: the target's own rule-1 text held a verify word, so it writes ``n2`` more tokens."""
    EXCESSIVE_REFLECTION = "rule3"
    """Rule 3: the reflection counter reached its threshold; intervention text, then ``n3``."""
    BEGIN = "begin"
    """Instruct preset: the target writes the opening ``begin_tokens``."""
    EVERY_TRIGGER = "every_trigger"
    """Instruct preset: the target writes ``n1`` tokens at every trigger, without a probe."""

    @property
    def label(self) -> str:
        """How traces and reports name the rule."""
        return _RULE_LABELS.get(self, self.value)

    @property
    def hands_over(self) -> bool:
        """The rule hands control to the target (a new target request); rule 2 only
        lengthens a rule-1 takeover."""
        return self is not Rule.VERIFY


_RULE_LABELS: dict[Rule, str] = {
    Rule.AFFIRM_REFLECT: "rule 1 · affirmation/reflection",
    Rule.VERIFY: "rule 2 · verification",
    Rule.EXCESSIVE_REFLECTION: "rule 3 · excessive reflection",
    Rule.BEGIN: "begin · the target opens the answer",
    Rule.EVERY_TRIGGER: "every trigger (instruct preset)",
}


REASONING_START = THINK_HERMES.reasoning.open
"""The default format's reasoning tag (``specthink.formats.THINK_HERMES``)."""


@dataclass(frozen=True, slots=True)
class StartEvent:
    """The first event of every stream, before any text: how to read the output.

    ``starts_in_reasoning`` is true when the small model's rendered prompt opened the reasoning
    (DeepSeek-R1 and Qwen3 templates end the generation prompt with ``<think>``), so the output
    begins inside it without an opening tag. The engine decides this once, from the prompt it
    sends; ``specthink.output.OutputSplitter`` reads it, so no adapter decides for itself.
    """

    starts_in_reasoning: bool
    output_format: OutputFormat = THINK_HERMES
    """How the output marks reasoning and tool calls (with the rules' ``thinking_end``)."""
    routing_key: str = ""
    """The key sent with every generation request of this call (routing headers)."""
    tool_names: tuple[str, ...] | None = None
    """The tools whose calls count (``ChatRequest.tool_names``); ``None``: tool-call markup
    stays text."""
    max_tool_calls: int | None = None
    """``1`` when the request asked for no parallel tool calls."""
    tool_schemas: tuple[dict[str, Any], ...] = ()
    """The counted tools' OpenAI objects: a response template's string arguments (XML calls)
    are cast to the types their schemas name."""

    @property
    def reasoning_start(self) -> str:
        return self.output_format.reasoning.open

    @property
    def reasoning_end(self) -> str:
        return self.output_format.reasoning.close


@dataclass(frozen=True, slots=True)
class TextEvent:
    """Accepted text, in order. Concatenating every ``text`` gives the final output."""

    source: Source
    text: str
    rule: Rule | None = None
    """``None`` for the small model's own text; the takeover rule for target/intervention text."""


@dataclass(frozen=True, slots=True)
class TakeoverEvent:
    """A takeover was decided at ``offset`` (characters of accepted text)."""

    rule: Rule
    offset: int
    discarded_tokens: int = 0
    """Small-model probe tokens thrown away by this takeover."""


@dataclass(frozen=True, slots=True)
class FallbackEvent:
    """The target failed; the small model continues alone (``on_target_error="fallback"``)."""

    offset: int
    error: str


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """The last event of a stream: the whole result, statistics included."""

    result: Result


Event = StartEvent | TextEvent | TakeoverEvent | FallbackEvent | FinishEvent


def _per_role() -> dict[str, int]:
    return {"small": 0, "target": 0}


def _per_role_float() -> dict[str, float]:
    return {"small": 0.0, "target": 0.0}


@dataclass(slots=True)
class Statistics:
    """Per-request statistics; adapters copy ``to_dict()`` out as is."""

    small_tokens: int = 0
    target_tokens: int = 0
    intervention_tokens: int = 0
    reasoning_tokens: int = 0
    """Accepted tokens inside the reasoning section (``<think>`` ... ``</think>``)."""
    discarded_tokens: int = 0
    """Small-model probe tokens thrown away at takeovers (never shown, never in the text)."""
    input_tokens: int = 0
    """Prompt tokens of the conversation's first small-model request."""
    takeovers: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in Rule})
    requests: dict[str, int] = field(default_factory=_per_role)
    """HTTP generation requests sent to each model, retries included."""
    retries: dict[str, int] = field(default_factory=_per_role)
    """Requests repeated after an overload, an outage or a dropped stream."""
    resumed_streams: dict[str, int] = field(default_factory=_per_role)
    """Streams that broke mid-way and were resumed from the accepted text."""
    wait_seconds: dict[str, float] = field(default_factory=_per_role_float)
    """Time spent waiting on each model (request start and every token)."""
    fallback: bool = False
    """The target failed and the small model finished alone."""
    fallback_error: str | None = None
    finish_reason: str | None = None
    """``"stop"`` (end-of-sequence or a stop sequence) or ``"length"`` (budget spent)."""

    @property
    def output_tokens(self) -> int:
        return self.small_tokens + self.target_tokens + self.intervention_tokens

    @property
    def target_share(self) -> float:
        """Share of output tokens written by the target model (the paper's "modify ratio")."""
        total = self.output_tokens
        return self.target_tokens / total if total else 0.0

    @property
    def total_takeovers(self) -> int:
        return sum(self.takeovers.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_tokens"] = self.output_tokens
        data["target_share"] = round(self.target_share, 6)
        data["wait_seconds"] = {k: round(v, 6) for k, v in self.wait_seconds.items()}
        return data


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of ``SpeculativeThinker.agenerate``."""

    text: str
    events: tuple[Event, ...]
    stats: Statistics
    starts_in_reasoning: bool = False
    """The prompt opened the reasoning (see :class:`StartEvent`)."""
    output_format: OutputFormat = THINK_HERMES
    models: dict[str, str] = field(default_factory=dict)
    """Model id of each role as its server reported it (``"small"``, ``"target"``)."""
    tool_names: tuple[str, ...] | None = None
    """The tools whose calls count, as on the :class:`StartEvent`."""
    max_tool_calls: int | None = None
    tool_schemas: tuple[dict[str, Any], ...] = ()
    """As on the :class:`StartEvent`."""

    @property
    def reasoning_start(self) -> str:
        return self.output_format.reasoning.open

    @property
    def reasoning_end(self) -> str:
        return self.output_format.reasoning.close

    @property
    def model_name(self) -> str:
        """The pair's name: the servers' model ids joined by ``+``."""
        return "+".join(self.models[role] for role in ("small", "target") if role in self.models)

    @property
    def finish_reason(self) -> str | None:
        return self.stats.finish_reason

    def segments(self) -> list[TextEvent]:
        """Accepted text merged into runs of the same source and rule."""
        merged: list[TextEvent] = []
        for event in self.events:
            if not isinstance(event, TextEvent):
                continue
            if merged and (merged[-1].source, merged[-1].rule) == (event.source, event.rule):
                merged[-1] = TextEvent(event.source, merged[-1].text + event.text, event.rule)
            else:
                merged.append(event)
        return merged

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready trace: text, merged segments, takeovers and statistics."""
        return {
            "text": self.text,
            "segments": [
                {"source": s.source, "rule": s.rule.value if s.rule else None, "text": s.text}
                for s in self.segments()
            ],
            "takeovers": [
                {"rule": e.rule.value, "offset": e.offset, "discarded_tokens": e.discarded_tokens}
                for e in self.events if isinstance(e, TakeoverEvent)
            ],
            "stats": self.stats.to_dict(),
        }
