"""Reading a model's answer: Hermes/Qwen ``<tool_call>`` blocks and the ``<think>`` reasoning split.

Both are pure text functions. Split the reasoning off first, then look for tool calls in the
answer, so that a tool call the model merely considered while thinking is not executed::

    reasoning, answer = split_reasoning(result.text)
    content, calls = parse_tool_calls(answer)
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ReasoningSplitter",
    "SplitKind",
    "ToolCall",
    "parse_tool_calls",
    "split_reasoning",
]

THINK_START = "<think>"
THINK_END = "</think>"

SplitKind = Literal["reasoning", "answer"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call the model asked for."""

    id: str
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` item, with ``arguments`` as a JSON string.

        An assistant message carrying these can be sent back in the next turn's ``messages``.
        """
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name,
                         "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


# A block may lack its closing tag only at the very end: the model stopped (EOS, a stop
# sequence or the token budget) right after writing the JSON.
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Find the ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks in ``text``.

    Returns the text with the well-formed blocks removed (stripped) and the calls in order.
    ``arguments`` may also be a JSON string (as TGI 3.2+ writes it) or be missing (no
    arguments). A block whose JSON cannot be read stays in the content and yields no call, so
    a malformed answer is shown to the caller rather than lost.
    """
    calls: list[ToolCall] = []
    kept: list[str] = []
    position = 0
    for match in _TOOL_CALL.finditer(text):
        call = _read_call(match.group(1))
        if call is None:
            continue
        kept.append(text[position:match.start()])
        position = match.end()
        calls.append(call)
    kept.append(text[position:])
    return "".join(kept).strip(), calls


def _read_call(body: str) -> ToolCall | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None
    # Some Hermes fine-tunes write "parameters" where the prompt asked for "arguments".
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=f"call_{uuid.uuid4().hex[:12]}", name=payload["name"],
                    arguments=arguments)


def split_reasoning(text: str, *, start: str = THINK_START, end: str = THINK_END,
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

    def __init__(self, *, start: str = THINK_START, end: str = THINK_END,
                 starts_in_reasoning: bool = False) -> None:
        if not start or not end:
            raise ValueError("start and end tags must be non-empty")
        self.start = start
        self.end = end
        self.starts_in_reasoning = starts_in_reasoning
        self._state = _OPENING
        self._pending = ""

    @classmethod
    def for_prompt(cls, prompt: str, *, start: str = THINK_START,
                   end: str = THINK_END) -> ReasoningSplitter:
        """A splitter for the output of ``prompt``: in reasoning when the prompt opened it."""
        return cls(start=start, end=end, starts_in_reasoning=prompt.rstrip().endswith(start))

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
        ready = self._pending[:len(self._pending) - _partial_suffix(self._pending, self.end)]
        if ready:
            out.append(("reasoning", ready))
        self._pending = self._pending[len(ready):]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
