"""OpenAI-compatible ``/v1/completions`` (vLLM, SGLang, llama.cpp's and llama-cpp-python's
servers, TGI), spoken with httpx over raw prompts: the chat template is rendered client-side.

Layers: a pure request builder (:func:`completion_body`), a pure chunk decoder
(:class:`CompletionDecoder`), the shared error mapper and thin I/O on
:class:`OpenAICompletionsBackend`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import httpx

from specthink import _constants
from specthink.backends._http import ServerSentEvent, SSEStream
from specthink.backends._httpbackend import (
    HTTPBackend,
    event_json,
    no_finish_reason,
    sampling_fields,
)
from specthink.backends.base import FinishReason, SamplingParams, ServerInfo, StreamToken
from specthink.errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    ConfigError,
    StreamDroppedError,
    StreamErrorEvent,
)

__all__ = ["CompletionDecoder", "OpenAICompletionsBackend", "completion_body"]

logger = logging.getLogger("specthink.backends")

_FINISH: dict[str, FinishReason] = {
    # No stop sequences are ever sent, so "stop" can only mean end-of-sequence.
    "stop": "eos",
    "eos_token": "eos",  # TGI's /v1/completions stream
    "length": "length",
    "stop_sequence": "stop",
}

TokenizeMethod = Literal["vllm", "tgi", "llama_cpp", "llama_cpp_python", "estimate"]


def completion_body(prompt: str, *, model: str | None, max_new_tokens: int,
                    sampling: SamplingParams) -> dict[str, Any]:
    """The JSON body of a streamed ``/v1/completions`` request. Greedy is ``temperature=0``,
    which OpenAI-compatible servers accept (TGI maps it to ``do_sample=false``)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if sampling.grammar is not None:
        raise ConfigError("grammar is not supported by the OpenAI-compatible backend "
                          "(supports_grammar is False); use TGIBackend for constrained output")
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max_new_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    if sampling.greedy:
        body["temperature"] = 0.0
    body.update(sampling_fields(sampling))
    return body


PROXY_STREAM_ERROR = "stream_error"
"""The error type a router (smg) sends in the stream when its upstream replica's body broke off:
the same as a dropped connection, so the engine resumes (through the router, on a live replica)."""


def _error_event(payload: dict[str, Any], url: str,
                 tokens_received: int) -> StreamErrorEvent | StreamDroppedError:
    error = payload.get("error")
    if isinstance(error, dict):  # OpenAI / newer vLLM: {"error": {"message", "type"}}
        message, error_type = error.get("message"), error.get("type")
    elif error is not None:  # TGI: {"error", "error_type"}
        message, error_type = error, payload.get("error_type")
    else:  # older vLLM: {"object": "error", "message", "type"}
        message, error_type = payload.get("message"), payload.get("type")
    if error_type == PROXY_STREAM_ERROR:
        return StreamDroppedError(f"the router's upstream stream broke: {message}", url=url,
                                  tokens_received=tokens_received)
    return StreamErrorEvent(str(message or "error event"), url=url,
                            error_type=None if error_type is None else str(error_type),
                            tokens_received=tokens_received)


def _is_error(payload: object) -> bool:
    return isinstance(payload, dict) and ("error" in payload or payload.get("object") == "error")


class CompletionDecoder:
    """Chunks of a streamed completion in, :class:`StreamToken` out.

    The token that finishes the answer is held back until the usage arrives (vLLM sends it in a
    chunk of its own after the finish, TGI in the same chunk), so that it can carry
    ``input_tokens``. TGI's stream gives the end-of-sequence token's text (e.g. ``</s>``) with
    finish reason ``eos_token``: that token becomes a special one.
    """

    def __init__(self, *, url: str = "") -> None:
        self.url = url
        self.tokens_received = 0
        self._held: StreamToken | None = None
        self.finished = False

    def feed(self, payload: Any) -> list[StreamToken]:
        if _is_error(payload):
            raise _error_event(payload, self.url, self.tokens_received)
        if not isinstance(payload, dict):
            return []
        out: list[StreamToken] = []
        usage = payload.get("usage")
        prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            text = str(choice.get("text") or "")
            reason = choice.get("finish_reason")
            self.tokens_received += 1
            if not reason:
                out.append(StreamToken(text))
                continue
            special = reason == "eos_token" or not text
            finish = _FINISH.get(str(reason), "eos")
            self._held = StreamToken("" if special else text, special, finish)
        if self._held is not None and isinstance(prompt_tokens, int):
            out.append(self._release(prompt_tokens))
        return out

    @property
    def holding(self) -> bool:
        """The finishing token has arrived and waits for the usage."""
        return self._held is not None

    def end(self) -> list[StreamToken]:
        """The stream ended (``[DONE]`` or end of body): release a held finishing token."""
        return [self._release(None)] if self._held is not None else []

    def _release(self, prompt_tokens: int | None) -> StreamToken:
        held = self._held
        assert held is not None
        self._held = None
        self.finished = True
        return StreamToken(held.text, held.special, held.finish_reason, prompt_tokens)


class _TokenStream:
    def __init__(self, stream: SSEStream) -> None:
        self._stream = stream
        self._decoder = CompletionDecoder(url=stream.url)
        self._ready: deque[StreamToken] = deque()
        self._done = False

    def __aiter__(self) -> _TokenStream:
        return self

    async def __anext__(self) -> StreamToken:
        stream, decoder = self._stream, self._decoder
        while not self._ready:
            if self._done:
                raise StopAsyncIteration
            try:
                event = await stream.next_event()
            except (StreamDroppedError, BackendTimeoutError, BackendConnectionError):
                if not decoder.holding:
                    raise
                # The answer was complete; only the trailing usage chunk was lost.
                self._ready.extend(self._end())
                continue
            if event is None or event.data == "[DONE]":
                self._ready.extend(self._end())
                if not self._ready and not decoder.finished:
                    raise no_finish_reason(stream.url, decoder.tokens_received)
                continue
            if decoder.finished:
                continue  # drain what follows the answer, so the connection can be reused
            payload = event_json(event, stream.url, decoder.tokens_received)
            self._ready.extend(decoder.feed(payload))
            stream.tokens_received = decoder.tokens_received
        return self._ready.popleft()

    def _end(self) -> list[StreamToken]:
        self._done = True
        return self._decoder.end()


class OpenAICompletionsBackend(HTTPBackend):
    """An OpenAI-compatible completions server (vLLM, SGLang, llama.cpp, TGI's ``/v1``).

    Example::

        backend = OpenAICompletionsBackend("http://127.0.0.1:8000", model="Qwen/Qwen2.5-7B")
        async with backend.stream(prompt, max_new_tokens=64, sampling=SamplingParams()) as tokens:
            async for token in tokens:
                print(token.text, end="")
        await backend.aclose()

    ``model`` defaults to the first id of ``/v1/models`` (for TGI pass ``model="tgi"``: TGI
    reads any other name as a LoRA adapter id). Chat templates are rendered client-side:
    :meth:`render_chat` returns ``None``. Auth, timeouts and retries as :class:`TGIBackend`.
    """

    adds_bos_token = True
    """vLLM, SGLang and llama.cpp tokenize raw prompts with BOS, as TGI does."""
    supports_grammar = False
    keeps_tool_turns = True

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 client: httpx.AsyncClient | None = None,
                 timeout: httpx.Timeout | float | None = None,
                 connect_timeout: float = _constants.DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float | None = _constants.DEFAULT_READ_TIMEOUT,
                 max_retries: int = _constants.DEFAULT_MAX_RETRIES,
                 retry_backoff: float = _constants.RETRY_INITIAL_BACKOFF,
                 retry_max_backoff: float = _constants.RETRY_MAX_BACKOFF,
                 retry_deadline: float | None = _constants.RETRY_DEADLINE) -> None:
        url = url.rstrip("/") if isinstance(url, str) else url
        if isinstance(url, str) and url.endswith("/v1"):
            url = url[: -len("/v1")]  # accept the OpenAI SDK's base_url spelling too
        super().__init__(url, api_key=api_key, client=client, timeout=timeout,
                         connect_timeout=connect_timeout, read_timeout=read_timeout,
                         max_retries=max_retries, retry_backoff=retry_backoff,
                         retry_max_backoff=retry_max_backoff, retry_deadline=retry_deadline)
        self.model = model
        self.tokenize_method: TokenizeMethod | None = None
        """Which token-counting endpoint worked (found on the first ``count_tokens``)."""

    def _repr_details(self) -> str:
        return f", model={self.model!r}" if self.model else ""

    async def _model(self) -> str:
        if self.model is None:
            self.model = (await self.info()).model_id
        return self.model

    async def _stream_request(self, prompt: str, max_new_tokens: int,
                              sampling: SamplingParams) -> tuple[str, dict[str, Any]]:
        return "/v1/completions", completion_body(prompt, model=await self._model(),
                                                  max_new_tokens=max_new_tokens,
                                                  sampling=sampling)

    def _check_first(self, event: ServerSentEvent) -> None:
        if event.data == "[DONE]":
            return
        try:
            payload = event.json()
        except ValueError:
            return  # reported, with context, when the stream is read
        if _is_error(payload):
            raise _error_event(payload, self.url, 0)

    def _tokens(self, stream: SSEStream) -> AsyncIterator[StreamToken]:
        return _TokenStream(stream)

    async def info(self) -> ServerInfo:
        """``GET /v1/models``, fetched once: the model id (``model`` if given and listed), and
        the context length where the server reports one (vLLM's ``max_model_len``)."""
        if self._info is None:
            raw = await self._conn.request_json("GET", "/v1/models")
            data = raw.get("data") if isinstance(raw, dict) else None
            entries = [e for e in data or () if isinstance(e, dict) and "id" in e]
            if not entries:
                raise BackendError(f"/v1/models lists no model: {str(raw)[:200]}", url=self.url)
            entry = next((e for e in entries if e["id"] == self.model), entries[0])
            max_len = entry.get("max_model_len")
            max_len = max_len if isinstance(max_len, int) and max_len > 0 else None
            self._info = ServerInfo(
                model_id=str(entry["id"]),
                # A prompt must leave room for at least one new token.
                max_input_tokens=max_len - 1 if max_len else None,
                max_total_tokens=max_len,
                raw=raw)
        return self._info

    async def health(self) -> bool:
        """True when ``/health`` (vLLM, SGLang, TGI, llama.cpp) or else ``/v1/models`` answers
        200; False when the server is down or unreachable."""
        for path in ("/health", "/v1/models"):
            try:
                await self._conn.request("GET", path, retry=False)
            except BackendStatusError as exc:
                if exc.status_code == 404:
                    continue
                return False
            except BackendError:
                return False
            return True
        return False

    async def count_tokens(self, text: str) -> int:
        """The server's token count, BOS included where the server adds it.

        Tried in order: vLLM ``/tokenize`` (``{"model", "prompt"}`` -> ``count``), TGI
        ``/tokenize`` (``{"inputs"}``), llama.cpp's ``/tokenize`` (``{"content"}``),
        llama-cpp-python's ``/extras/tokenize`` (``{"input"}``); if none answers,
        ``len(text) / 4`` rounded up. The first method that works is remembered.
        """
        methods: tuple[TokenizeMethod, ...] = (
            (self.tokenize_method,) if self.tokenize_method
            else ("vllm", "tgi", "llama_cpp", "llama_cpp_python", "estimate"))
        for method in methods:
            try:
                count = await self._count(method, text)
            except BackendStatusError as exc:
                if self.tokenize_method is not None or exc.status_code not in (400, 404, 405,
                                                                               422, 501):
                    raise
                continue
            if count is None:
                continue
            if self.tokenize_method is None:
                logger.debug("%s counts tokens with %s", self.url, method)
            self.tokenize_method = method
            return count
        raise AssertionError("unreachable: the estimate always answers")  # pragma: no cover

    async def _count(self, method: TokenizeMethod, text: str) -> int | None:
        if method == "estimate":
            return -(-len(text) // 4)
        if method == "vllm":
            answer = await self._conn.request_json(
                "POST", "/tokenize", {"model": await self._model(), "prompt": text})
            # Only vLLM answers with "count"; llama.cpp answers this body with {"tokens": []}.
            count = answer.get("count") if isinstance(answer, dict) else None
            return count if isinstance(count, int) else None
        if method == "tgi":
            answer = await self._conn.request_json("POST", "/tokenize", {"inputs": text})
            return len(answer) if isinstance(answer, list) else None
        if method == "llama_cpp":
            answer = await self._conn.request_json("POST", "/tokenize",
                                                   {"content": text, "add_special": True})
            tokens = answer.get("tokens") if isinstance(answer, dict) else None
            return len(tokens) if isinstance(tokens, list) else None
        answer = await self._conn.request_json("POST", "/extras/tokenize", {"input": text})
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        return len(tokens) if isinstance(tokens, list) else None

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None) -> str | None:
        """Always ``None``: completions servers do not expose their templates, so the prompt is
        rendered client-side."""
        return None
