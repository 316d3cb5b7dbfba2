"""Text Generation Inference: ``/generate_stream``, ``/info``, ``/health``, ``/tokenize`` and
``/chat_tokenize``, spoken with httpx.

Layers, as in TGI's own client: a pure request builder (:func:`generate_parameters`), a pure
event decoder (:func:`decode_stream_event`), the shared error mapper
(``specthink.errors.error_from_response``) and thin I/O methods on :class:`TGIBackend`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from specthink.backends._http import ServerSentEvent, SSEStream, loads_json
from specthink.backends._httpbackend import (
    HTTPBackend,
    event_json,
    malformed_event,
    no_finish_reason,
    sampling_fields,
)
from specthink.backends.base import FinishReason, SamplingParams, ServerInfo, StreamToken
from specthink.errors import (
    BackendError,
    BackendStatusError,
    ConfigError,
    SpecthinkError,
    StreamErrorEvent,
)

__all__ = ["TGIBackend", "decode_stream_event", "generate_parameters"]

_FINISH: dict[str, FinishReason] = {
    "eos_token": "eos",
    "length": "length",
    "stop_sequence": "stop",
}


def generate_parameters(max_new_tokens: int, sampling: SamplingParams) -> dict[str, Any]:
    """The ``parameters`` object of a TGI generate request.

    Greedy decoding is ``do_sample=false`` with no temperature and no top_p: TGI answers
    ``temperature=0`` and ``top_p=1.0`` with a 422, and any of temperature, top_p or top_k
    switches it to sampling.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens, "details": True,
                              "do_sample": not sampling.greedy, **sampling_fields(sampling)}
    if sampling.grammar is not None:
        params["grammar"] = sampling.grammar
    return params


def _error_event(payload: dict[str, Any], url: str, tokens_received: int) -> StreamErrorEvent:
    return StreamErrorEvent(str(payload.get("error") or "error event"), url=url,
                            error_type=payload.get("error_type"),
                            tokens_received=tokens_received)


def decode_stream_event(payload: dict[str, Any], *, url: str = "",
                        tokens_received: int = 0) -> StreamToken:
    """One ``/generate_stream`` event (a ``StreamResponse``) as a :class:`StreamToken`.

    Raises :class:`StreamErrorEvent` for an ``{"error", "error_type"}`` event.
    """
    if "error" in payload:
        raise _error_event(payload, url, tokens_received)
    token = payload.get("token") or {}
    special = bool(token.get("special"))
    details = payload.get("details")
    finish: FinishReason | None = None
    input_tokens: int | None = None
    if isinstance(details, dict):
        finish = _FINISH.get(str(details.get("finish_reason")), "eos")
        length = details.get("input_length")
        input_tokens = length if isinstance(length, int) else None
    elif payload.get("generated_text") is not None:
        # details=false (never sent by us, but a proxy might strip it): the end is still marked.
        finish = "eos" if special else "length"
    return StreamToken("" if special else str(token.get("text", "")), special, finish,
                       input_tokens)


class _TokenStream:
    """Async iterator of :class:`StreamToken` over an open ``/generate_stream`` response."""

    def __init__(self, stream: SSEStream) -> None:
        self._stream = stream
        self._finished = False

    def __aiter__(self) -> _TokenStream:
        return self

    async def __anext__(self) -> StreamToken:
        stream = self._stream
        while True:
            event = await stream.next_event()
            if event is None:
                if self._finished:
                    raise StopAsyncIteration
                raise no_finish_reason(stream.url, stream.tokens_received)
            if self._finished or event.data == "[DONE]":
                continue  # drain to the end so the connection can be reused
            try:  # event_json, inlined: this runs for every token
                payload = loads_json(event.data)
            except ValueError as exc:
                raise malformed_event(event, stream.url, stream.tokens_received) from exc
            if not isinstance(payload, dict):
                continue
            token = decode_stream_event(payload, url=stream.url,
                                        tokens_received=stream.tokens_received)
            stream.tokens_received += 1
            if token.finish_reason is not None:
                self._finished = True
            return token


