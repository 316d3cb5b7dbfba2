"""LangChain messages in, the engine's OpenAI-style message dicts out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from specthink.errors import ConfigError

__all__ = ["to_engine_messages"]

# Blocks that are not the turn's text: reasoning travels apart, as reasoning_content (which
# the chat template shows or drops as its model was trained), tool-use blocks repeat
# ``tool_calls``.
_REASONING_BLOCKS = {"reasoning": "reasoning", "thinking": "thinking"}
"""Reasoning blocks and the key of their text: LangChain's standard ``reasoning`` block,
Anthropic's ``thinking``."""
_SILENT_BLOCKS = frozenset({"reasoning", "thinking", "redacted_thinking", "tool_use",
                            "tool_call", "tool_call_chunk", "invalid_tool_call",
                            "server_tool_call", "server_tool_result", "citation",
                            "non_standard"})
_MEDIA_BLOCKS = frozenset({"image", "image_url", "audio", "input_audio", "video", "file",
                           "document", "input_image", "input_file"})


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Convert LangChain messages to the ``{"role", "content", ...}`` dicts the engine takes.

    Raises ``ConfigError`` for content the text-only models cannot read (images, audio,
    files) and for message types with no chat role.
    """
    return [_convert(message, position) for position, message in enumerate(messages)]


def _convert(message: BaseMessage, position: int) -> dict[str, Any]:
    text = _text_of(message, position)
    if isinstance(message, SystemMessage):
        out: dict[str, Any] = {"role": "system", "content": text}
    elif isinstance(message, HumanMessage):
        out = {"role": "user", "content": text}
    elif isinstance(message, AIMessage):
        out = {"role": "assistant", "content": text}
        reasoning = _reasoning_of(message)
        if reasoning:
            out["reasoning_content"] = reasoning
        if message.tool_calls:
            out["tool_calls"] = [
                {"id": call.get("id") or f"call_{position}_{index}", "type": "function",
                 "function": {"name": call["name"],
                              "arguments": json.dumps(call["args"], ensure_ascii=False)}}
                for index, call in enumerate(message.tool_calls)
            ]
    elif isinstance(message, ToolMessage):
        out = {"role": "tool", "content": text, "tool_call_id": message.tool_call_id}
    elif isinstance(message, FunctionMessage):
        out = {"role": "tool", "content": text}
    elif isinstance(message, ChatMessage):
        out = {"role": message.role, "content": text}
    else:
        raise ConfigError(
            f"message {position} has type {message.type!r}, which has no chat role; "
            "use SystemMessage, HumanMessage, AIMessage or ToolMessage")
    if message.name and "name" not in out:
        out["name"] = message.name
    return out


def _text_of(message: BaseMessage, position: int) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind in _MEDIA_BLOCKS:
            raise ConfigError(
                f"message {position} holds a {kind!r} block; speculative thinking runs "
                "text-only models, so send text content only")
        elif kind not in _SILENT_BLOCKS:
            raise ConfigError(
                f"message {position} holds a content block of unknown type {kind!r}")
    return "".join(parts)


def _reasoning_of(message: AIMessage) -> str:
    """An earlier turn's reasoning, handed back to the template (gpt-oss and Gemma 4 show it
    in a tool loop): ``additional_kwargs["reasoning_content"]``, where this adapter and
    ChatOpenAI-style models put it, else the message's reasoning content blocks."""
    given = message.additional_kwargs.get("reasoning_content")
    if isinstance(given, str) and given:
        return given
    if isinstance(message.content, str):
        return ""
    parts = []
    for block in message.content:
        if isinstance(block, dict):
            key = _REASONING_BLOCKS.get(str(block.get("type")))
            text = block.get(key) if key is not None else None
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts)
