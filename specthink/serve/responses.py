"""The OpenAI Responses wire (``POST /v1/responses``): the request model, its translation into
the chat-completions request that :func:`~specthink.serve.serving.prepare` checks, the
response object, and the stream of events.

One request type underneath: a Responses request becomes a
:class:`~specthink.serve.protocol.ChatCompletionRequest` (``instructions`` a system message,
input items messages, flat function tools chat tools, ``text.format`` ``response_format``,
``max_output_tokens`` ``max_completion_tokens``), so the same checks, the same engine call
and the core's :class:`~specthink.output.OutputSplitter` serve both APIs; only the shape of
what is written differs. A field this server cannot honour is a 400 naming it, as in chat.
``reasoning.effort`` is accepted and ignored: the takeover rules (``specthink.rules``) decide
how the reasoning is written, not a budget named by the client.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from specthink.output import FinalOutput, OutputDelta
from specthink.serve.errors import APIError, invalid
from specthink.serve.protocol import ChatCompletionRequest, SpecthinkOptions, parse_body
from specthink.serve.serving import ChatCall
from specthink.serve.store import ResponseStore
from specthink.tools import ToolCall
from specthink.trace import Event, FinishEvent, Result, Statistics

__all__ = [
    "EventWriter",
    "ResponsesCall",
    "ResponsesRequest",
    "not_found",
    "parse_responses_request",
    "prepare_response",
    "response_events",
]

ARGUMENT_PIECE = 32
"""Characters of a function call's arguments per ``function_call_arguments.delta`` event."""

INCLUDABLE = frozenset({"reasoning.encrypted_content"})
"""``include`` values accepted: the reasoning comes back as plain ``content`` instead."""

_CHAT_PARAMS = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
                "response_format": "text.format"}
"""A chat field ``prepare`` names, as the Responses field it came from."""


_UNION_MEMBER = re.compile(r"str$|list\[|dict\[")
"""How pydantic names the member of a union in an error's location (not a field)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_obfuscation: bool | None = None
    """Accepted and ignored: events are not padded (no side channel to close on loopback or
    behind TLS that pads nothing else either)."""


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(BaseModel):
    """Accepted so that clients which always send it work; nothing here changes the output."""

    model_config = ConfigDict(extra="forbid")

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[Any]
    instructions: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, gt=0)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    include: list[str] | None = None
    specthink: SpecthinkOptions | None = None
    # Accepted at their neutral values only.
    truncation: str | None = None
    service_tier: str | None = None
    background: bool | None = None
    top_logprobs: int | None = None
    prompt_cache_retention: str | None = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    moderation: Any = None

    def unsupported(self) -> APIError | None:
        """The first field this server cannot honour, as a 400 naming it."""
        text = self.text or TextConfig()
        extra_includes = sorted(set(self.include or ()) - INCLUDABLE)
        checks: tuple[tuple[str, bool, str], ...] = (
            ("background", bool(self.background), "background responses are not supported"),
            ("conversation", self.conversation is not None,
             "conversations are not supported; use previous_response_id"),
            ("prompt", self.prompt is not None, "stored prompts are not supported"),
            ("context_management", self.context_management is not None,
             "context management is not supported"),
            ("moderation", self.moderation is not None, "moderation is not supported"),
            ("truncation", self.truncation not in (None, "disabled"),
             "only truncation=disabled is supported (a conversation too long is a 400)"),
            ("service_tier", self.service_tier not in (None, "auto", "default"),
             "only the default service tier exists"),
            ("top_logprobs", bool(self.top_logprobs), "logprobs are not supported"),
            ("prompt_cache_retention", self.prompt_cache_retention not in (None, "in_memory"),
             "the model servers' prefix caches are in memory only"),
            ("max_tool_calls", self.max_tool_calls not in (None, 1),
             "only max_tool_calls=1 (or none) is supported"),
            ("include", bool(extra_includes), f"{extra_includes} cannot be included"),
            ("text.verbosity", text.verbosity not in (None, "medium"),
             "verbosity cannot be set"),
        )
        for param, bad, why in checks:
            if bad:
                return invalid(f"{param}: {why} by specthink serve", param, "unsupported_field")
        for param in sorted(self.model_extra or {}):
            return invalid(f"{param}: unknown or unsupported field", param, "unsupported_field")
        return None


def _param(loc: Sequence[int | str]) -> str:
    """The field a validation error names; a union's member name (``str``, ``list[any]``) is
    no field of the request."""
    return ".".join(str(part) for part in loc
                    if isinstance(part, int) or not _UNION_MEMBER.match(part))


def parse_responses_request(body: bytes) -> ResponsesRequest:
    """The request from its JSON body; malformed JSON or a wrong field is a 400."""
    return parse_body(body, ResponsesRequest, _param)


def not_found(response_id: str, param: str | None) -> APIError:
    """404 for a response this worker does not hold (never stored, expired, deleted, or kept
    by another worker)."""
    return APIError(404, f"No response {response_id!r} is held by this server (responses are "
                         "kept in memory per worker, for a limited time, and only with store "
                         "on).", type="not_found_error", param=param, code="response_not_found")


# ---- input items -> chat messages -------------------------------------------------------------

def _text(content: object, where: str) -> str:
    """Text of a message's content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of text parts", where)
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise invalid(f"{where}[{number}]: only text parts ({kind!r} given) reach a text "
                          "model", f"{where}[{number}]")
    return "".join(texts)


