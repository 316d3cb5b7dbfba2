"""The OpenAI chat-completions wire: the request model, and the response and chunk bodies.

The request is a pydantic model; a field OpenAI defines that this server cannot honour
(``logprobs``, ``n`` above 1, audio, ...) and any field OpenAI does not define are a 400 that
names the field: nothing a client asks for is silently ignored. Responses are plain dicts
serialised with orjson (they sit on every token's path); the tests parse them with the
``openai`` package's own types.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specthink._json import MAX_JSON_DEPTH, depth_exceeds
from specthink.output import OutputDelta
from specthink.serve.errors import APIError, invalid
from specthink.serve.settings import ReasoningField
from specthink.tools import ToolCall
from specthink.trace import Statistics

__all__ = [
    "ChatCompletionRequest",
    "ChunkWriter",
    "SpecthinkOptions",
    "StreamOptions",
    "completion_body",
    "parse_request",
    "usage",
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class SpecthinkOptions(BaseModel):
    """The request's own ``specthink`` object."""

    model_config = ConfigDict(extra="forbid")

    rules: str | dict[str, Any] | None = None
    """A preset name, or field overrides of the server's rules (``{"n1": 30}``)."""


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Messages are checked by the core
    (``specthink.prompts.validate_messages``), so the server and the libraries agree."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Any]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    n: int | None = None
    user: str | None = None
    specthink: SpecthinkOptions | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM's per-request chat template variables (``{"enable_thinking": false}``), over the
    server's ``template_kwargs``."""
    # Accepted at their neutral values only (clients send them explicitly).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None

    def unsupported(self) -> APIError | None:
        """The first field this server cannot honour, as a 400 naming it."""
        checks: tuple[tuple[str, bool, str], ...] = (
            ("n", self.n not in (None, 1), "only n=1 is supported"),
            ("logprobs", bool(self.logprobs), "logprobs are not supported"),
            ("top_logprobs", bool(self.top_logprobs), "logprobs are not supported"),
            ("frequency_penalty", bool(self.frequency_penalty),
             "frequency_penalty is not supported"),
            ("presence_penalty", bool(self.presence_penalty),
             "presence_penalty is not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            ("modalities", self.modalities not in (None, ["text"]),
             "only text output is supported"),
            ("audio", self.audio is not None, "audio output is not supported"),
            ("prediction", self.prediction is not None, "predicted outputs are not supported"),
        )
        for field, bad, why in checks:
            if bad:
                return invalid(f"{field}: {why} by specthink serve", field, "unsupported_field")
        for field in sorted(self.model_extra or {}):
            return invalid(f"{field}: unknown or unsupported field", field, "unsupported_field")
        return None


def check_nesting(data: Mapping[str, Any]) -> None:
    """A 400 naming the first top-level field nested deeper than ``MAX_JSON_DEPTH``; run on a
    parsed body before anything that recurses (validation, templates, grammars) sees it."""
    for field, value in data.items():
        if depth_exceeds(value, MAX_JSON_DEPTH):
            raise invalid(f"{field}: JSON nested more than {MAX_JSON_DEPTH} levels deep",
                          field, "nesting_too_deep")


class _Checked(Protocol):
    def unsupported(self) -> APIError | None: ...


_Request = TypeVar("_Request", bound=BaseModel)


def dotted(loc: Sequence[int | str]) -> str:
    """A validation error's location as the field it names (``messages.0.content``)."""
    return ".".join(str(part) for part in loc)


def parse_body(body: bytes, model: type[_Request],
               param_of: Callable[[Sequence[int | str]], str] = dotted) -> _Request:
    """A request of ``model`` from its JSON body; malformed JSON, nesting too deep, a wrong
    field or one the server cannot honour (the model's ``unsupported()``) is a 400 naming it."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("The body must be a JSON object.", None, "invalid_json")
    check_nesting(data)
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = param_of(first["loc"])
        raise invalid(f"{param}: {first['msg']}", param or None) from None
    problem = cast(_Checked, request).unsupported()
    if problem is not None:
        raise problem
    return request


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The chat request from its JSON body; malformed JSON or a wrong field is a 400."""
    return parse_body(body, ChatCompletionRequest)


