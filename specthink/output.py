"""The engine's accepted text in, reasoning / answer / tool calls out: one splitter for every
adapter (LangChain, LlamaIndex, ``specthink serve``) and for whole results and streams alike.

Whether the output starts inside the reasoning is the engine's decision, made once from the
prompt it rendered; it arrives on the :class:`~specthink.trace.StartEvent` that opens every
stream (and on ``Result.starts_in_reasoning``), together with the reasoning tags, so no adapter
probes a template of its own. Tool calls are read from the answer only: a ``<tool_call>`` the
model merely drafted while thinking is never executed.

>>> splitter = OutputSplitter(tools=["multiply"])
>>> splitter.feed(StartEvent(starts_in_reasoning=True))
[]
>>> splitter.feed(TextEvent("small", "Maybe <tool_call>{}</tool_call>?\\n</think>\\n\\nSure."))
[OutputDelta(kind='reasoning', text='Maybe <tool_call>{}</tool_call>?\\n'), OutputDelta(kind='answer', text='Sure.')]
"""  # noqa: E501

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Literal

from .formats import THINK_HERMES, OutputFormat, Span, held_back
from .formats.splitting import TemplateSplit, TemplateSplitter
from .tools import ToolCall, parse_tool_calls
from .trace import Event, Result, StartEvent, TextEvent

__all__ = [
    "FROM_STREAM",
    "NO_TOOL",
    "FinalOutput",
    "FromStream",
    "OutputDelta",
    "OutputSplitter",
    "ReasoningSplitter",
    "SplitKind",
    "split_reasoning",
    "split_result",
]

_THINK = THINK_HERMES.reasoning
NO_TOOL = "no_tool"
"""TGI's pseudo-function for "answer without a tool"; its ``content`` argument is the answer."""

SplitKind = Literal["reasoning", "answer"]


@dataclass(frozen=True, slots=True)
class OutputDelta:
    """A new piece of reasoning or of the answer, in order. Never tool-call markup."""

    kind: SplitKind
    text: str


@dataclass(frozen=True, slots=True)
class FinalOutput:
    """What remains at the end of a stream, and the whole output split."""

    deltas: list[OutputDelta]
    """Pieces held back until the end (a partial tag, whitespace that may precede a call)."""
    rest: str
    """Answer text held back while it could have been a tool call and was not one, with the
    whitespace before it; shown after ``deltas``."""
    reasoning: str
    answer: str
    """The whole answer without tool-call markup, stripped (what ``invoke`` returns)."""
    tool_calls: list[ToolCall] = field(default_factory=list)


# ---- the reasoning split ---------------------------------------------------------------------

def split_reasoning(text: str, *, start: str = _THINK.open, end: str = _THINK.close,
                    starts_in_reasoning: bool | None = None) -> tuple[str, str]:
    """Split a model's output into ``(reasoning, answer)``.

    A leading ``start`` tag (after optional whitespace) opens the reasoning and is removed; the
    first ``end`` tag closes it, and the answer is what follows, left-stripped.
    ``starts_in_reasoning`` says whether the prompt itself already opened the block (DeepSeek-R1
    templates end their generation prompt with ``<think>\\n``):

    - ``True``: the text begins inside the reasoning;
    - ``False``: only a leading ``start`` tag opens a reasoning block;
    - ``None`` (default): an ``end`` tag anywhere means the text began inside the reasoning.
      Only a complete text allows this inference; a stream must decide up front
      (see :class:`ReasoningSplitter`).

    An unclosed block is all reasoning (the model was cut off while thinking).
    """
    if starts_in_reasoning is None:
        starts_in_reasoning = end in text
    stripped = text.lstrip()
    if stripped.startswith(start):
        body = stripped[len(start):]
    elif starts_in_reasoning:
        body = text
    else:
        return "", text
    reasoning, closed, answer = body.partition(end)
    return (reasoning, answer.lstrip()) if closed else (body, "")


_OPENING, _REASONING, _ANSWER_START, _ANSWER = range(4)