def _required(item: Mapping[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or (not value and name != "arguments"):
        raise invalid(f"{where}.{name} must be a non-empty string", f"{where}.{name}")
    return value


def _reasoning_text(item: Mapping[str, Any]) -> str:
    """A reasoning item's text: its ``reasoning_text`` content, else its summary."""
    for key in ("content", "summary"):
        parts = item.get(key) or []
        if isinstance(parts, list):
            text = "".join(part.get("text", "") for part in parts if isinstance(part, Mapping))
            if text:
                return text
    return ""


def messages_from_items(items: list[Any], *, first: int = 0) -> list[dict[str, Any]]:
    """Chat messages from Responses input items; an error names the item as ``input[i]``,
    counting from ``items[first]`` (what the client sent after the stored history).

    An assistant turn is the items a model wrote together: a ``reasoning`` item opens it (its
    text becomes the turn's ``reasoning_content``, which reasoning models' templates render),
    an assistant message and the ``function_call`` items that follow it join it.
    """
    messages: list[dict[str, Any]] = []
    turn: dict[str, Any] | None = None  # the assistant turn the next function_call joins
    reasoning: str | None = None  # handed back, waiting for its turn
    for index, item in enumerate(items):
        where = f"input[{index - first}]"
        if not isinstance(item, Mapping):
            raise invalid(f"{where} is a {type(item).__name__}; expected an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(f"{where}.role must be user, system, developer or assistant",
                              f"{where}.role")
            text = _text(item.get("content"), f"{where}.content")
            if role != "assistant":
                messages.append({"role": "system" if role == "developer" else role,
                                 "content": text})
                turn = None
                continue
            turn = {"role": "assistant", "content": text}
            if reasoning is not None:
                turn["reasoning_content"], reasoning = reasoning, None
            messages.append(turn)
        elif kind == "function_call":
            call = {"id": _required(item, "call_id", where), "type": "function",
                    "function": {"name": _required(item, "name", where),
                                 "arguments": _required(item, "arguments", where)}}
            if turn is None:
                turn = {"role": "assistant", "content": None}
                if reasoning is not None:
                    turn["reasoning_content"], reasoning = reasoning, None
                messages.append(turn)
            turn.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": _required(item, "call_id", where),
                             "content": _text(output, f"{where}.output")})
            turn = None
        elif kind == "reasoning":
            reasoning = _reasoning_text(item) or None
            turn = None
        else:
            raise invalid(f"{where}.type: {kind!r} items are not supported (messages, "
                          "function_call, function_call_output and reasoning are)",
                          f"{where}.type")
    return messages


