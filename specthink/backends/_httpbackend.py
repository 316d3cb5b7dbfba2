"""What :class:`~specthink.backends.tgi.TGIBackend` and
:class:`~specthink.backends.openai.OpenAICompletionsBackend` share: one
:class:`~specthink.backends._http.ServerConnection` built from the same options, the life of a
stream (opened with retries, closed on leaving the block), ``repr`` and ``aclose``.

A protocol module supplies the request (:meth:`HTTPBackend._stream_request`), the check of a
stream's first event and the decoder of its events.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from specthink import _constants
from specthink.backends._http import (
    OnAttempt,
    RetryPolicy,
    ServerConnection,
    ServerSentEvent,
    SSEStream,
)
from specthink.backends.base import SamplingParams, ServerInfo, StreamToken
from specthink.errors import BackendError, StreamDroppedError

__all__ = ["HTTPBackend", "event_json", "malformed_event", "no_finish_reason", "sampling_fields"]


def sampling_fields(sampling: SamplingParams) -> dict[str, Any]:
    """The sampling fields both protocols name alike: ``temperature``, ``top_p`` (below 1) and
    ``top_k`` unless greedy, then ``seed`` and ``repetition_penalty`` when set."""
    fields: dict[str, Any] = {}
    if not sampling.greedy:
        fields["temperature"] = sampling.temperature
        if sampling.top_p is not None and sampling.top_p < 1.0:
            fields["top_p"] = sampling.top_p
        if sampling.top_k:
            fields["top_k"] = sampling.top_k  # on /v1/completions: vLLM, SGLang, llama.cpp
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    if sampling.repetition_penalty is not None:
        fields["repetition_penalty"] = sampling.repetition_penalty
    return fields


def event_json(event: ServerSentEvent, url: str, tokens_received: int) -> Any:
    """The JSON data of a stream event; a malformed one is a ``BackendError``."""
    try:
        return event.json()
    except ValueError as exc:
        raise malformed_event(event, url, tokens_received) from exc


def malformed_event(event: ServerSentEvent, url: str, tokens_received: int) -> BackendError:
    """The error for an event whose data is not JSON (raise it ``from`` the parser's)."""
    return BackendError(f"malformed stream event after {tokens_received} tokens: "
                        f"{event.data[:200]!r}", url=url)


def no_finish_reason(url: str, tokens_received: int) -> StreamDroppedError:
    """The error for a stream that ended before a token carried a finish reason."""
    return StreamDroppedError(
        f"stream ended after {tokens_received} tokens without a finish reason",
        url=url, tokens_received=tokens_received)


class HTTPBackend(ABC):
    """A server spoken to over HTTP (see the subclasses for the options)."""

    def __init__(self, url: str, *, api_key: str | None = None,
                 client: httpx.AsyncClient | None = None,
                 timeout: httpx.Timeout | float | None = None,
                 connect_timeout: float = _constants.DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float | None = _constants.DEFAULT_READ_TIMEOUT,
                 max_retries: int = _constants.DEFAULT_MAX_RETRIES,
                 retry_backoff: float = _constants.RETRY_INITIAL_BACKOFF,
                 retry_max_backoff: float = _constants.RETRY_MAX_BACKOFF,
                 retry_deadline: float | None = _constants.RETRY_DEADLINE) -> None:
        self._conn = ServerConnection(
            url, api_key=api_key, client=client, timeout=timeout,
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            retry=RetryPolicy(max_retries=max_retries, initial_backoff=retry_backoff,
                              max_backoff=max(retry_max_backoff, retry_backoff),
                              deadline=retry_deadline))
        self.url = self._conn.url
        self._info: ServerInfo | None = None

    def __repr__(self) -> str:
        key = ", api_key=***" if self._conn.has_api_key else ""
        return f"{type(self).__name__}({self.url!r}{self._repr_details()}{key})"

    def _repr_details(self) -> str:
        """What ``repr`` shows between the URL and the API key."""
        return ""

    @asynccontextmanager
    async def stream(self, prompt: str, *, max_new_tokens: int, sampling: SamplingParams,
                     on_attempt: OnAttempt | None = None,
                     ) -> AsyncIterator[AsyncIterator[StreamToken]]:
        """Stream the continuation of ``prompt``; leaving the block closes the connection, which
        makes the server cancel the generation."""
        path, body = await self._stream_request(prompt, max_new_tokens, sampling)
        stream = await self._conn.open_stream(path, body, on_attempt=on_attempt,
                                              check_first=self._check_first)
        try:
            yield self._tokens(stream)
        finally:
            await stream.aclose()

    @abstractmethod
    async def _stream_request(self, prompt: str, max_new_tokens: int,
                              sampling: SamplingParams) -> tuple[str, dict[str, Any]]:
        """The path and JSON body of a streamed generation request."""

    @abstractmethod
    def _check_first(self, event: ServerSentEvent) -> None:
        """Raise (e.g. ``StreamErrorEvent``) when the first event of a stream is an error."""

    @abstractmethod
    def _tokens(self, stream: SSEStream) -> AsyncIterator[StreamToken]:
        """The tokens of an open stream."""

    async def aclose(self) -> None:
        """Close the HTTP clients this backend opened (never a client you passed in)."""
        await self._conn.aclose()
