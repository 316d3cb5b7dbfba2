"""Reading tool calls out of a model's answer: Hermes/Qwen ``<tool_call>`` blocks.

A pure text function. Callers never apply it to the reasoning: :mod:`specthink.output` splits
the reasoning off first, so that a tool call the model merely considered while thinking is
never executed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .formats import THINK_HERMES, Span

__all__ = ["TOOL_CALL_OPEN", "ToolCall", "parse_tool_calls"]

TOOL_CALL_OPEN = THINK_HERMES.tool_call.open


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


@lru_cache(maxsize=16)
def _blocks(span: Span) -> re.Pattern[str]:
    # A block may lack its closing tag only at the very end: the model stopped (EOS, a stop
    # sequence or the token budget) right after writing the JSON.
    return re.compile(f"{re.escape(span.open)}(.*?)(?:{re.escape(span.close)}|\\Z)", re.DOTALL)


def parse_tool_calls(text: str, span: Span = THINK_HERMES.tool_call,
                     ) -> tuple[str, list[ToolCall]]:
    """Find the ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks in ``text``
    (``span``: the output format's tool-call markers; the body is Hermes JSON).

    Returns the text with the well-formed blocks removed (stripped) and the calls in order.
    ``arguments`` may also be a JSON string (as TGI 3.2+ writes it) or be missing (no
    arguments). A block whose JSON cannot be read stays in the content and yields no call, so
    a malformed answer is shown to the caller rather than lost.
    """
    calls: list[ToolCall] = []
    kept: list[str] = []
    position = 0
    for match in _blocks(span).finditer(text):
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