_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
                "reasoning": "rs"}


def stored_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """An input item as the store keeps it and ``input_items`` lists it: with an ``id`` and a
    ``status``, a message's text as parts (what OpenAI's item objects carry)."""
    out = dict(item)
    kind = out.setdefault("type", "message")
    out.setdefault("id", _new_id(_ITEM_PREFIX[kind]))
    if kind != "reasoning":
        out.setdefault("status", "completed")
    if kind == "message" and isinstance(out.get("content"), str):
        text = out["content"]
        out["content"] = ([_output_text(text)] if out.get("role") == "assistant"
                          else [{"type": "input_text", "text": text}])
    return out


def input_items_page(items: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """``GET /v1/responses/{id}/input_items``: a page of the conversation the response
    answered, newest first unless ``order=asc``, ``limit`` (1 to 100, default 20) items after
    the item ``after``; a bad query parameter is a 400 naming it."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("order: asc or desc", "order")
    limit = query.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise invalid("limit: a number from 1 to 100", "limit")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise invalid(f"after: no input item {after!r} in this response", "after")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:int(limit)]
    return {"object": "list", "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(ordered) > len(page)}


def _chat_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else type(tool).__name__
            raise invalid(f"tools[{index}].type: only function tools are supported "
                          f"({kind!r} given)", f"tools[{index}].type", "unsupported_field")
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict")
                    if tool.get(key) is not None}
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise invalid(f"tool_choice: {choice.get('type')!r} is not supported (auto, none, required "
                  "or a function)", "tool_choice", "unsupported_field")


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    form = text.format if text is not None else None
    if form is None or form.get("type") == "text":
        return None
    if form.get("type") == "json_schema":
        schema = {key: form[key] for key in ("name", "schema", "description", "strict")
                  if key in form}
        return {"type": "json_schema", "json_schema": schema}
    return dict(form)  # json_object, or a type prepare refuses naming text.format


def chat_request(request: ResponsesRequest, history: list[dict[str, Any]],
                 ) -> tuple[ChatCompletionRequest, list[dict[str, Any]]]:
    """The chat request the engine serves, and the conversation's input items (``history``
    from ``previous_response_id``, then this request's input) to store."""
    new_items: list[Any] = ([{"type": "message", "role": "user", "content": request.input}]
                            if isinstance(request.input, str) else list(request.input))
    messages = messages_from_items([*history, *new_items], first=len(history))
    items = [*history, *(stored_item(item) for item in new_items)]
    if request.instructions:
        messages.insert(0, {"role": "system", "content": request.instructions})
    fields: dict[str, Any] = {
        "model": request.model, "messages": messages, "stream": request.stream,
        "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature, "top_p": request.top_p,
        "tools": _chat_tools(request.tools),
        "tool_choice": _chat_tool_choice(request.tool_choice),
        "parallel_tool_calls": False if request.max_tool_calls == 1
        else request.parallel_tool_calls,
        "response_format": _response_format(request.text),
        "user": request.user, "specthink": request.specthink,
    }
    # Unset fields left out: pydantic validates what it is given, and a streamed response's
    # time to its first event pays for each.
    return ChatCompletionRequest.model_validate(
        {name: value for name, value in fields.items() if value is not None}), items


# ---- the call --------------------------------------------------------------------------------

def _new_id(prefix: str) -> str:
    # 128 random bits as uuid4 has them, without building a UUID (a third of the cost): a
    # streamed response makes three ids before its first text.
    return f"{prefix}_{os.urandom(16).hex()}"


@dataclass(slots=True)
class ResponsesCall:
    """One checked Responses request: the chat call the engine serves, and what the answer
    echoes and the store keeps."""

    chat: ChatCall
    request: ResponsesRequest
    input_items: list[dict[str, Any]]
    store: bool
    id: str = field(default_factory=lambda: _new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def stream(self) -> bool:
        return self.chat.stream

    def body(self, *, status: str, output: list[dict[str, Any]],
             stats: Statistics | None = None, error: APIError | None = None,
             ) -> dict[str, Any]:
        """The response object (OpenAI's ``Response``), with the statistics under
        ``specthink`` once there are any."""
        request = self.request
        text_format = (request.text.format if request.text and request.text.format
                       else {"type": "text"})
        reasoning = request.reasoning
        body: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "model": request.model, "output": output,
            "error": None if error is None else {"code": "server_error",
                                                 "message": error.message},
            "incomplete_details": ({"reason": "max_output_tokens"}
                                   if status == "incomplete" else None),
            "instructions": request.instructions, "metadata": request.metadata or {},
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": request.max_tool_calls,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": reasoning.effort if reasoning else None,
                          "summary": reasoning.summary if reasoning else None},
            "temperature": request.temperature, "top_p": request.top_p,
            "text": {"format": text_format, "verbosity": "medium"},
            "tool_choice": _echo_tool_choice(request.tool_choice),
            "tools": [_echo_tool(tool) for tool in request.tools or []],
            "truncation": "disabled", "background": False, "service_tier": "default",
            "store": self.store,
            "user": request.user, "safety_identifier": request.safety_identifier,
            "prompt_cache_key": request.prompt_cache_key,
            "usage": None if stats is None else usage(stats),
        }
        if status in ("completed", "incomplete"):
            body["completed_at"] = int(time.time())
        if stats is not None:
            body["specthink"] = stats.to_dict()
        return body

    async def result(self) -> Result:
        """The whole answer, from the same event stream a streamed response writes."""
        events = self.chat.events()
        try:
            async for event in events:
                if isinstance(event, FinishEvent):
                    return event.result
        finally:
            await events.aclose()
        raise RuntimeError("the engine's stream ended without a FinishEvent")

    def whole(self, result: Result) -> dict[str, Any]:
        """The non-streamed answer."""
        output = self.chat.split(result)
        items: list[dict[str, Any]] = []
        if output.reasoning:
            items.append(reasoning_item(_new_id("rs"), output.reasoning))
        if output.answer or not output.tool_calls:
            items.append(message_item(_new_id("msg"), output.answer))
        items.extend(function_call_item(_new_id("fc"), call) for call in output.tool_calls)
        status = _status(output, result.stats)
        if status == "incomplete":
            items[-1]["status"] = "incomplete"
        return self.body(status=status, output=items, stats=result.stats)

    def keep(self, store: ResponseStore, body: dict[str, Any]) -> None:
        if self.store:
            store.put(body, self.input_items)


