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

from pydantic import ValidationError

from specthink import prompts
from specthink.backends.base import SamplingParams
from specthink.engine import SpeculativeThinker
from specthink.errors import ConfigError
from specthink.output import FinalOutput, OutputSplitter, split_result
from specthink.rules import PRESETS, TakeoverRules
from specthink.serve.errors import invalid
from specthink.serve.protocol import ChatCompletionRequest, ChunkWriter, completion_body
from specthink.serve.settings import ServeSettings
from specthink.structured import grammar_for, json_instruction, with_system_text
from specthink.trace import Event, FinishEvent, Result

__all__ = ["ChatCall", "Thinkers", "prepare", "stream_events", "whole_answer"]

MAX_STOP_SEQUENCES = 4
"""OpenAI's limit."""


class Thinkers:
    """The engine for the server's rules, and one per other rules a request asked for, all
    over the same two backends (so the same connection pools)."""

    MAX_CACHED = 32

    def __init__(self, base: SpeculativeThinker) -> None:
        self.base = base
        self._by_rules: dict[str, SpeculativeThinker] = {}

    def for_rules(self, rules: TakeoverRules) -> SpeculativeThinker:
        key = rules.model_dump_json()
        thinker = self._by_rules.get(key)
        if thinker is None:
            base = self.base
            thinker = SpeculativeThinker(
                small=base.small, target=base.target, rules=rules,
                small_template=base.templates["small"], target_template=base.templates["target"],
                on_target_error=base.on_target_error, on_request=base.on_request)
            if len(self._by_rules) >= self.MAX_CACHED:
                self._by_rules.pop(next(iter(self._by_rules)))
            self._by_rules[key] = thinker
        return thinker


@dataclass(frozen=True, slots=True)
class ChatCall:
    """One checked request, ready for the engine."""

    thinker: SpeculativeThinker
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    tool_names: tuple[str, ...] | None
    """Offered tools whose calls count (``None``: no tools, or ``tool_choice="none"``)."""
    max_tool_calls: int | None
    stream: bool
    include_usage: bool

    def events(self) -> AsyncGenerator[Event, None]:
        """The engine's events; closing the generator closes both model servers' streams."""
        return cast(AsyncGenerator[Event, None],
                    self.thinker.astream(self.messages, **self.params))

    def splitter(self) -> OutputSplitter:
        return OutputSplitter(tools=self.tool_names, max_tool_calls=self.max_tool_calls)

    def split(self, result: Result) -> FinalOutput:
        return split_result(result, tools=self.tool_names, max_tool_calls=self.max_tool_calls)


def _checked(param: str, check: Callable[[], Any]) -> Any:
    try:
        return check()
    except ConfigError as exc:
        raise invalid(str(exc), param) from None


def _rules(request: ChatCompletionRequest, thinkers: Thinkers) -> SpeculativeThinker:
    options = request.specthink
    if options is None or options.rules is None:
        return thinkers.base
    if isinstance(options.rules, str):
        if options.rules not in PRESETS:
            raise invalid(f"unknown rules preset {options.rules!r}; choose one of "
                          f"{sorted(PRESETS)}", "specthink.rules")
        return thinkers.for_rules(TakeoverRules.preset(options.rules))
    try:
        rules = TakeoverRules.model_validate(
            {**thinkers.base.rules.model_dump(), **options.rules})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise invalid(f"specthink.rules.{where}: {first['msg']}",
                      f"specthink.rules.{where}" if where else "specthink.rules") from None
    return thinkers.for_rules(rules)


def prepare(request: ChatCompletionRequest, settings: ServeSettings, thinkers: Thinkers, *,
            session_id: str | None = None) -> ChatCall:
    """Check every field and build the engine call; any problem is a 400 naming the field."""
    thinker = _rules(request, thinkers)
    messages: list[dict[str, Any]] = _checked(
        "messages", lambda: prompts.validate_messages(request.messages))
    offered = _checked("tools", lambda: prompts.validate_tools(request.tools))
    if request.tool_choice is not None or offered:
        # The engine applies the choice itself; checked here so that a bad one is a 400.
        _checked("tool_choice",
                 lambda: prompts.apply_tool_choice(messages, offered, request.tool_choice))
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise invalid("max_tokens and max_completion_tokens disagree; send one",
                      "max_completion_tokens")
    budget = request.max_completion_tokens or request.max_tokens or settings.max_tokens
    if budget > settings.max_tokens:
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise invalid(f"{field}={budget} is above this server's limit of "
                      f"{settings.max_tokens} tokens", field)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise invalid(f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings", "stop")
    grammar = None
    if request.response_format is not None:
        response_format = request.response_format
        grammar = _checked("response_format", lambda: grammar_for(response_format))
        instruction = _checked("response_format", lambda: json_instruction(response_format))
        if instruction:
            messages = with_system_text(messages, instruction)
        # A grammar constrains the whole output, so it would make offered tools uncallable.
        if offered or not (thinker.small.supports_grammar and thinker.target.supports_grammar):
            grammar = None
    params: dict[str, Any] = {
        "max_new_tokens": budget,
        "stop": stop or None,
        "sampling": SamplingParams(temperature=request.temperature, top_p=request.top_p,
                                   seed=request.seed, grammar=grammar),
    }
    if offered:
        params["tools"] = offered
        if request.tool_choice is not None:
            params["tool_choice"] = request.tool_choice
    if session_id:
        # The engine sends it as the routing key of every generation request of the call.
        params["session_id"] = session_id
    tool_names = (tuple(tool["function"]["name"] for tool in offered)
                  if offered and request.tool_choice != "none" else None)
    return ChatCall(thinker=thinker, messages=messages, params=params, tool_names=tool_names,
                    max_tool_calls=1 if request.parallel_tool_calls is False else None,
                    stream=request.stream,
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
