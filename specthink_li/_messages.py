"""LlamaIndex chat messages in, the engine's OpenAI-style message dicts out."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    CacheControl,
    CachePoint,
    ChatMessage,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)

from specthink.errors import ConfigError

__all__ = ["to_engine_messages"]

_ROLES: dict[MessageRole, str] = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Translate LlamaIndex messages for the engine.

    Earlier turns' reasoning (``ThinkingBlock``) travels as ``reasoning_content``, which the
    chat template shows (gpt-oss and Gemma 4 in a tool loop) or drops (DeepSeek-R1) as its
    model was trained. Tool calls travel as
    OpenAI ``tool_calls`` (from ``ToolCallBlock`` or the older ``additional_kwargs["tool_calls"]``)
    and a tool result keeps its ``tool_call_id``.
    """
    converted: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        role = _ROLES.get(message.role)
        if role is None:  # pragma: no cover - MessageRole is a closed enum
            raise ConfigError(f"message {index} has an unknown role {message.role!r}")
        entry: dict[str, Any] = {"role": role, "content": _text_of(message, index)}
        if role == "assistant":
            reasoning = "\n".join(block.content for block in message.blocks
                                  if isinstance(block, ThinkingBlock) and block.content)
            if reasoning:
                entry["reasoning_content"] = reasoning
            calls = _tool_calls_of(message)
            if calls:
                entry["tool_calls"] = calls
        elif role == "tool":
            extra = message.additional_kwargs
            call_id = extra.get("tool_call_id")
            if call_id is not None:
                entry["tool_call_id"] = str(call_id)
            name = extra.get("name", extra.get("tool_name"))
            if name is not None:
                entry["name"] = str(name)
        converted.append(entry)
    return converted


def _text_of(message: ChatMessage, index: int) -> str:
    parts: list[str] = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif isinstance(block, (ThinkingBlock, ToolCallBlock, CachePoint, CacheControl)):
            continue
        else:
            raise ConfigError(
                f"message {index} ({message.role.value}) holds a {type(block).__name__}; "
                "speculative thinking runs text-completion servers and takes text only")
    # The same joiner as ChatMessage.content, so a message reads as LlamaIndex shows it.
    return "\n".join(parts)


def _tool_calls_of(message: ChatMessage) -> list[dict[str, Any]]:
    blocks = [block for block in message.blocks if isinstance(block, ToolCallBlock)]
    if blocks:
        return [
            _openai_call(block.tool_call_id or f"call_{number}", block.tool_name,
                         block.tool_kwargs)
            for number, block in enumerate(blocks)
        ]
    legacy = message.additional_kwargs.get("tool_calls") or []
    calls: list[dict[str, Any]] = []
    for number, item in enumerate(legacy):
        data = item.model_dump() if hasattr(item, "model_dump") else item
        if not isinstance(data, Mapping):
            continue
        function = data.get("function") or {}
        calls.append(_openai_call(str(data.get("id") or f"call_{number}"),
                                  str(function.get("name", "")),
                                  function.get("arguments") or {}))
    return calls


def _openai_call(call_id: str, name: str, arguments: dict[str, Any] | str) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                   ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}