def _echo_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any]:
    return "auto" if choice is None else choice


def _echo_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "function", "name": tool.get("name"),
            "description": tool.get("description"), "parameters": tool.get("parameters"),
            "strict": tool.get("strict")}


def _status(output: FinalOutput, stats: Statistics) -> str:
    cut = stats.finish_reason == "length" and not output.tool_calls
    return "incomplete" if cut else "completed"


def usage(stats: Statistics) -> dict[str, Any]:
    """The Responses API's ``usage``."""
    return {"input_tokens": stats.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": stats.output_tokens,
            "output_tokens_details": {"reasoning_tokens": stats.reasoning_tokens},
            "total_tokens": stats.input_tokens + stats.output_tokens}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    """The reasoning as vLLM and gpt-oss-style servers give it: ``content`` of type
    ``reasoning_text``, no summary."""
    return {"id": item_id, "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [_output_text(text)]}


def function_call_item(item_id: str, call: ToolCall, status: str = "completed",
                       ) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call.id, "name": call.name,
            "arguments": call.to_openai()["function"]["arguments"], "status": status}


def prepare_response(request: ResponsesRequest, store: ResponseStore,
                     prepare_chat: Callable[[ChatCompletionRequest], ChatCall]) -> ResponsesCall:
    """Check the request and build the engine call through ``prepare_chat`` (the chat path's
    ``prepare``, with the route's settings, engine and routing key); any problem is a 400
    naming the Responses field, an unknown ``previous_response_id`` a 404."""
    history: list[dict[str, Any]] = []
    if request.previous_response_id is not None:
        previous = store.get(request.previous_response_id)
        if previous is None:
            raise not_found(request.previous_response_id, "previous_response_id")
        history = previous.conversation()
    chat, items = chat_request(request, history)
    try:
        call = prepare_chat(chat)
    except APIError as exc:
        exc.param = responses_param(exc.param)
        raise
    return ResponsesCall(chat=call, request=request, input_items=items,
                         store=request.store is not False and store.enabled)