class TGIBackend(HTTPBackend):
    """A Text Generation Inference server.

    Example::

        backend = TGIBackend("http://127.0.0.1:8080")
        async with backend.stream(prompt, max_new_tokens=64, sampling=SamplingParams()) as tokens:
            async for token in tokens:
                print(token.text, end="")
        await backend.aclose()

    ``api_key`` (default: ``$SPECTHINK_API_KEY``) is sent as ``Authorization: Bearer``.
    Timeouts bound connecting and the gap between two bytes, never a whole stream; they apply
    to a passed-in ``client`` too. Requests that fail before their first token with 429, 503, a
    refused connection or an in-stream ``overloaded`` event are retried up to ``max_retries``
    times, with exponential backoff from ``retry_backoff`` to ``retry_max_backoff`` seconds.
    """

    adds_bos_token = True
    """TGI tokenizes ``inputs`` with special tokens: a rendered template must not carry BOS."""
    supports_grammar = True
    renders_chat_template = True
    """``/chat_tokenize`` applies the model's own chat template (``small_template="auto"``)."""
    keeps_tool_turns = False
    """TGI 3.3 keeps only role and content of each message it renders."""

    async def _stream_request(self, prompt: str, max_new_tokens: int,
                              sampling: SamplingParams) -> tuple[str, dict[str, Any]]:
        return "/generate_stream", {"inputs": prompt,
                                    "parameters": generate_parameters(max_new_tokens, sampling)}

    def _check_first(self, event: ServerSentEvent) -> None:
        payload = event_json(event, self.url, 0)
        if isinstance(payload, dict) and "error" in payload:
            raise _error_event(payload, self.url, 0)

    def _tokens(self, stream: SSEStream) -> AsyncIterator[StreamToken]:
        return _TokenStream(stream)

    async def info(self) -> ServerInfo:
        """``GET /info``, fetched once."""
        if self._info is None:
            raw = await self._conn.request_json("GET", "/info")
            if not isinstance(raw, dict) or "model_id" not in raw:
                raise BackendError(f"/info answered without a model_id: {str(raw)[:200]}",
                                   url=self.url)
            self._info = ServerInfo(
                model_id=str(raw["model_id"]),
                # TGI before 2.1 called it max_input_length.
                max_input_tokens=_opt_int(raw.get("max_input_tokens",
                                                  raw.get("max_input_length"))),
                max_total_tokens=_opt_int(raw.get("max_total_tokens")),
                max_stop_sequences=_opt_int(raw.get("max_stop_sequences")),
                raw=raw)
        return self._info

    async def health(self) -> bool:
        """``GET /health``: True when the server answers 200; False when it is down or
        unreachable."""
        try:
            await self._conn.request("GET", "/health", retry=False)
        except SpecthinkError:
            return False
        return True

    async def count_tokens(self, text: str) -> int:
        """``POST /tokenize``: the server's token count, special tokens (BOS) included."""
        tokens = await self._conn.request_json("POST", "/tokenize", {"inputs": text})
        if not isinstance(tokens, list):
            raise BackendError(f"/tokenize answered {str(tokens)[:200]}", url=self.url)
        return len(tokens)

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None) -> str | None:
        """``POST /chat_tokenize``: the model's own chat template with the generation prompt.

        ``None`` when the server has no such endpoint (TGI before 2.2). TGI 3.3 keeps only
        ``role`` and ``content`` of each message.
        """
        body: dict[str, Any] = {"model": "tgi", "messages": list(messages)}
        if tools:
            body["tools"] = list(tools)
        try:
            answer = await self._conn.request_json("POST", "/chat_tokenize", body)
        except BackendStatusError as exc:
            if exc.status_code in (404, 405):
                return None
            raise
        text = answer.get("templated_text") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise BackendError(f"/chat_tokenize answered {json.dumps(answer)[:200]}",
                               url=self.url)
        return text


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