class ReasoningSplitter:
    """Split a stream of text deltas into reasoning and answer pieces as they arrive.

    Feeding any split of a text gives the same pieces, joined per kind, as
    ``split_reasoning(text, starts_in_reasoning=...)``. Text that might still become a tag (a
    partial ``</think>`` at a chunk boundary, leading whitespace that may precede ``<think>``,
    whitespace after ``</think>``) is held back until the next delta or :meth:`flush`.
    Empty pieces are never returned.

    >>> splitter = ReasoningSplitter()
    >>> splitter.feed("<think>Two plus two</th")
    [('reasoning', 'Two plus two')]
    >>> splitter.feed("ink>\\n\\nFour.")
    [('answer', 'Four.')]
    """

    def __init__(self, *, start: str = _THINK.open, end: str = _THINK.close,
                 starts_in_reasoning: bool = False) -> None:
        if not start or not end:
            raise ValueError("start and end tags must be non-empty")
        self.start = start
        self.end = end
        self.starts_in_reasoning = starts_in_reasoning
        self._state = _OPENING
        self._pending = ""

    def feed(self, delta: str) -> list[tuple[SplitKind, str]]:
        """Take the next piece of output; return what can be classified so far."""
        self._pending += delta
        out: list[tuple[SplitKind, str]] = []
        if self._state == _OPENING:
            self._open(final=False)
        if self._state == _REASONING:
            self._reason(out)
        if self._state == _ANSWER_START:
            self._pending = self._pending.lstrip()
            if self._pending:
                self._state = _ANSWER
        if self._state == _ANSWER and self._pending:
            out.append(("answer", self._pending))
            self._pending = ""
        return out

    def flush(self) -> list[tuple[SplitKind, str]]:
        """End of stream: classify what was held back."""
        out: list[tuple[SplitKind, str]] = []
        if self._state == _OPENING:
            self._open(final=True)
        if self._state == _REASONING and self._pending:
            out.append(("reasoning", self._pending))
        elif self._state == _ANSWER and self._pending:
            out.append(("answer", self._pending))
        self._pending = ""
        return out

    def _open(self, *, final: bool) -> None:
        stripped = self._pending.lstrip()
        if stripped.startswith(self.start):
            self._pending = stripped[len(self.start):]
            self._state = _REASONING
        elif final or (stripped and not self.start.startswith(stripped)):
            self._state = _REASONING if self.starts_in_reasoning else _ANSWER
        # Otherwise only whitespace or a prefix of the start tag has arrived: wait.

    def _reason(self, out: list[tuple[SplitKind, str]]) -> None:
        before, closed, after = self._pending.partition(self.end)
        if closed:
            if before:
                out.append(("reasoning", before))
            self._pending = after
            self._state = _ANSWER_START
            return
        ready = self._pending[:len(self._pending) - held_back(self._pending, (self.end,))]
        if ready:
            out.append(("reasoning", ready))
        self._pending = self._pending[len(ready):]


def _split_trailing_space(text: str) -> tuple[str, str]:
    stripped = text.rstrip()
    return stripped, text[len(stripped):]


# ---- reasoning, answer and tool calls --------------------------------------------------------

def _read_calls(answer: str, tools: frozenset[str] | None, max_tool_calls: int | None,
                span: Span) -> tuple[str, list[ToolCall], bool]:
    """``(content, calls, parsed)``: the calls of ``answer`` when tools were offered, TGI's
    ``no_tool`` answer turned back into text; ``parsed`` tells whether any block was read.

    A call naming a function that was not offered is never a tool call: nobody could run it
    (an agent would loop on "not a valid tool"). Its arguments are the answer, as JSON: that is
    what a model asked for a JSON schema beside tools (LangChain's ``ProviderStrategy``) writes
    when it dresses the schema's object up as a call of the schema's name."""
    if not tools:
        return answer, [], False
    content, calls = parse_tool_calls(answer, span)
    kept: list[ToolCall] = []
    texts = [content] if content else []
    for call in calls:
        if call.name in tools:
            kept.append(call)
        elif call.name == NO_TOOL:
            said = call.arguments.get("content")
            if isinstance(said, str) and said.strip():
                texts.append(said.strip())
        else:
            texts.append(json.dumps(call.arguments, ensure_ascii=False))
    return "\n\n".join(texts), kept[:max_tool_calls], bool(calls)