def responses_param(param: str | None) -> str | None:
    """The Responses field a chat parameter came from. A message index is dropped: chat
    messages do not count like input items (instructions, joined assistant turns)."""
    if param is None:
        return None
    head = re.split(r"[.\[]", param, maxsplit=1)[0]
    if head == "messages":
        return "input"
    if head in _CHAT_PARAMS:
        return _CHAT_PARAMS[head] + param[len(head):]
    return param


# ---- the stream --------------------------------------------------------------------------------

_Kind = Literal["reasoning", "answer"]


class EventWriter:
    """Server-sent events of one streamed response, each with the next ``sequence_number``;
    it keeps the output items as they are finished, for the final response object."""

    __slots__ = ("_delta_frame", "_item", "_kind", "_sequence", "_text", "call", "final",
                 "output")

    def __init__(self, call: ResponsesCall) -> None:
        self.call = call
        self.output: list[dict[str, Any]] = []
        self._sequence = 0
        self._item: dict[str, Any] | None = None
        self._kind: _Kind | None = None
        self._text: list[str] = []
        self._delta_frame = (b"", b"")
        """A delta event of the open item, before its sequence number and after its text."""
        self.final: dict[str, Any] | None = None
        """The whole response object of the terminal event, once it is written."""

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self._sequence, **fields})
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _response_event(self, kind: str, response: bytes) -> bytes:
        """An event whose one field is the response object, already serialised."""
        head = orjson.dumps({"type": kind, "sequence_number": self._sequence})
        self._sequence += 1
        return (b"event: " + kind.encode() + b"\ndata: " + head[:-1] + b',"response":'
                + response + b"}\n\n")

    def start(self) -> bytes:
        """``response.created`` and ``response.in_progress`` (one response object, serialised
        once for both)."""
        body = orjson.dumps(self.call.body(status="in_progress", output=[]))
        return (self._response_event("response.created", body)
                + self._response_event("response.in_progress", body))

    def piece(self, delta: OutputDelta) -> bytes:
        out = b""
        if delta.kind != self._kind:
            out = self._close() + self._open(delta.kind)
        self._text.append(delta.text)
        # Every delta event of an item is the same but for its sequence number and text: the
        # rest is serialised once per item (this runs for every token).
        sequence = self._sequence
        self._sequence += 1
        head, tail = self._delta_frame
        return (out + head + str(sequence).encode() + b',"delta":' + orjson.dumps(delta.text)
                + tail)

    def _open(self, kind: _Kind) -> bytes:
        if kind == "reasoning":
            item = reasoning_item(_new_id("rs"), "", "in_progress")
            item["content"] = []
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = message_item(_new_id("msg"), "", "in_progress")
            item["content"] = []
            part = _output_text("")
        self._item, self._kind, self._text = item, kind, []
        index = len(self.output)
        event = "response.reasoning_text.delta" if kind == "reasoning" \
            else "response.output_text.delta"
        fields = orjson.dumps({"item_id": item["id"], "output_index": index,
                               "content_index": 0,
                               **({} if kind == "reasoning" else {"logprobs": []})})
        self._delta_frame = (
            b"event: " + event.encode() + b'\ndata: {"type":"' + event.encode()
            + b'","sequence_number":', b"," + fields[1:] + b"\n\n")
        return (self._event("response.output_item.added", output_index=index, item=item)
                + self._event("response.content_part.added", item_id=item["id"],
                              output_index=index, content_index=0, part=part))

    def _close(self, status: str = "completed") -> bytes:
        item, kind = self._item, self._kind
        if item is None:
            return b""
        text = "".join(self._text)
        index = len(self.output)
        if kind == "reasoning":
            done = reasoning_item(item["id"], text, status)
            part = done["content"][0]
            out = self._event("response.reasoning_text.done", item_id=item["id"],
                              output_index=index, content_index=0, text=text)
        else:
            done = message_item(item["id"], text, status)
            part = done["content"][0]
            out = self._event("response.output_text.done", item_id=item["id"],
                              output_index=index, content_index=0, text=text, logprobs=[])
        out += self._event("response.content_part.done", item_id=item["id"],
                           output_index=index, content_index=0, part=part)
        out += self._event("response.output_item.done", output_index=index, item=done)
        self.output.append(done)
        self._item = self._kind = None
        return out

    def finish(self, final: FinalOutput, result: Result) -> bytes:
        """What was held back, the function calls, and ``response.completed`` (or
        ``response.incomplete`` when the token budget ended it)."""
        parts = [self.piece(delta) for delta in final.deltas]
        if final.rest:
            parts.append(self.piece(OutputDelta("answer", final.rest)))
        status = _status(final, result.stats)
        said = self._kind == "answer" or any(i["type"] == "message" for i in self.output)
        if not said and not final.tool_calls:
            parts.append(self._close() + self._open("answer"))  # an answer, if an empty one
        parts.append(self._close("incomplete" if status == "incomplete" else "completed"))
        parts.extend(self._function_call(call) for call in final.tool_calls)
        body = self.call.body(status=status, output=self.output, stats=result.stats)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        parts.append(self._event(kind, response=body))
        self.final = body
        return b"".join(parts)

    def _function_call(self, call: ToolCall) -> bytes:
        """Added with empty arguments, the arguments in pieces, done (as OpenAI streams)."""
        item_id = _new_id("fc")
        index = len(self.output)
        started = function_call_item(item_id, call, "in_progress")
        arguments = started["arguments"]
        started["arguments"] = ""
        out = [self._event("response.output_item.added", output_index=index, item=started)]
        out.extend(self._event("response.function_call_arguments.delta", item_id=item_id,
                               output_index=index, delta=arguments[at:at + ARGUMENT_PIECE])
                   for at in range(0, len(arguments), ARGUMENT_PIECE))
        out.append(self._event("response.function_call_arguments.done", item_id=item_id,
                               output_index=index, name=call.name, arguments=arguments))
        done = function_call_item(item_id, call)
        out.append(self._event("response.output_item.done", output_index=index, item=done))
        self.output.append(done)
        return b"".join(out)

    def error(self, error: APIError) -> bytes:
        """``response.failed`` after the stream began, with what was finished so far (the
        same name as :meth:`ChunkWriter.error <specthink.serve.protocol.ChunkWriter.error>`,
        so code that ends either kind of stream with an error writes both)."""
        body = self.call.body(status="failed", output=self.output, error=error)
        self.final = body
        return self._event("response.failed", response=body)

    @staticmethod
    def done() -> bytes:
        """Nothing: a Responses stream ends with its terminal event, not ``[DONE]``."""
        return b""


async def response_events(call: ResponsesCall, first: Event, events: AsyncIterator[Event],
                          writer: EventWriter, on_text: Callable[[], None],
                          ) -> AsyncIterator[tuple[bytes, Result | None]]:
    """The stream's events after ``writer.start()``, one write per engine event; the last item
    carries the result. ``on_text`` is called before the first event with text."""
    splitter = call.chat.splitter()
    pending_text = True
    event: Event | None = first
    while event is not None:
        if isinstance(event, FinishEvent):
            final = splitter.finish()
            if pending_text and (final.deltas or final.rest or final.tool_calls):
                on_text()
            yield writer.finish(final, event.result), event.result
            return
        deltas = splitter.feed(event)
        if deltas:
            if pending_text:
                on_text()
                pending_text = False
            yield b"".join(writer.piece(delta) for delta in deltas), None
        event = await anext(events, None)
    raise RuntimeError("the engine's stream ended without a FinishEvent")
