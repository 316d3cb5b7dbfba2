"""How a model's output is marked up: the one place that knows it.

An :class:`OutputFormat` is data, in the shape of a response template's ``fields`` (see
DESIGN.md, "Model formats"): for the reasoning and for a tool call, the text that opens and the
text that closes it, and how a call's body is written. The engine reads it (does the prompt open
the reasoning? which accepted tokens are reasoning?), the takeover policy reads where the
reasoning ends (``scope="thinking"``), and :class:`~specthink.output.OutputSplitter` reads all of
it to split accepted text into reasoning, answer and tool calls. It travels with every stream on
the :class:`~specthink.trace.StartEvent` and on the ``Result``.

:data:`THINK_HERMES` (the default) is DeepSeek-R1 / QwQ / Qwen3: ``<think>`` ... ``</think>``,
and Hermes calls ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. Other families'
formats (gpt-oss harmony, Gemma 4, Mistral ``[THINK]``, Qwen3.5 XML calls) are further
instances, built from their response templates in modules beside this one.

:func:`held_back` is the one hold-back rule of the library: the end of a text that may still
become a marker (or a stop sequence) is not shown until the next piece decides.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .response_template import ResponseTemplate

__all__ = ["THINK_HERMES", "CallContent", "CallOpener", "OutputFormat", "Span", "held_back"]

CallContent = Literal["json"]
"""How a tool call's body is written: ``json`` is ``{"name": ..., "arguments": {...}}``
(Hermes). The names follow the response templates' ``content`` (``json``, ``xml-inline``)."""


@dataclass(frozen=True, slots=True)
class Span:
    """One field of the output: the text that opens it and the text that closes it."""

    open: str
    close: str

    def __post_init__(self) -> None:
        if not self.open or not self.close:
            raise ValueError(f"a span needs an opening and a closing text, got {self!r}")