class FromStream(Enum):
    """The type of :data:`FROM_STREAM`."""

    FROM_STREAM = "from the stream"


FROM_STREAM: Final = FromStream.FROM_STREAM
"""The default of the splitters' ``tools`` and ``max_tool_calls``: what the request said, as the
engine's ``StartEvent`` (or ``Result``) carries it."""


def split_result(result: Result, *, tools: Iterable[str] | FromStream | None = FROM_STREAM,
                 max_tool_calls: int | FromStream | None = FROM_STREAM) -> FinalOutput:
    """A whole result split: reasoning, answer and (when tools were offered) calls.

    ``tools`` and ``max_tool_calls`` default to the request's (``Result.tool_names``,
    ``Result.max_tool_calls``); pass them to read the text otherwise.
    """
    schemas: list[dict[str, Any]] = []
    if tools is FROM_STREAM:
        tools, schemas = result.tool_names, list(result.tool_schemas)
    if max_tool_calls is FROM_STREAM:
        max_tool_calls = result.max_tool_calls
    if result.output_format.template is not None:
        splitter = TemplateSplitter(result.output_format.template, tools=schemas or tools or (),
                                    max_tool_calls=max_tool_calls,
                                    starts_in_reasoning=result.starts_in_reasoning)
        splitter.feed(result.text)
        whole = _from_template(splitter.finish())
        return FinalOutput(deltas=[], rest="", reasoning=whole.reasoning, answer=whole.answer,
                           tool_calls=whole.tool_calls)
    reasoning, answer = split_reasoning(result.text, start=result.reasoning_start,
                                        end=result.reasoning_end,
                                        starts_in_reasoning=result.starts_in_reasoning)
    names = frozenset(tools) if tools is not None else None
    content, calls, _ = _read_calls(answer, names, max_tool_calls, result.output_format.tool_call)
    return FinalOutput(deltas=[], rest="", reasoning=reasoning, answer=content, tool_calls=calls)


def _from_template(split: TemplateSplit) -> FinalOutput:
    return FinalOutput(deltas=[OutputDelta(k, t) for k, t in split.pieces], rest="",
                       reasoning=split.reasoning, answer=split.answer,
                       tool_calls=split.tool_calls)


