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

from specthink.tools import (
    ReasoningSplitter,
    SplitKind,
    ToolCall,
    parse_tool_calls,
    split_reasoning,
)
from specthink.trace import Result, TextEvent

__all__ = ["PROVIDER", "ChunkAssembler", "OutputShape", "message_from_result"]

PROVIDER = "specthink"
TOOL_CALL_OPEN = "<tool_call>"


@dataclass(frozen=True, slots=True)
class OutputShape:
    """What the caller's request tells us about the output before it arrives."""

    model_name: str
    opens_reasoning: bool
    """The rendered prompt ends inside ``<think>`` (DeepSeek-R1 templates), so the output
    starts as reasoning without an opening tag."""
    parse_tools: bool
    """Tools were offered, so ``<tool_call>`` blocks in the answer become ``tool_calls``."""
    max_tool_calls: int | None = None
    """Keep only this many calls (``parallel_tool_calls=False`` keeps one)."""


def message_from_result(result: Result, shape: OutputShape) -> ChatGeneration:
    """The whole answer as one ``AIMessage`` (the ``invoke`` path)."""
    reasoning, answer = split_reasoning(result.text, starts_in_reasoning=shape.opens_reasoning)
    calls: list[ToolCall] = []
    if shape.parse_tools:
        answer, calls = parse_tool_calls(answer)
        calls = calls[:shape.max_tool_calls]
    message = AIMessage(
        content=answer,
        additional_kwargs={"reasoning_content": reasoning} if reasoning else {},
        tool_calls=[_lc_tool_call(call) for call in calls],
        usage_metadata=usage_metadata(result, has_reasoning=bool(reasoning)),
        response_metadata=response_metadata(result, shape),
    )
    return ChatGeneration(message=message)


class ChunkAssembler:
    """Turns the engine's accepted text into ``ChatGenerationChunk``s as it arrives.

    Reasoning and answer never share a chunk. With tools offered, answer text from a
    ``<tool_call>`` on (and a partial tag or whitespace that may precede one) is held back and
    parsed at the end, so the calls arrive whole, as ``tool_call_chunks`` of the last chunk, and
    their markup never shows up as content. Usage and response metadata go on the last chunk
    only (``chunk_position="last"``), so summing the chunks counts tokens once.
    """

    def __init__(self, shape: OutputShape) -> None:
        self.shape = shape
        self._splitter = ReasoningSplitter(starts_in_reasoning=shape.opens_reasoning)
        self._unsure = ""
        """Answer text that may be (the start of) a tool call, or whitespace before one."""
        self._in_call = False
        self._had_reasoning = False

    def feed(self, event: TextEvent) -> list[ChatGenerationChunk]:
        return self._chunks(self._splitter.feed(event.text))

    def finish(self, result: Result) -> list[ChatGenerationChunk]:
        """The chunks still held back, then the last chunk with calls, usage and metadata."""
        out = self._chunks(self._splitter.flush())
        rest = self._unsure
        calls: list[ToolCall] = []
        if self.shape.parse_tools and rest:
            content, calls = parse_tool_calls(rest)
            calls = calls[:self.shape.max_tool_calls]
            if calls:
                # Whitespace held before the call still separates shown text from what follows.
                space = rest[:len(rest) - len(rest.lstrip())]
                rest = space + content if content else ""
        last = AIMessageChunk(
            content=rest,
            tool_call_chunks=[_lc_tool_call_chunk(call, index)
                              for index, call in enumerate(calls)],
            usage_metadata=usage_metadata(result, has_reasoning=self._had_reasoning),
            response_metadata=response_metadata(result, self.shape),
            chunk_position="last",
        )
        out.append(ChatGenerationChunk(message=last))
        return out

    def _chunks(self, pieces: list[tuple[SplitKind, str]]) -> list[ChatGenerationChunk]:
        out: list[ChatGenerationChunk] = []
        for kind, text in pieces:
            if kind == "reasoning":
                self._had_reasoning = True
                out.append(ChatGenerationChunk(message=AIMessageChunk(
                    content="", additional_kwargs={"reasoning_content": text})))
                continue
            shown = self._answer(text) if self.shape.parse_tools else text
            if shown:
                out.append(ChatGenerationChunk(message=AIMessageChunk(content=shown)))
        return out

    def _answer(self, text: str) -> str:
        """The part of the answer that is surely not tool-call markup; the rest is held."""
        if self._in_call:
            self._unsure += text
            return ""
        pending = self._unsure + text
        at = pending.find(TOOL_CALL_OPEN)
        if at >= 0:
            self._in_call = True
            shown, self._unsure = _split_trailing_space(pending[:at])
            self._unsure += pending[at:]
            return shown
        keep = _partial_suffix(pending, TOOL_CALL_OPEN)
        shown, held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        shown, space = _split_trailing_space(shown)
        self._unsure = space + held
        return shown


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
        "model_name": shape.model_name,
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


def _split_trailing_space(text: str) -> tuple[str, str]:
    stripped = text.rstrip()
    return stripped, text[len(stripped):]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
