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

from specthink.output import FROM_STREAM, FromStream, OutputDelta, OutputSplitter, split_result
from specthink.tools import ToolCall
from specthink.trace import Event, FinishEvent, Result, StartEvent, Statistics

__all__ = ["STATS_KEY", "ChatStreamAssembler", "response_from_result", "usage"]

STATS_KEY = "speculative_thinking"


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


def response_from_result(result: Result, *,
                         tools: Sequence[str] | FromStream | None = FROM_STREAM) -> ChatResponse:
    """The whole answer of ``agenerate`` as one ``ChatResponse``; ``tools`` names the tools
    offered, whose calls are read from the answer (default: the request's)."""
    output = split_result(result, tools=tools)
    stats = result.stats
    return ChatResponse(
        message=_message(output.reasoning.strip(), output.answer, output.tool_calls, stats),
        raw={"result": result, "usage": usage(stats)},
        additional_kwargs=usage(stats),
    )


class ChatStreamAssembler:
    """Turns engine events into streamed ``ChatResponse`` items.

    Each item carries the cumulative message, the answer ``delta`` since the previous item,
    ``additional_kwargs["thinking_delta"]`` for new reasoning (read by LlamaIndex agents; they add
    up to the final ``ThinkingBlock``) and ``raw={"event": engine_event}``. Concatenating every
    ``delta`` gives the final ``message.content``. The split is the core's
    (:class:`specthink.output.OutputSplitter`): tool-call markup is never shown, and the last
    item, built from the engine's ``FinishEvent``, carries the parsed calls and the statistics.
    The engine's ``StartEvent`` yields no item (``feed`` returns ``None``).
    """

    def __init__(self, *, tools: Sequence[str] | FromStream | None = FROM_STREAM) -> None:
        self._splitter = OutputSplitter(tools=tools)  # default: the request's, on StartEvent
        self._held_reasoning = ""
        self._reasoning = ""
        self._answer = ""
        self._shown = ""

    def feed(self, event: Event) -> ChatResponse | None:
        if isinstance(event, FinishEvent):
            return self._finish(event)
        deltas = self._splitter.feed(event)
        if isinstance(event, StartEvent):
            return None
        thinking = self._take(deltas)
        visible = self._visible()
        delta = visible[len(self._shown):]
        self._shown = visible
        return ChatResponse(
            message=_message(self._reasoning, visible, []),
            delta=delta,
            raw={"event": event},
            additional_kwargs={"thinking_delta": thinking} if thinking else {},
        )

    def _take(self, deltas: Sequence[OutputDelta]) -> str:
        """Absorb split pieces; return the new reasoning to show.

        The reasoning is shown stripped, as the final ``ThinkingBlock`` holds it (a template's
        ``<think>\\n`` leaves a newline at both ends): whitespace at its end waits until more
        reasoning follows.
        """
        pending = self._held_reasoning
        for delta in deltas:
            if delta.kind == "reasoning":
                pending += delta.text
            else:
                self._answer += delta.text
        if not self._reasoning:
            pending = pending.lstrip()
        shown = pending.rstrip()
        self._held_reasoning = pending[len(shown):]
        self._reasoning += shown
        return shown

    def _visible(self) -> str:
        return self._answer.strip() if self._splitter.parses_tools else self._answer

    def _finish(self, event: FinishEvent) -> ChatResponse:
        final = self._splitter.finish()
        thinking = self._take(final.deltas)
        content = final.answer
        # ``content`` extends what was shown (the held-back tail is only a suffix), so the last
        # delta completes the text.
        delta = content[len(self._shown):] if content.startswith(self._shown) else ""
        self._shown = content
        stats = event.result.stats
        extra: dict[str, Any] = usage(stats)
        if thinking:
            extra["thinking_delta"] = thinking
        return ChatResponse(
            message=_message(self._reasoning, content, final.tool_calls, stats),
            delta=delta,
            raw={"event": event, "usage": usage(stats)},
            additional_kwargs=extra,
        )
