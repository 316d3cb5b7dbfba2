"""Engine results and events in, LlamaIndex ``ChatResponse`` objects out.

The reasoning goes into a ``ThinkingBlock``, the answer into a ``TextBlock``, tool calls (only
when tools were offered) into ``ToolCallBlock``s and, OpenAI-style, into
``additional_kwargs["tool_calls"]``, and the request's statistics into
``message.additional_kwargs["speculative_thinking"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ContentBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)

from specthink.tools import ReasoningSplitter, ToolCall, parse_tool_calls, split_reasoning
from specthink.trace import Event, FinishEvent, Result, Statistics, TextEvent

__all__ = ["STATS_KEY", "ChatStreamAssembler", "response_from_result", "usage"]

STATS_KEY = "speculative_thinking"
TOOL_CALL_OPEN = "<tool_call>"


def usage(stats: Statistics) -> dict[str, int]:
    """Token counts under the names LlamaIndex's ``TokenCountingHandler`` looks for."""
    return {"prompt_tokens": stats.input_tokens,
            "completion_tokens": stats.output_tokens,
            "total_tokens": stats.input_tokens + stats.output_tokens}


def _message(reasoning: str, content: str, calls: list[ToolCall],
             stats: Statistics | None = None) -> ChatMessage:
    blocks: list[ContentBlock] = []
    if reasoning:
        tokens = (stats.reasoning_tokens or None) if stats is not None else None
        blocks.append(ThinkingBlock(content=reasoning, num_tokens=tokens))
    # Always one TextBlock, so ``message.content`` is "" rather than None for a bare tool call.
    blocks.append(TextBlock(text=content))
    blocks.extend(ToolCallBlock(tool_call_id=call.id, tool_name=call.name,
                                tool_kwargs=call.arguments) for call in calls)
    extra: dict[str, Any] = {STATS_KEY: stats.to_dict()} if stats is not None else {}
    if calls:
        # Blocks are the current form; LlamaIndex's streaming structured output still looks for
        # OpenAI-style calls here before it reads any.
        extra["tool_calls"] = [call.to_openai() for call in calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def response_from_result(result: Result, *, parse_tools: bool,
                         starts_in_reasoning: bool | None) -> ChatResponse:
    """The whole answer of ``agenerate`` as one ``ChatResponse``."""
    reasoning, answer = split_reasoning(result.text, starts_in_reasoning=starts_in_reasoning)
    reasoning = reasoning.strip()
    content, calls = parse_tool_calls(answer) if parse_tools else (answer, [])
    stats = result.stats
    return ChatResponse(
        message=_message(reasoning, content, calls, stats),
        raw={"result": result, "usage": usage(stats)},
        additional_kwargs=usage(stats),
    )


class ChatStreamAssembler:
    """Turns engine events into streamed ``ChatResponse`` items.

    Each item carries the cumulative message, the answer ``delta`` since the previous item,
    ``additional_kwargs["thinking_delta"]`` for new reasoning (read by LlamaIndex agents; they add
    up to the final ``ThinkingBlock``) and
    ``raw={"event": engine_event}``. Concatenating every ``delta`` gives the final
    ``message.content``: when tools were offered, text from a ``<tool_call>`` tag on (and trailing
    whitespace, which the final parse strips) is held back, and the last item, built from the
    engine's ``FinishEvent``, carries the parsed tool calls and the statistics.
    """

    def __init__(self, *, parse_tools: bool, starts_in_reasoning: bool) -> None:
        self._splitter = ReasoningSplitter(starts_in_reasoning=starts_in_reasoning)
        self._parse_tools = parse_tools
        self._held_reasoning = ""
        self._reasoning = ""
        self._answer = ""
        self._shown = ""

    def feed(self, event: Event) -> ChatResponse:
        if isinstance(event, FinishEvent):
            return self._finish(event)
        thinking = ""
        if isinstance(event, TextEvent):
            thinking = self._take(self._splitter.feed(event.text))
        visible = self._visible()
        delta = visible[len(self._shown):]
        self._shown = visible
        return ChatResponse(
            message=_message(self._reasoning, visible, []),
            delta=delta,
            raw={"event": event},
            additional_kwargs={"thinking_delta": thinking} if thinking else {},
        )

    def _take(self, pieces: Sequence[tuple[str, str]]) -> str:
        """Absorb split pieces; return the new reasoning to show.

        The reasoning is shown stripped, as the final ``ThinkingBlock`` holds it (a template's
        ``<think>\\n`` leaves a newline at both ends): whitespace at its end waits until more
        reasoning follows.
        """
        pending = self._held_reasoning
        for kind, text in pieces:
            if kind == "reasoning":
                pending += text
            else:
                self._answer += text
        if not self._reasoning:
            pending = pending.lstrip()
        shown = pending.rstrip()
        self._held_reasoning = pending[len(shown):]
        self._reasoning += shown
        return shown

    def _visible(self) -> str:
        if not self._parse_tools:
            return self._answer
        text = self._answer
        at = text.find(TOOL_CALL_OPEN)
        if at >= 0:
            text = text[:at]
        else:
            text = text[:len(text) - _partial_suffix(text, TOOL_CALL_OPEN)]
        return text.strip()

    def _finish(self, event: FinishEvent) -> ChatResponse:
        thinking = self._take(self._splitter.flush())
        if self._parse_tools:
            content, calls = parse_tool_calls(self._answer)
        else:
            content, calls = self._answer, []
        # ``content`` extends what was shown (the held-back tail is only a suffix), so the last
        # delta completes the text.
        delta = content[len(self._shown):] if content.startswith(self._shown) else ""
        self._shown = content
        stats = event.result.stats
        extra: dict[str, Any] = usage(stats)
        if thinking:
            extra["thinking_delta"] = thinking
        return ChatResponse(
            message=_message(self._reasoning, content, calls, stats),
            delta=delta,
            raw={"event": event, "usage": usage(stats)},
            additional_kwargs=extra,
        )


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
