"""From a chat-completions request to the engine and back: the one place that maps OpenAI's
fields to ``SpeculativeThinker`` arguments, and the engine's events to chunks.

Reasoning, answer and tool calls come from the core's :mod:`specthink.output`; nothing here
parses model text. Everything that can be wrong with a request is found in :func:`prepare`,
before any model server is asked.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

from specthink.backends.base import SamplingParams
from specthink.engine import SpeculativeThinker
from specthink.errors import ConfigError
from specthink.output import FinalOutput, OutputSplitter, split_result
from specthink.request import ChatRequest
from specthink.serve.errors import invalid, openai_param
from specthink.serve.protocol import ChatCompletionRequest, ChunkWriter, completion_body
from specthink.serve.settings import ServeSettings
from specthink.trace import Event, FinishEvent, Result

__all__ = ["ChatCall", "openai_param", "prepare", "stream_events", "whole_answer"]

MAX_STOP_SEQUENCES = 4
"""OpenAI's limit."""


@dataclass(frozen=True, slots=True)
class ChatCall:
    """One checked request, ready for the engine."""

    thinker: SpeculativeThinker
    request: ChatRequest
    stream: bool
    include_usage: bool

    def events(self) -> AsyncGenerator[Event, None]:
        """The engine's events; closing the generator closes both model servers' streams."""
        return cast(AsyncGenerator[Event, None], self.thinker.astream(self.request))

    async def result(self) -> Result:
        return await self.thinker.agenerate(self.request)

    def splitter(self) -> OutputSplitter:
        return OutputSplitter()  # the request's tools arrive on the stream's StartEvent

    def split(self, result: Result) -> FinalOutput:
        return split_result(result)


def prepare(request: ChatCompletionRequest, settings: ServeSettings, thinker: SpeculativeThinker,
            *, session_id: str | None = None) -> ChatCall:
    """Check every field and build the engine call; any problem is a 400 naming the field."""
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise invalid("max_tokens and max_completion_tokens disagree; send one",
                      "max_completion_tokens")
    budget = request.max_completion_tokens or request.max_tokens or settings.max_tokens
    budget_param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if budget > settings.max_tokens:
        raise invalid(f"{budget_param}={budget} is above this server's limit of "
                      f"{settings.max_tokens} tokens", budget_param)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings", "stop")
    options = request.specthink
    try:
        checked = ChatRequest.build(
            request.messages, tools=request.tools, tool_choice=request.tool_choice,
            parallel_tool_calls=request.parallel_tool_calls,
            response_format=request.response_format, stop=stop, max_new_tokens=budget,
            sampling=SamplingParams(temperature=request.temperature, top_p=request.top_p,
                                    seed=request.seed),
            # The engine sends it as the routing key of every generation request of the call.
            session_id=session_id or None,
            rules=options.rules if options is not None else None, base_rules=thinker.rules,
            template_kwargs=request.chat_template_kwargs)
    except ConfigError as exc:
        param = openai_param(exc.field)
        if param == "max_tokens":
            param = budget_param
        if param == "stop":
            raise invalid(f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings",
                          "stop") from None
        raise invalid(str(exc), param) from None
    return ChatCall(thinker=thinker, request=checked, stream=request.stream,
                    include_usage=bool(request.stream_options
                                       and request.stream_options.include_usage))


def finish_reason(output: FinalOutput, result: Result) -> str:
    return "tool_calls" if output.tool_calls else (result.stats.finish_reason or "stop")


def whole_answer(call: ChatCall, result: Result, settings: ServeSettings) -> dict[str, Any]:
    """The non-streamed response body."""
    output = call.split(result)
    return completion_body(model=settings.model_name, reasoning=output.reasoning,
                           content=output.answer, tool_calls=output.tool_calls,
                           finish_reason=finish_reason(output, result), stats=result.stats,
                           reasoning_field=settings.reasoning_field)


async def stream_events(call: ChatCall, first: Event, events: AsyncIterator[Event],
                        writer: ChunkWriter, on_text: Callable[[], None],
                        ) -> AsyncIterator[tuple[bytes, Result | None]]:
    """The stream's chunks after the role chunk, one write per engine event; the last item
    carries the result. ``on_text`` is called before the first chunk with text."""
    splitter = call.splitter()
    pending_text = True
    event: Event | None = first
    while event is not None:
        if isinstance(event, FinishEvent):
            result = event.result
            final = splitter.finish()
            parts = [writer.piece(delta) for delta in final.deltas]
            if final.rest:
                parts.append(writer.content(final.rest))
            parts.extend(writer.tool_call(index, tool)
                         for index, tool in enumerate(final.tool_calls))
            if parts and pending_text:
                on_text()
            stats = result.stats
            parts.append(writer.finish(finish_reason(final, result),
                                       None if call.include_usage else stats))
            if call.include_usage:
                parts.append(writer.usage(stats))
            parts.append(writer.done())
            yield b"".join(parts), result
            return
        deltas = splitter.feed(event)
        if deltas:
            if pending_text:
                on_text()
                pending_text = False
            yield (writer.piece(deltas[0]) if len(deltas) == 1
                   else b"".join(writer.piece(delta) for delta in deltas)), None
        event = await anext(events, None)
    raise RuntimeError("the engine's stream ended without a FinishEvent")
