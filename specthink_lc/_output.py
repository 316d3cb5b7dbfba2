"""Engine output in, LangChain messages out: one converter for ``invoke`` and for streams.

The reasoning (``<think>…</think>``) goes to ``additional_kwargs["reasoning_content"]``, which
langchain-core turns into ``reasoning`` content blocks under ``output_version="v1"``; the answer
goes to ``content``. Tool calls are read from the answer only, so a call the model merely
considered while thinking is never executed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import OutputTokenDetails, UsageMetadata
from langchain_core.messages.tool import ToolCall as LCToolCall
from langchain_core.messages.tool import ToolCallChunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk

from specthink.output import OutputDelta, OutputSplitter, split_result
from specthink.tools import ToolCall
from specthink.trace import Event, FinishEvent, Result

__all__ = ["PROVIDER", "ChunkAssembler", "OutputShape", "message_from_result"]

PROVIDER = "specthink"


@dataclass(frozen=True, slots=True)
class OutputShape:
    """What the model's settings add to every message (the request's tools come with the
    engine's stream)."""

    model_name: str | None = None
    """The name the user gave the pair; default: the servers' model ids joined by ``+``."""


def message_from_result(result: Result, shape: OutputShape) -> ChatGeneration:
    """The whole answer as one ``AIMessage`` (the ``invoke`` path)."""
    output = split_result(result)  # the request's tools and call limit come with the result
    message = AIMessage(
        content=output.answer,
        additional_kwargs={"reasoning_content": output.reasoning} if output.reasoning else {},
        tool_calls=[_lc_tool_call(call) for call in output.tool_calls],
        usage_metadata=usage_metadata(result, has_reasoning=bool(output.reasoning)),
        response_metadata=response_metadata(result, shape),
    )
    return ChatGeneration(message=message)


class ChunkAssembler:
    """Turns engine events into ``ChatGenerationChunk``s as text is accepted.

    The split itself is the core's (:class:`specthink.output.OutputSplitter`): reasoning and
    answer never share a chunk, and tool calls arrive whole, as ``tool_call_chunks`` of the last
    chunk, their markup never shown as content. Usage and response metadata go on the last chunk
    only (``chunk_position="last"``), so summing the chunks counts tokens once.
    """

    def __init__(self, shape: OutputShape) -> None:
        self.shape = shape
        self._splitter = OutputSplitter()  # configured by the stream's StartEvent
        self._had_reasoning = False

    def feed(self, event: Event) -> list[ChatGenerationChunk]:
        if isinstance(event, FinishEvent):
            return self.finish(event.result)
        return self._chunks(self._splitter.feed(event))

    def finish(self, result: Result) -> list[ChatGenerationChunk]:
        """The chunks still held back, then the last chunk with calls, usage and metadata."""
        final = self._splitter.finish()
        out = self._chunks(final.deltas)
        last = AIMessageChunk(
            content=final.rest,
            tool_call_chunks=[_lc_tool_call_chunk(call, index)
                              for index, call in enumerate(final.tool_calls)],
            usage_metadata=usage_metadata(result, has_reasoning=self._had_reasoning),
            response_metadata=response_metadata(result, self.shape),
            chunk_position="last",
        )
        out.append(ChatGenerationChunk(message=last))
        return out

    def _chunks(self, deltas: list[OutputDelta]) -> list[ChatGenerationChunk]:
        out: list[ChatGenerationChunk] = []
        for delta in deltas:
            if delta.kind == "reasoning":
                self._had_reasoning = True
                out.append(ChatGenerationChunk(message=AIMessageChunk(
                    content="", additional_kwargs={"reasoning_content": delta.text})))
            else:
                out.append(ChatGenerationChunk(message=AIMessageChunk(content=delta.text)))
        return out


def usage_metadata(result: Result, *, has_reasoning: bool) -> UsageMetadata:
    """Standard usage: prompt tokens of the first request, every accepted output token."""
    stats = result.stats
    usage = UsageMetadata(input_tokens=stats.input_tokens, output_tokens=stats.output_tokens,
                          total_tokens=stats.input_tokens + stats.output_tokens)
    if stats.reasoning_tokens or has_reasoning:
        usage["output_token_details"] = OutputTokenDetails(reasoning=stats.reasoning_tokens)
    return usage


def response_metadata(result: Result, shape: OutputShape) -> dict[str, Any]:
    trace = result.to_dict()
    return {
        "model_name": shape.model_name or result.model_name,
        "model_provider": PROVIDER,
        "finish_reason": result.finish_reason,
        "speculative_thinking": trace["stats"],
        "speculative_trace": {"segments": trace["segments"], "takeovers": trace["takeovers"]},
    }


def _lc_tool_call(call: ToolCall) -> LCToolCall:
    return LCToolCall(name=call.name, args=call.arguments, id=call.id, type="tool_call")


def _lc_tool_call_chunk(call: ToolCall, index: int) -> ToolCallChunk:
    return ToolCallChunk(name=call.name, args=json.dumps(call.arguments, ensure_ascii=False),
                         id=call.id, index=index, type="tool_call_chunk")
