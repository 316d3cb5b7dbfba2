"""What every HTTP backend shares: one
:class:`~specthink.backends._connection.ServerConnection` built from the same options, the
life of a stream (opened with retries, closed on leaving the block), the routing key, the
cached ``/info``, ``repr`` and ``aclose``.

A protocol module supplies the request (:meth:`HTTPBackend._stream_request`), how a fresh
response body is opened (:meth:`HTTPBackend._opened`: :class:`SSEBackend` reads server-sent
events and checks the first one) and the decoder of its tokens (:meth:`HTTPBackend._tokens`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Generic, Literal, Protocol, TypedDict, TypeVar, Unpack

import httpx

from specthink import _constants
from specthink.backends._connection import ResponseBody, ServerConnection
from specthink.backends._retry import RetryPolicy
from specthink.backends._sse import ServerSentEvent, SSEStream, opening_sse
from specthink.backends.base import OnAttempt, SamplingParams, ServerInfo, StreamToken
from specthink.errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    ConfigError,
    StreamDroppedError,
    redact_url,
)

__all__ = [
    "DEFAULT_ROUTING_HEADERS",
    "HTTPBackend",
    "HTTPOptions",
    "SSEBackend",
    "TokenStream",
    "event_json",
    "malformed_event",
    "no_finish_reason",
    "routing_header_value",
    "sampling_fields",
    "validate_headers",
    "validate_routing_headers",
]

DEFAULT_ROUTING_HEADERS: tuple[str, ...] = ("X-Session-ID",)
"""Read by ``vllm-router --policy consistent_hash``; ``smg --sticky-sessions`` reads the ones
named by ``--routing-key-headers``."""

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP field name (RFC 9110 ``token``)."""


MAX_PLAIN_ROUTING_KEY = 128
"""Longest routing key sent as it is; longer ones are sent hashed."""
_PLAIN_ROUTING_KEY = re.compile(r"[A-Za-z0-9._~:@+=/-]+")
"""Characters every HTTP stack and router passes through unchanged (no space, no ``%``)."""
HASHED_ROUTING_KEY_PREFIX = "sha256-"


def routing_header_value(routing_key: str) -> str:
    """The header value that carries ``routing_key``: the key itself when it is short and
    plain (letters, digits, ``._~:@+=/-``, at most :data:`MAX_PLAIN_ROUTING_KEY`), else
    ``sha256-`` and the first 32 hex digits of its UTF-8 SHA-256.

    A function of the key alone, so every request of a conversation (and every serve replica)
    sends the same value and a router's stickiness holds. Hashing instead of refusing: a
    caller's ``user`` or ``X-Session-ID`` may be any string (non-ASCII, which httpx cannot put
    in a header; line breaks, which would inject headers; 100 KB, which routers refuse), and
    the router only needs equal keys to stay equal. A plain key that itself starts with the
    prefix is hashed too, so no key can pose as another's hash.
    """
    if (len(routing_key) <= MAX_PLAIN_ROUTING_KEY and _PLAIN_ROUTING_KEY.fullmatch(routing_key)
            and not routing_key.startswith(HASHED_ROUTING_KEY_PREFIX)):
        return routing_key
    digest = hashlib.sha256(routing_key.encode("utf-8", "surrogatepass")).hexdigest()
    return HASHED_ROUTING_KEY_PREFIX + digest[:32]


def validate_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Extra headers sent with every request: valid names, single-line string values."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ConfigError(f"headers must be a mapping of header names to values, got "
                          f"{headers!r}")
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise ConfigError(f"headers: {name!r} is not a valid HTTP header name")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise ConfigError(f"headers: the value of {name} must be a single-line string")
    return dict(headers)