class OutputSplitter:
    """Engine events in, :class:`OutputDelta` pieces out, as text is accepted.

    A stream whose output format has a response template is split by it
    (:class:`specthink.formats.splitting.TemplateSplitter`): every family it describes.

    ``tools`` (the names whose calls count) and ``max_tool_calls`` come from the request, on
    the ``StartEvent`` that opens the stream, unless given here.

    Reasoning and answer never share a piece. With tools offered, answer text from a
    ``<tool_call>`` on (and a partial tag or whitespace that may precede one) is held back and
    parsed at the end, so calls arrive whole in :meth:`finish` and their markup is never shown.
    ``max_tool_calls=1`` keeps only the first call (``parallel_tool_calls=False``).

    Joining every answer delta and then ``FinalOutput.rest`` gives the answer as shown; joining
    the reasoning deltas gives the reasoning. A splitter serves one stream.
    """

    def __init__(self, *, tools: Iterable[str] | FromStream | None = FROM_STREAM,
                 max_tool_calls: int | FromStream | None = FROM_STREAM) -> None:
        self._tools_given = tools is not FROM_STREAM
        self._limit_given = max_tool_calls is not FROM_STREAM
        self.tools = (frozenset(tools) if tools is not None and tools is not FROM_STREAM
                      else None)
        self.max_tool_calls = (max_tool_calls if max_tool_calls is not FROM_STREAM
                               else None)
        self._splitter: ReasoningSplitter | None = None
        self._format: OutputFormat = THINK_HERMES
        """The stream's output format (its ``StartEvent`` says)."""
        self._by_template: TemplateSplitter | None = None
        """The stream's response-template splitter, when its format has a template."""
        self._unsure = ""
        """Answer text that may be (the start of) a tool call, or whitespace before one."""
        self._in_call = False
        self._reasoning: list[str] = []
        self._answer: list[str] = []

    @property
    def parses_tools(self) -> bool:
        return bool(self.tools)

    def feed(self, event: Event) -> list[OutputDelta]:
        """Take the next engine event; return the pieces that can be shown now."""
        if isinstance(event, StartEvent):
            # The request's tools and call limit come with the stream, unless given here.
            if not self._tools_given:
                self.tools = (frozenset(event.tool_names) if event.tool_names is not None
                              else None)
            if not self._limit_given:
                self.max_tool_calls = event.max_tool_calls
            self._format = event.output_format
            if event.output_format.template is not None:
                schemas = [t for t in event.tool_schemas
                           if t["function"]["name"] in (self.tools or ())]
                self._by_template = TemplateSplitter(
                    event.output_format.template, tools=schemas or self.tools or (),
                    max_tool_calls=self.max_tool_calls,
                    starts_in_reasoning=event.starts_in_reasoning)
            self._splitter = ReasoningSplitter(start=event.reasoning_start,
                                               end=event.reasoning_end,
                                               starts_in_reasoning=event.starts_in_reasoning)
            return []
        if isinstance(event, TextEvent):
            if self._by_template is not None:
                return [OutputDelta(k, t) for k, t in self._by_template.feed(event.text)]
            return self._pieces(self._reasoning_splitter().feed(event.text))
        return []

    def finish(self) -> FinalOutput:
        """End of the stream: what was held back, and the whole output split."""
        if self._by_template is not None:
            return _from_template(self._by_template.finish())
        deltas = self._pieces(self._reasoning_splitter().flush())
        rest = self._unsure
        calls: list[ToolCall] = []
        if rest:
            # Shown answer text never holds markup (holding starts at the first tag), so only
            # the held tail can hold calls.
            content, calls, parsed = _read_calls(rest, self.tools, self.max_tool_calls,
                                                 self._format.tool_call)
            if parsed:
                # Whitespace held before a call still separates shown text from what follows.
                space = rest[:len(rest) - len(rest.lstrip())]
                rest = space + content if content else ""
        # The whole answer read at once, as split_result reads it (text around the calls may
        # join differently than the shown pieces plus the held tail).
        answer, _, _ = _read_calls("".join(self._answer) + self._unsure, self.tools,
                                   self.max_tool_calls, self._format.tool_call)
        return FinalOutput(deltas=deltas, rest=rest, reasoning="".join(self._reasoning),
                           answer=answer, tool_calls=calls)

    def _reasoning_splitter(self) -> ReasoningSplitter:
        if self._splitter is None:
            raise RuntimeError("OutputSplitter fed text before the StartEvent that opens "
                               "every engine stream")
        return self._splitter

    def _pieces(self, pieces: list[tuple[SplitKind, str]]) -> list[OutputDelta]:
        out: list[OutputDelta] = []
        for kind, text in pieces:
            if kind == "reasoning":
                self._reasoning.append(text)
                out.append(OutputDelta("reasoning", text))
                continue
            shown = self._answer_piece(text) if self.parses_tools else text
            if shown:
                self._answer.append(shown)
                out.append(OutputDelta("answer", shown))
        return out

    def _answer_piece(self, text: str) -> str:
        """The part of the answer that is surely not tool-call markup; the rest is held."""
        if self._in_call:
            self._unsure += text
            return ""
        pending = self._unsure + text
        opening = self._format.tool_call.open
        at = pending.find(opening)
        if at >= 0:
            self._in_call = True
            shown, self._unsure = _split_trailing_space(pending[:at])
            self._unsure += pending[at:]
            return shown
        keep = held_back(pending, (opening,))
        shown, held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        shown, space = _split_trailing_space(shown)
        self._unsure = space + held
        return shown