@dataclass(frozen=True, slots=True)
class CallOpener:
    """How a format's model begins a tool call, so that the engine can write it when the caller
    requires one (``tool_choice`` "required" or a function) and leave the rest to the model.

    Data beside a built-in response template (its ``specthink.call_opener`` key, which
    transformers' part of the template does not have): ``named`` is everything the model
    writes of a call of NAME before its arguments (``{name}`` stands for NAME, and the text
    must end the name so the model cannot lengthen it), ``any`` everything before the name
    (the model then chooses the tool), ``after_reasoning`` what the model writes between the
    reasoning's end and a call (none at the start of an answer).
    """

    named: str
    any: str
    after_reasoning: str = ""
    hermes_json: bool = False
    """The call goes on as Hermes JSON (``{"name": ..., "arguments": {...}}`` inside the
    format's ``tool_call`` span): the servers' call grammars (``Backend.call_grammar``) fit
    what the model writes next, and the engine can close a call such a grammar ended."""

    def __post_init__(self) -> None:
        if self.named.count("{name}") != 1 or not self.any:
            raise ValueError(f"a call opener needs a 'named' text with one {{name}} and an "
                             f"'any' text, got {self!r}")

    def text(self, name: str | None) -> str:
        """The opener of a call of ``name`` (``None``: of any tool, up to its name)."""
        if name is None:
            return self.any
        # A JSON string's inside (Hermes); other formats write the name as it is.
        return self.named.replace("{name}", json.dumps(name)[1:-1] if self.hermes_json else name)

    @classmethod
    def hermes(cls, open_tag: str) -> CallOpener:
        """Hermes/Qwen JSON calls opened by ``open_tag`` (``<tool_call>``)."""
        return cls(named=open_tag + '\n{"name": "{name}", "arguments": ',
                   any=open_tag + '\n{"name": "', after_reasoning="\n\n", hermes_json=True)

    @classmethod
    def from_spec(cls, spec: object) -> CallOpener:
        """The ``call_opener`` object of a response template's ``specthink`` key; a malformed
        one is a ``ValueError`` saying what is wrong."""
        if not isinstance(spec, dict):
            raise ValueError("'call_opener' must be an object")
        fields = {"named": str, "any": str, "after_reasoning": str, "hermes_json": bool}
        if unknown := set(spec) - set(fields):
            raise ValueError(f"'call_opener': unknown keys {sorted(unknown)}")
        for key, kind in fields.items():
            if key in spec and not isinstance(spec[key], kind):
                raise ValueError(f"'call_opener': {key!r} must be a {kind.__name__}")
        if "named" not in spec or "any" not in spec:
            raise ValueError("'call_opener' needs 'named' and 'any'")
        return cls(**spec)


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """How reasoning and tool calls are marked in a model's output."""

    name: str
    reasoning: Span
    """Where the reasoning opens and closes. A prompt that ends with ``reasoning.open`` (the
    generation prompts of DeepSeek-R1 and Qwen3 templates) starts the output inside it."""
    tool_call: Span
    """Where one tool call opens and closes."""
    tool_call_content: CallContent = "json"
    template: ResponseTemplate | None = None
    """The response template the format was built from (:meth:`from_template`): then it, not
    the spans, splits the output (``specthink.formats.splitting``), decides where the output
    starts, and its markers may be special tokens the server must keep as text."""

    @classmethod
    def from_template(cls, template: ResponseTemplate, name: str = "response-template",
                      ) -> OutputFormat:
        """The format a response template describes. The spans carry its literal reasoning
        markers (what the policy and the engine's hold-back read); a template whose reasoning
        is not delimited by literals keeps the default's."""
        field = template.fields.get(template.reasoning_field or "")
        opens = field.open.literals if field is not None and field.open is not None else None
        closes = template.reasoning_closers
        reasoning = Span(opens[0], closes[0]) if opens and closes else THINK_HERMES.reasoning
        return cls(name=name, reasoning=reasoning, tool_call=THINK_HERMES.tool_call,
                   template=template)

    def opened_by(self, prompt: str) -> bool:
        """Whether ``prompt`` opens the reasoning, so the output begins inside it (with a
        template: its last assistant turn opens the reasoning and does not close it)."""
        if self.template is not None:
            return self.template.starts_in_reasoning(prompt)
        return prompt.rstrip().endswith(self.reasoning.open)

    def model_opens_reasoning(self, prompt: str) -> bool:
        """Whether the model is expected to open the reasoning itself, in its own output, after
        ``prompt``. A format built from a family's response template reads that family's
        opener from the output, where its models write it (harmony's
        ``<|channel|>analysis<|message|>``, Mistral's ``[THINK]``, Gemma 4's
        ``<|channel>thought``, a hybrid Qwen3's ``<think>``): yes, unless the prompt's
        assistant turn already closed a reasoning (the chat template's thinking switched off).
        The default format, meant for any model, cannot tell an instruct model (which writes
        no ``<think>``) from one that writes it: no."""
        template = self.template
        return (template is not None and template.reasoning_field is not None
                and not template.closes_reasoning(prompt))

    @property
    def call_opener(self) -> CallOpener | None:
        """How the engine begins a call the caller requires, or ``None`` when this format
        cannot be opened (a response template that declares no ``specthink.call_opener``):
        the format's template's, else Hermes JSON in the format's ``tool_call`` span."""
        if self.template is not None:
            return self.template.call_opener
        return CallOpener.hermes(self.tool_call.open)

    @property
    def markers(self) -> tuple[str, ...]:
        """Every marker text of the format."""
        return (self.reasoning.open, self.reasoning.close, self.tool_call.open,
                self.tool_call.close)

    def with_reasoning_end(self, end: str | None) -> OutputFormat:
        """This format with the reasoning closed by ``end`` (``None``: as it is); the rules'
        ``thinking_end`` overrides it this way."""
        if end is None or end == self.reasoning.close:
            return self
        return dataclasses.replace(self, reasoning=Span(self.reasoning.open, end))


THINK_HERMES = OutputFormat(name="think-hermes", reasoning=Span("<think>", "</think>"),
                            tool_call=Span("<tool_call>", "</tool_call>"))
"""The default format: ``<think>`` reasoning and Hermes/Qwen ``<tool_call>`` JSON calls."""


def held_back(text: str, markers: Iterable[str]) -> int:
    """How many characters at the end of ``text`` may still be the beginning of one of
    ``markers`` (a tag, a stop sequence): the longest end of ``text`` that is a proper beginning
    of a marker, or 0."""
    longest = 0
    for marker in markers:
        for size in range(min(len(text), len(marker) - 1), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest
