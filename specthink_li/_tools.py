"""Tool calling for LlamaIndex: tool specs and ``tool_choice`` out, ``ToolSelection`` in."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import ChatResponse, ToolCallBlock
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json

from specthink.errors import NoToolCallError
from specthink.formats import THINK_HERMES, OutputFormat
from specthink.trace import Result

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = [
    "TOOLS_OFFERED_KEY",
    "NoToolCallError",
    "openai_tools",
    "resolve_tool_choice",
    "tool_selections",
]

TOOLS_OFFERED_KEY = "tools_offered"
"""``ChatResponse.additional_kwargs`` key naming the tools a request offered."""

_OPENAI_CHOICES = ("auto", "none", "required")


def openai_tools(tools: Sequence[BaseTool]) -> list[dict[str, Any]]:
    # The 1024-character description limit is OpenAI's; a chat template takes any length.
    return [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]


def resolve_tool_choice(tool_choice: str | dict[str, Any] | None,
                        tool_required: bool) -> str | dict[str, Any]:
    """LlamaIndex's ``tool_choice``/``tool_required`` as an OpenAI ``tool_choice``.

    ``None`` is ``"required"`` when a tool is required, else ``"auto"``; ``"any"`` (Anthropic's
    word) is ``"required"``; any other string names the tool to call.
    """
    if tool_choice is None:
        return "required" if tool_required else "auto"
    if isinstance(tool_choice, dict):
        return tool_choice
    if tool_choice == "any":
        return "required"
    if tool_choice in _OPENAI_CHOICES:
        return tool_choice
    return {"type": "function", "function": {"name": tool_choice}}


def tool_selections(response: ChatResponse, *, error_on_no_tool_call: bool) -> list[ToolSelection]:
    """The tool calls of ``response``; arguments given as JSON strings are parsed."""
    selections = [
        ToolSelection(tool_id=block.tool_call_id or "", tool_name=block.tool_name,
                      tool_kwargs=_arguments(block.tool_kwargs))
        for block in response.message.blocks if isinstance(block, ToolCallBlock)
    ]
    if not selections and error_on_no_tool_call:
        raise NoToolCallError(_no_call_message(response))
    return selections


def _arguments(raw: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        # A stream cut inside the JSON leaves it unterminated; recover what is there.
        try:
            parsed = parse_partial_json(raw)
        except ValueError:
            return {}
    return parsed if isinstance(parsed, dict) else {}


def _output_format(response: ChatResponse) -> OutputFormat:
    """The format the answer was written in (its result is in ``raw``, whole or streamed)."""
    raw = response.raw if isinstance(response.raw, dict) else {}
    result = raw.get("result") or getattr(raw.get("event"), "result", None)
    return result.output_format if isinstance(result, Result) else THINK_HERMES


def _no_call_message(response: ChatResponse) -> str:
    offered = response.additional_kwargs.get(TOOLS_OFFERED_KEY)
    if offered:
        tools = f"tools offered: {', '.join(offered)}"
    elif offered is None:
        tools = "no tools were offered with this request (use chat_with_tools)"
    else:
        tools = "the tool list was empty"
    answer = (response.message.content or "").strip()
    opening = _output_format(response).tool_call.open
    unreadable = answer.count(opening)
    if unreadable:
        tools += f"; {unreadable} {opening} block(s) in the answer were not valid JSON calls"
    shown = answer if len(answer) <= 200 else answer[:200] + "..."
    return (f"expected at least one tool call, but 0 tool calls came back ({tools}); "
            f"the model answered: {shown!r}")