def usage(stats: Statistics) -> dict[str, Any]:
    """OpenAI's ``usage``, with the reasoning tokens in ``completion_tokens_details``."""
    return {
        "prompt_tokens": stats.input_tokens,
        "completion_tokens": stats.output_tokens,
        "total_tokens": stats.input_tokens + stats.output_tokens,
        "completion_tokens_details": {"reasoning_tokens": stats.reasoning_tokens},
    }


def _reasoning_fields(field: ReasoningField) -> tuple[str, ...]:
    return ("reasoning_content", "reasoning") if field == "both" else (field,)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_body(*, model: str, reasoning: str, content: str, tool_calls: list[ToolCall],
                    finish_reason: str, stats: Statistics,
                    reasoning_field: ReasoningField) -> dict[str, Any]:
    """The whole (non-streamed) answer."""
    message: dict[str, Any] = {"role": "assistant",
                               "content": content if content or not tool_calls else None}
    if reasoning:
        for name in _reasoning_fields(reasoning_field):
            message[name] = reasoning
    if tool_calls:
        message["tool_calls"] = [call.to_openai() for call in tool_calls]
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": usage(stats),
        "specthink": stats.to_dict(),
    }


ARGUMENT_PIECE = 32
"""Characters of a tool call's arguments per chunk (OpenAI streams them in pieces)."""


class ChunkWriter:
    """Server-sent events of one streamed answer: one ``id`` and ``created`` for every chunk."""

    __slots__ = ("_envelope", "_fields")

    def __init__(self, model: str, reasoning_field: ReasoningField) -> None:
        self._fields = _reasoning_fields(reasoning_field)
        # Every chunk starts the same; only the choices differ.
        self._envelope = {"id": completion_id(), "object": "chat.completion.chunk",
                          "created": int(time.time()), "model": model}

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**self._envelope, "choices": choices, **extra}) \
            + b"\n\n"

    def _delta(self, delta: Mapping[str, Any], finish_reason: str | None = None) -> bytes:
        return self._event([{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}])

    def role(self) -> bytes:
        """The first chunk: ``{"role": "assistant", "content": ""}`` (LlamaIndex drops a first
        chunk without content)."""
        return self._delta({"role": "assistant", "content": ""})

    def piece(self, delta: OutputDelta) -> bytes:
        if delta.kind == "reasoning":
            return self._delta({name: delta.text for name in self._fields})
        return self._delta({"content": delta.text})

    def content(self, text: str) -> bytes:
        return self._delta({"content": text})

    def tool_call(self, index: int, call: ToolCall) -> bytes:
        """Id and name first, then the arguments in pieces."""
        arguments = call.to_openai()["function"]["arguments"]
        out = [self._delta({"tool_calls": [{
            "index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": ""}}]})]
        for at in range(0, len(arguments), ARGUMENT_PIECE):
            out.append(self._delta({"tool_calls": [{
                "index": index, "function": {"arguments": arguments[at:at + ARGUMENT_PIECE]}}]}))
        return b"".join(out)

    def finish(self, finish_reason: str, stats: Statistics | None) -> bytes:
        """The chunk with ``finish_reason``; the statistics ride on it unless a usage chunk
        follows."""
        extra = {} if stats is None else {"specthink": stats.to_dict()}
        return self._event([{"index": 0, "delta": {}, "logprobs": None,
                             "finish_reason": finish_reason}], **extra)

    def usage(self, stats: Statistics) -> bytes:
        """``stream_options.include_usage``: ``choices: []``, the usage and the statistics."""
        return self._event([], usage=usage(stats), specthink=stats.to_dict())

    @staticmethod
    def error(error: APIError) -> bytes:
        """An error after the stream began (the status line is already sent)."""
        return b"data: " + error.json() + b"\n\n"

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"
