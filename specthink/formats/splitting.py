"""A model's accepted text split by its response template: reasoning and answer pieces as they
are settled, the tool calls at the end. The template-driven counterpart of
:class:`specthink.output.OutputSplitter`, for every family the templates describe.

Whether the output starts inside the reasoning is read from the prompt's tail (the part of the
assistant turn the chat template already wrote, such as an opening ``<think>``). A call the
model drafts inside its reasoning is reasoning (the reasoning region watches only its own end),
a call naming a function that was not offered is no call, and a call whose content cannot be
read is shown as answer text. Without tools offered, call markup is answer text, as it is today.

>>> from specthink.formats.families import builtin_template
>>> splitter = TemplateSplitter(builtin_template("gpt-oss"), "<|start|>assistant",
...                             tools=["add"])
>>> splitter.feed("<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant")
[('reasoning', 'Add them.')]
>>> _ = splitter.feed('<|channel|>commentary to=functions.add <|constrain|>json<|message|>')
>>> _ = splitter.feed('{"a": 2, "b": 2}')
>>> [(c.name, c.arguments) for c in splitter.finish().tool_calls]
[('add', {'a': 2, 'b': 2})]
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..tools import ToolCall
from .response_template import ResponseParser, ResponseTemplate, load_template

__all__ = ["NO_TOOL", "SplitKind", "TemplateSplit", "TemplateSplitter"]

NO_TOOL = "no_tool"
"""TGI's pseudo-function for "answer without a tool"; its ``content`` argument is the answer."""

SplitKind = Literal["reasoning", "answer"]


@dataclass(frozen=True, slots=True)
class TemplateSplit:
    """The end of a stream: the pieces held until now and the whole output split."""

    pieces: list[tuple[SplitKind, str]]
    reasoning: str
    answer: str
    """Every answer region joined, stripped (the shown answer pieces join to it)."""
    tool_calls: list[ToolCall] = field(default_factory=list)


_WITHOUT_CALLS: dict[int, tuple[ResponseTemplate, ResponseTemplate]] = {}


def _without_calls(template: ResponseTemplate) -> ResponseTemplate:
    """The template with no ``tool_calls`` region (compiled once per template): with no tool
    offered, call markup stays answer text."""
    known = _WITHOUT_CALLS.get(id(template))
    if known is None or known[0] is not template:
        spec = dict(template.spec)
        spec["fields"] = {k: v for k, v in spec["fields"].items() if k != "tool_calls"}
        known = _WITHOUT_CALLS[id(template)] = (template, load_template(spec))
    return known[1]


class _Shown:
    """One kind's text as shown: leading space dropped, trailing space held until more text
    follows, so the pieces join to the stripped whole."""

    __slots__ = ("held", "parts", "started")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.held = ""
        self.started = False

    def add(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.held += text
            return ""
        shown = self.held + body
        self.held = text[len(body):]
        self.parts.append(shown)
        return shown

    @property
    def text(self) -> str:
        return "".join(self.parts)


class TemplateSplitter:
    """Accepted text in, ``(kind, text)`` pieces out; :meth:`finish` gives the calls.

    ``tools`` names the offered functions (or holds OpenAI tool objects, whose schemas also
    cast call arguments); ``max_tool_calls=1`` keeps the first call only.
    ``starts_in_reasoning``, when the caller decided it already (the engine's ``StartEvent``),
    stands for the prompt.
    """

    def __init__(self, template: ResponseTemplate, prompt: str = "", *,
                 tools: Iterable[str | Mapping[str, Any]] | None = None,
                 max_tool_calls: int | None = None,
                 starts_in_reasoning: bool | None = None) -> None:
        if starts_in_reasoning is not None:
            field = template.fields.get(template.reasoning_field or "")
            opener = field.open.literals if field is not None and field.open else None
            prompt = opener[0] if starts_in_reasoning and opener else ""
        offered = list(tools or ())
        self.tool_names = frozenset(
            t if isinstance(t, str) else str((t.get("function") or t).get("name"))
            for t in offered)
        schemas = [t for t in offered if not isinstance(t, str)]
        self.max_tool_calls = max_tool_calls
        self._reasoning_field = template.reasoning_field
        self._calls_field = "tool_calls" if self.tool_names else None
        used = template if self.tool_names or template.tool_calls_field is None \
            else _without_calls(template)
        self._parser = ResponseParser(used, prompt, tools=schemas or None, malformed="text")
        self.starts_in_reasoning = (self._reasoning_field is not None
                                    and self._parser.current == self._reasoning_field)
        self._reasoning = _Shown()
        self._answer = _Shown()
        self._extra: list[str] = []
        self._calls: list[ToolCall] = []
        self._pending = self._pieces(self._parser.initial_events)

    def feed(self, text: str) -> list[tuple[SplitKind, str]]:
        """The next accepted text; the pieces that can be shown now."""
        out = self._pieces(self._parser.feed(text))
        if self._pending:
            out, self._pending = self._pending + out, []
        return out

    def finish(self) -> TemplateSplit:
        """End of the output: what was held, and the whole output split."""
        _, events = self._parser.finalize()
        pieces = self._pending + self._pieces(events)
        answer = self._answer.text
        if self._extra:
            answer = "\n\n".join([answer, *self._extra] if answer else self._extra)
        calls = self._calls[:self.max_tool_calls] if self.max_tool_calls is not None \
            else self._calls
        return TemplateSplit(pieces=pieces, reasoning=self._reasoning.text, answer=answer,
                             tool_calls=calls)

    def _pieces(self, events: Iterable[tuple[str, str, Any]]) -> list[tuple[SplitKind, str]]:
        out: list[tuple[SplitKind, str]] = []
        for kind, name, payload in events:
            if kind == "chunk":
                if name == self._reasoning_field:
                    if shown := self._reasoning.add(payload):
                        out.append(("reasoning", shown))
                elif name != self._calls_field:
                    if shown := self._answer.add(payload):
                        out.append(("answer", shown))
            elif kind == "close" and name == self._calls_field:
                self._take_calls(payload)
        return out

    def _take_calls(self, value: Any) -> None:
        for item in value if isinstance(value, list) else [value]:
            fn = item.get("function", item) if isinstance(item, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                continue
            name, arguments = fn["name"], fn.get("arguments", fn.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except ValueError:
                    continue
            if not isinstance(arguments, dict):
                continue
            if name == NO_TOOL and NO_TOOL not in self.tool_names:
                said = arguments.get("content")
                if isinstance(said, str) and said.strip():
                    self._extra.append(said.strip())
            elif name in self.tool_names:
                self._calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:12]}", name=name,
                                            arguments=arguments))