def validate_routing_headers(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple of valid HTTP header names; anything else is a ``ConfigError``."""
    if isinstance(names, str | bytes) or not isinstance(names, Sequence):
        raise ConfigError(f"routing_headers must be a sequence of header names, such as "
                          f"('X-Session-ID',), got {names!r}")
    for name in names:
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise ConfigError(f"routing_headers: {name!r} is not a valid HTTP header name")
    return tuple(names)


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


class _TokenReader(Protocol):
    url: str
    tokens_received: int


ItemT = TypeVar("ItemT")
ItemT_contra = TypeVar("ItemT_contra", contravariant=True)


class TokenDecoder(Protocol[ItemT_contra]):
    def __call__(self, item: ItemT_contra, /, *, url: str,
                 tokens_received: int) -> StreamToken | None:
        """The token an item of the stream carries (``None``: it carries none)."""
        ...


class TokenStream(Generic[ItemT]):
    """The tokens of an open stream whose last token carries the finish reason: each item
    (an event, a line of JSON) read by ``next_item`` is decoded by ``decode``; whatever follows
    the finish is drained so the connection can be reused, and an end before it is a
    ``StreamDroppedError``. It keeps ``stream.tokens_received`` up to date.

    This runs for every token: one await of ``next_item`` and one plain call of ``decode``.
    """

    __slots__ = ("_decode", "_finished", "_next_item", "_stream")

    def __init__(self, stream: _TokenReader, next_item: Callable[[], Awaitable[ItemT | None]],
                 decode: TokenDecoder[ItemT]) -> None:
        self._stream = stream
        self._next_item = next_item
        self._decode = decode
        self._finished = False

    def __aiter__(self) -> TokenStream[ItemT]:
        return self

    async def __anext__(self) -> StreamToken:
        stream = self._stream
        while True:
            item = await self._next_item()
            if item is None:
                if self._finished:
                    raise StopAsyncIteration
                raise no_finish_reason(stream.url, stream.tokens_received)
            if self._finished:
                continue  # drain to the end so the connection can be reused
            token = self._decode(item, url=stream.url, tokens_received=stream.tokens_received)
            if token is None:
                continue
            stream.tokens_received += 1
            if token.finish_reason is not None:
                self._finished = True
            return token


class HTTPOptions(TypedDict, total=False):
    """The keyword options every HTTP backend takes (``BackendOptions`` says what each means).

    Defaults: ``api_key`` ``$SPECTHINK_API_KEY``; ``connect_timeout``, ``read_timeout``,
    ``max_retries``, ``retry_backoff``, ``retry_max_backoff`` and ``retry_deadline`` from
    ``specthink._constants``; ``routing_headers`` :data:`DEFAULT_ROUTING_HEADERS`;
    ``transport`` ``"lean"``; no ``client``, ``timeout`` or extra ``headers``.
    """

    api_key: str | None
    client: httpx.AsyncClient | None
    timeout: httpx.Timeout | float | None
    connect_timeout: float
    read_timeout: float | None
    max_retries: int
    retry_backoff: float
    retry_max_backoff: float
    retry_deadline: float | None
    routing_headers: Sequence[str]
    headers: Mapping[str, str] | None
    transport: Literal["lean", "httpx"]


_OPTION_NAMES = HTTPOptions.__optional_keys__


class _Reader(Protocol):
    async def aclose(self) -> None: ...


ReaderT = TypeVar("ReaderT", bound=_Reader)


class HTTPBackend(ABC, Generic[ReaderT]):
    """A server spoken to over HTTP, with the :class:`HTTPOptions`; ``ReaderT`` frames an open
    response body (server-sent events, lines of JSON, ...)."""

    health_paths: ClassVar[tuple[str, ...]]
    """What :meth:`health` asks, in order: the first path the server has (a 404 passes on to
    the next) tells whether it is up."""

    def __init__(self, url: str, **options: Unpack[HTTPOptions]) -> None:
        for name in options:
            if name not in _OPTION_NAMES:  # as Python's own signature check would say
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument "
                                f"{name!r}")
        self.routing_headers = validate_routing_headers(
            options.get("routing_headers", DEFAULT_ROUTING_HEADERS))
        """Headers that carry a call's routing key, so a router keeps the call on one replica."""
        headers = validate_headers(options.get("headers"))
        retry_backoff = options.get("retry_backoff", _constants.RETRY_INITIAL_BACKOFF)
        retry = RetryPolicy(
            max_retries=options.get("max_retries", _constants.DEFAULT_MAX_RETRIES),
            initial_backoff=retry_backoff,
            max_backoff=max(options.get("retry_max_backoff", _constants.RETRY_MAX_BACKOFF),
                            retry_backoff),
            deadline=options.get("retry_deadline", _constants.RETRY_DEADLINE))
        self._conn = ServerConnection(
            url, api_key=options.get("api_key"), client=options.get("client"),
            timeout=options.get("timeout"),
            connect_timeout=options.get("connect_timeout", _constants.DEFAULT_CONNECT_TIMEOUT),
            read_timeout=options.get("read_timeout", _constants.DEFAULT_READ_TIMEOUT),
            headers=headers, transport=options.get("transport", "lean"), retry=retry)
        self.url = self._conn.url
        self._info: ServerInfo | None = None
        self._info_fetches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                                      asyncio.Task[ServerInfo]]
        self._info_fetches = weakref.WeakKeyDictionary()

    @property
    def timeout(self) -> httpx.Timeout:
        """Connect and read (between two bytes) limits; never a total one."""
        return self._conn.timeout

    def __repr__(self) -> str:
        key = ", api_key=***" if self._conn.has_api_key else ""
        return (f"{type(self).__name__}({redact_url(self.url)!r}{self._repr_details()}"
                f"{key})")

    def _repr_details(self) -> str:
        """What ``repr`` shows between the URL and the API key."""
        return ""

    def observe_auxiliary_attempts(self, observer: OnAttempt | None) -> None:
        """Report to ``observer``, as each goes out, the attempt number (retries included) of
        every request this backend sends besides its generation streams: ``/info``,
        ``/v1/models``, ``/props``, tokenizers, chat-template endpoints, health. ``None``
        stops it. The engine feeds its ``on_request`` so (``serve``'s ``/metrics``)."""
        self._conn.on_auxiliary_attempt = observer

    def routing(self, routing_key: str | None) -> dict[str, str] | None:
        """The headers that carry ``routing_key`` (``None``: no headers), its value made safe
        for a header by :func:`routing_header_value`."""
        if routing_key is None:
            return None
        if not isinstance(routing_key, str) or not routing_key:
            raise ConfigError(f"routing_key must be a non-empty string, got {routing_key!r}")
        return dict.fromkeys(self.routing_headers, routing_header_value(routing_key))

    @asynccontextmanager
    async def stream(self, prompt: str, *, max_new_tokens: int, sampling: SamplingParams,
                     on_attempt: OnAttempt | None = None, routing_key: str | None = None,
                     ) -> AsyncIterator[AsyncIterator[StreamToken]]:
        """Stream the continuation of ``prompt``; leaving the block closes the connection, which
        makes the server cancel the generation. ``routing_key`` is sent in each of
        :attr:`routing_headers` on every attempt."""
        headers = self.routing(routing_key)
        path, body = await self._stream_request(prompt, max_new_tokens, sampling)
        try:
            stream = await self._conn.open_stream(path, body, opened=self._opened,
                                                  on_attempt=on_attempt, headers=headers)
        except BackendConnectionError:
            # The server may be coming back after a restart, perhaps with other limits.
            self._info = None
            raise
        try:
            yield self._tokens(stream, sampling)
        finally:
            await stream.aclose()

    @abstractmethod
    async def _stream_request(self, prompt: str, max_new_tokens: int,
                              sampling: SamplingParams) -> tuple[str, dict[str, Any]]:
        """The path and JSON body of a streamed generation request."""

    @abstractmethod
    async def _opened(self, body: ResponseBody) -> ReaderT:
        """The reader of a fresh response body, once its beginning is known not to be an error
        (raise, e.g. ``InStreamError``, for one: the attempt may then be retried)."""

    @abstractmethod
    def _tokens(self, stream: ReaderT, sampling: SamplingParams) -> AsyncIterator[StreamToken]:
        """The tokens of an open stream (asked with ``sampling``)."""

    async def info(self, *, refresh: bool = False) -> ServerInfo:
        """What the server says about itself, fetched once and cached; ``refresh`` fetches it
        again. Concurrent callers share one request; a refused connection forgets it."""
        if self._info is not None and not refresh:
            return self._info
        loop = asyncio.get_running_loop()
        fetch = self._info_fetches.get(loop)
        if fetch is None:
            fetch = self._info_fetches[loop] = loop.create_task(self._cache_info())
            fetch.add_done_callback(self._info_fetched)
        # Shielded: one caller cancelled does not cancel the request the others wait for.
        return await asyncio.shield(fetch)

    async def _cache_info(self) -> ServerInfo:
        info = await self._fetch_info()
        self._info = info
        return info

    def _info_fetched(self, task: asyncio.Task[ServerInfo]) -> None:
        loop = task.get_loop()
        if self._info_fetches.get(loop) is task:
            del self._info_fetches[loop]
        if not task.cancelled():
            task.exception()  # every waiter may have been cancelled: retrieved, not logged

    async def health(self) -> bool:
        """True when the first of :attr:`health_paths` the server has answers ``GET`` with 200;
        False when it is down, unreachable or answers another error."""
        for path in self.health_paths:
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

    @abstractmethod
    async def _fetch_info(self) -> ServerInfo:
        """Ask the server (one request, retried on transient failures)."""

    async def aclose(self) -> None:
        """Close the HTTP clients this backend opened (never a client you passed in)."""
        await self._conn.aclose()


class SSEBackend(HTTPBackend[SSEStream]):
    """A protocol whose streams are server-sent events (TGI, OpenAI-compatible servers)."""

    async def _opened(self, body: ResponseBody) -> SSEStream:
        return await opening_sse(self._check_first)(body)

    @abstractmethod
    def _check_first(self, event: ServerSentEvent) -> None:
        """Raise (e.g. ``InStreamError``) when the first event of a stream is an error."""
