"""What every HTTP backend shares: httpx clients per event loop, auth, timeouts, the SSE decoder,
the retry policy around opening a stream, and the one place where httpx errors become
``specthink.errors``.

The decoders are pure (bytes or lines in, events out) so they are tested without sockets; the
I/O lives in :class:`ServerConnection`.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import os
import random
import re
import ssl
import time
import urllib.request
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
)
from tenacity.stop import stop_base

from specthink import _constants
from specthink.backends._transport import LeanResponseStream, LeanTransport
from specthink.errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    ConfigError,
    StreamDroppedError,
    StreamErrorEvent,
    error_from_response,
)

__all__ = [
    "API_KEY_ENV",
    "SHARD_SIZE",
    "LineSplitter",
    "OnAttempt",
    "RetryPolicy",
    "SSEDecoder",
    "SSEStream",
    "ServerConnection",
    "ServerSentEvent",
    "is_transient",
    "loads_json",
    "parse_retry_after",
    "resolve_timeout",
    "translate_errors",
    "translated",
    "uses_environment_proxy",
    "validate_url",
]

API_KEY_ENV = "SPECTHINK_API_KEY"

T = TypeVar("T")

logger = logging.getLogger("specthink.backends")

OnAttempt = Callable[[int], None]


@functools.cache
def _version() -> str:
    from specthink import __version__

    return __version__


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Loading the CA bundle costs 100-300 ms; every client (one per event loop) shares it.
    return ssl.create_default_context()


def uses_environment_proxy(url: str) -> bool:
    """Whether httpx would send requests to ``url`` through a proxy named in the environment
    (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, minus ``NO_PROXY``)."""
    proxies = urllib.request.getproxies_environment()
    parsed = httpx.URL(url)
    if not (proxies.get(parsed.scheme) or proxies.get("all")):
        return False
    # Documented in urllib's source, missing from typeshed.
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    return not bypass(parsed.host, proxies)


def validate_url(url: str) -> str:
    """The server URL without a trailing slash; anything but http(s) is a ``ConfigError``."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"server url must be a non-empty http(s) URL, got {url!r}")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"server url {url!r} is not a valid URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"server url must start with http:// or https:// and name a host, "
                          f"got {url!r}")
    return url.rstrip("/")


def resolve_timeout(timeout: httpx.Timeout | float | None, *, connect: float,
                    read: float | None) -> httpx.Timeout:
    """An ``httpx.Timeout`` with connect and read limits and never a total limit.

    ``timeout`` (a number or an ``httpx.Timeout``) overrides ``connect``/``read`` when given.
    """
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if timeout is not None:
        connect = read = float(timeout)
    for name, value in (("connect_timeout", connect), ("read_timeout", read)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be > 0 seconds, got {value}")
    return _constants.default_timeout(read=read, connect=connect)


# --------------------------------------------------------------------------- SSE decoding


def loads_json(text: str) -> Any:
    """``json.loads``, through orjson (every token's event is parsed: it is ~4x faster); what
    orjson refuses but the standard library reads (``NaN``, integers beyond 64 bits) still
    parses, and malformed JSON raises ``ValueError`` either way."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


class LineSplitter:
    """Bytes in, complete lines out, breaking at CR, LF and CRLF (and nowhere else).

    Splitting bytes rather than text means a chunk cut inside a UTF-8 character is harmless:
    CR and LF never occur inside a multi-byte sequence, and each line is decoded whole.
    ``str.splitlines`` would also break at U+2028 and friends, which SSE does not.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        return [line.decode("utf-8", errors="replace") for line in self.feed_bytes(chunk)]

    def feed_bytes(self, chunk: bytes) -> list[bytes]:
        """As :meth:`feed`, with the lines left undecoded (a reader may not need them all)."""
        if self._after_cr and chunk.startswith(b"\n"):
            # The CR of a CRLF ended the previous chunk: this LF is not another line break.
            chunk = chunk[1:]
        self._after_cr = False
        data = self._buffer + chunk if self._buffer else chunk
        if not data:
            return []
        parts = _LINE_BREAK.split(data) if b"\r" in data else data.split(b"\n")
        self._buffer = parts.pop()
        if not self._buffer and data.endswith(b"\r"):
            self._after_cr = True
        return parts


@dataclass(slots=True)
class ServerSentEvent:
    """One dispatched event. Not frozen: one is made per token, and a frozen dataclass's
    ``__init__`` costs about three times as much."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        return loads_json(self.data)


class SSEDecoder:
    """Lines in, events out, as the WHATWG rules say: ``field:value`` with one optional space
    after the colon (TGI sends none, OpenAI servers send one), ``:`` comments ignored, several
    ``data`` lines joined by newlines, and a blank line dispatching the event."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None

    @property
    def idle(self) -> bool:
        """No field of an undispatched event has been read."""
        return not self._data and not self._event and self._retry is None

    def single_data_event(self, value: str) -> ServerSentEvent:
        """What ``decode`` makes of ``data:<value>`` and a blank line, when :attr:`idle`."""
        return ServerSentEvent(value[1:] if value.startswith(" ") else value, "message",
                               self._id, None)

    def decode(self, line: str) -> ServerSentEvent | None:
        if line.startswith("data:"):  # nearly every line: keep it cheap
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
            return None
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent("\n".join(self._data), self._event or "message", self._id,
                                    self._retry)
            self._data = []
            self._event = ""
            self._retry = None
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None


# --------------------------------------------------------------------------- errors


def translated(exc: httpx.HTTPError, url: str, *,
               tokens_received: int | None = None) -> BackendError:
    """The ``specthink.errors`` exception for an httpx one (raise it ``from exc``).

    ``tokens_received`` is ``None`` while a stream is being opened and a count afterwards: a
    broken connection then is a ``StreamDroppedError`` the engine resumes from.
    """
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        phase = ("connecting" if isinstance(exc, httpx.ConnectTimeout)
                 else "waiting for a free connection" if isinstance(exc, httpx.PoolTimeout)
                 else "waiting for data")
        return BackendTimeoutError(f"timed out {phase} ({name})", url=url)
    if isinstance(exc, httpx.ConnectError):
        return BackendConnectionError(f"could not connect: {exc}", url=url)
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        if tokens_received is None:
            return BackendConnectionError(f"connection broke before the stream began: "
                                          f"{name}: {exc}", url=url)
        return StreamDroppedError(f"stream dropped after {tokens_received} tokens: {name}: {exc}",
                                  url=url, tokens_received=tokens_received)
    return BackendError(f"HTTP failure: {name}: {exc}", url=url)


@contextmanager
def translate_errors(url: str, *, tokens_received: int | None = None) -> Iterator[None]:
    """The one boundary where httpx exceptions become ``specthink.errors`` (chained)."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise translated(exc, url, tokens_received=tokens_received) from exc


def parse_retry_after(headers: httpx.Headers, *, now: float | None = None) -> float | None:
    """Seconds a server asks us to wait: ``retry-after-ms``, or ``Retry-After`` as seconds or an
    HTTP date. ``None`` when absent or unreadable."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def _payload(body: bytes) -> object:
    text = body.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def is_transient(exc: BaseException) -> bool:
    """Worth another attempt: 429/503 answers, a router's 502 (it could not reach the replica,
    so nothing was generated), a refused or reset connection, and an ``overloaded`` event
    before the first token. Never a timeout or a dropped stream."""
    if isinstance(exc, BackendStatusError):
        return exc.status_code in (429, 502, 503)
    if isinstance(exc, StreamErrorEvent):
        return exc.error_type == "overloaded" and exc.tokens_received == 0
    return isinstance(exc, BackendConnectionError) and not isinstance(exc, StreamDroppedError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries around the call that opens a stream: exponential backoff with jitter from
    ``initial_backoff`` up to ``max_backoff``; a server's ``Retry-After`` wins, up to
    ``retry_after_cap``."""

    max_retries: int = _constants.DEFAULT_MAX_RETRIES
    initial_backoff: float = _constants.RETRY_INITIAL_BACKOFF
    max_backoff: float = _constants.RETRY_MAX_BACKOFF
    retry_after_cap: float = _constants.RETRY_AFTER_CAP
    deadline: float | None = _constants.RETRY_DEADLINE
    """Seconds from the first attempt after which no retry starts (``None``: only
    ``max_retries`` bounds them)."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.deadline is not None and self.deadline < 0:
            raise ConfigError(f"deadline must be >= 0 seconds, got {self.deadline}")
        for name in ("initial_backoff", "max_backoff", "retry_after_cap"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")

    def wait_seconds(self, retry_number: int, exc: BaseException | None) -> float:
        """Seconds to wait before retry number ``retry_number`` (1, 2, ...)."""
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float):
            return min(float(retry_after), self.retry_after_cap)
        backoff = min(self.initial_backoff * 2.0 ** (retry_number - 1), self.max_backoff)
        # Jitter spreads the retries of many conversations hitting one overloaded server.
        return float(backoff * (1.0 - 0.25 * random.random()))

    def _log(self, describe: str, next_attempt: int, seconds: float,
             exc: BaseException | None) -> None:
        logger.warning("retrying %s in %.3f s (attempt %d of %d) after: %s", describe, seconds,
                       next_attempt, self.max_retries + 1, exc)

    def retrying(self, describe: str, *, done: int = 0,
                 time_left: float | None = None) -> AsyncRetrying:
        """Tenacity's loop for the attempts left after ``done`` failed ones, stopping before a
        wait that would end past ``time_left`` seconds."""
        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self.wait_seconds(state.attempt_number + done, exc)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            seconds = float(state.next_action.sleep) if state.next_action else 0.0
            self._log(describe, state.attempt_number + done + 1, seconds, exc)

        stop: stop_base = stop_after_attempt(self.max_retries + 1 - done)
        if time_left is not None:
            stop = stop | stop_before_delay(max(time_left, 0.0))
        return AsyncRetrying(stop=stop, wait=wait,
                             retry=retry_if_exception(is_transient), before_sleep=before_sleep,
                             reraise=True)

    async def call(self, describe: str, once: Callable[[], Awaitable[T]]) -> T:
        """``once()``, retried on transient failures.

        The first attempt runs outside tenacity: setting its loop up costs about 0.1 ms, a
        noticeable share of opening a stream, and most calls succeed the first time.
        """
        started = time.monotonic()
        try:
            return await once()
        except Exception as exc:
            if self.max_retries == 0 or not is_transient(exc):
                raise
            first = exc
        seconds = self.wait_seconds(1, first)
        if self.deadline is not None and time.monotonic() - started + seconds > self.deadline:
            raise first
        self._log(describe, 2, seconds, first)
        await asyncio.sleep(seconds)
        time_left = (None if self.deadline is None
                     else self.deadline - (time.monotonic() - started))
        async for attempt in self.retrying(describe, done=1, time_left=time_left):
            with attempt:
                return await once()
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover


# --------------------------------------------------------------------------- streams


class SSEStream:
    """An open ``text/event-stream`` response, read event by event.

    ``tokens_received`` is kept up to date by the protocol layer so that a broken connection
    reports how far it got.
    """

    def __init__(self, response: httpx.Response, url: str, shard: _Shard | None = None) -> None:
        self.response = response
        self.url = url
        self._shard = shard
        self.tokens_received = 0
        body = response.stream
        # Our transport's body is read directly: httpx's aiter_bytes is a chain of async
        # generators, and a stream left early leaves each to the garbage collector, which
        # schedules a task per generator to close it.
        self._chunks: AsyncIterator[bytes] = (
            body.__aiter__() if isinstance(body, LeanResponseStream) else response.aiter_bytes())
        self._splitter = LineSplitter()
        self._decoder = SSEDecoder()
        self._lines: list[bytes] = []
        self._next_line = 0
        self._pushed_back: ServerSentEvent | None = None
        self._eof = False

    def push_back(self, event: ServerSentEvent) -> None:
        self._pushed_back = event

    async def next_event(self, *, opening: bool = False) -> ServerSentEvent | None:
        """The next event, or ``None`` at the end of the stream."""
        if self._pushed_back is not None:
            pushed, self._pushed_back = self._pushed_back, None
            return pushed
        decoder = self._decoder
        while True:
            # Lines are decoded one event at a time: a stream left early (a handoff) does not
            # pay for the rest of what the server had already sent.
            lines, index = self._lines, self._next_line
            count = len(lines)
            while index < count:
                line = lines[index]
                if (line.startswith(b"data:") and index + 1 < count and not lines[index + 1]
                        and decoder.idle):
                    # The usual shape, one data line and a blank one: no decoder state to keep.
                    self._next_line = index + 2
                    return decoder.single_data_event(line[5:].decode("utf-8", errors="replace"))
                event = decoder.decode(line.decode("utf-8", errors="replace"))
                index += 1
                if event is not None:
                    self._next_line = index
                    return event
            self._next_line = index
            if self._eof:
                return None
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._eof = True
                # An event without its closing blank line is discarded, as WHATWG says.
                continue
            except httpx.HTTPError as exc:
                raise translated(exc, self.url, tokens_received=None if opening
                                 else self.tokens_received) from exc
            self._lines, self._next_line = self._splitter.feed_bytes(chunk), 0

    async def aclose(self) -> None:
        # Closing an unfinished HTTP/1.1 response closes its connection: that is how the server
        # learns to cancel the generation.
        shard, self._shard = self._shard, None
        if shard is not None:
            shard.active -= 1
        await self.response.aclose()


FirstEventCheck = Callable[[ServerSentEvent], None]
"""Raises (e.g. ``StreamErrorEvent``) when the first event of a stream is an error."""


class _Shard:
    __slots__ = ("active", "client", "transport")

    def __init__(self, client: httpx.AsyncClient, transport: LeanTransport | None = None) -> None:
        self.client = client
        self.transport = transport
        """Set when ``client`` runs over our own transport: requests then go to it directly."""
        self.active = 0


SHARD_SIZE = 16
"""Requests in flight per ``httpx.AsyncClient`` over httpx's own transport (a proxy from the
environment) before the next one is used. httpcore scans its whole pool on every request and
response; 256 concurrent streams through one client took about twice as long here as through 16
clients of 16."""


class ServerConnection:
    """One server: its URL, auth, timeouts, retry policy and its HTTP clients.

    Clients belong to one event loop (a sync edge runs its own loop thread), so each loop gets
    its own; within a loop, requests fill one client up to ``SHARD_SIZE`` requests in flight
    before the next is opened. A client the caller passed is used for everything, and left open.
    """

    def __init__(self, url: str, *, api_key: str | None = None,
                 client: httpx.AsyncClient | None = None,
                 timeout: httpx.Timeout | float | None = None,
                 connect_timeout: float = _constants.DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float | None = _constants.DEFAULT_READ_TIMEOUT,
                 retry: RetryPolicy | None = None) -> None:
        self.url = validate_url(url)
        self.timeout = resolve_timeout(timeout, connect=connect_timeout, read=read_timeout)
        self.retry = retry or RetryPolicy()
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        # Bodies are never compressed: SSE is read straight from the transport, undecoded.
        self._lean_headers = {**self._headers, "Accept": "*/*", "Accept-Encoding": "identity",
                              "Content-Type": "application/json",
                              "User-Agent": f"specthink/{_version()}"}
        self._timeouts = self.timeout.as_dict()
        self._urls: dict[str, httpx.URL] = {}
        self._given = None if client is None else _Shard(client)
        self._lean = client is None and not uses_environment_proxy(self.url)
        """Our own clients use :class:`LeanTransport`, unless a proxy from the environment
        applies (httpx's transport knows proxies; ours does not)."""
        self._shards: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Shard]]
        self._shards = weakref.WeakKeyDictionary()

    @property
    def has_api_key(self) -> bool:
        return bool(self._headers)

    def _new_shard(self) -> _Shard:
        # Plain-http servers never negotiate TLS (requests only go to self.url and redirects
        # are not followed), so they skip loading certificates altogether.
        tls = _tls_context() if self.url.startswith("https://") else None
        if self._lean:
            transport = LeanTransport(ssl_context=tls,
                                      keepalive_expiry=_constants.KEEPALIVE_EXPIRY)
            return _Shard(httpx.AsyncClient(transport=transport, timeout=self.timeout),
                          transport)
        return _Shard(httpx.AsyncClient(timeout=self.timeout, limits=_constants.POOL_LIMITS,
                                        verify=tls or False))

    def _shard(self) -> _Shard:
        if self._given is not None:
            return self._given
        loop = asyncio.get_running_loop()
        shards = self._shards.get(loop)
        if shards is None:
            shards = self._shards[loop] = []
        # One lean client serves any number of requests; httpcore's pool is sharded.
        limit = float("inf") if self._lean else SHARD_SIZE
        for shard in shards:
            if shard.active < limit and not shard.client.is_closed:
                return shard
        shards[:] = [shard for shard in shards if not shard.client.is_closed]
        shards.append(self._new_shard())
        return shards[-1]

    def client(self) -> httpx.AsyncClient:
        """The client the next request of the running event loop goes through."""
        return self._shard().client

    def clients(self) -> list[httpx.AsyncClient]:
        """The clients opened so far for the running event loop (for diagnostics)."""
        if self._given is not None:
            return [self._given.client]
        return [shard.client for shard in self._shards.get(asyncio.get_running_loop(), ())]

    async def aclose(self) -> None:
        """Close the clients this connection opened; a passed-in client stays open."""
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        owned = list(self._shards.items())
        self._shards.clear()
        for loop, shards in owned:
            for shard in shards:
                if loop is current:
                    await shard.client.aclose()
                elif loop.is_running() and not loop.is_closed():
                    # That loop's thread owns the sockets; let it close them.
                    asyncio.run_coroutine_threadsafe(shard.client.aclose(), loop)

    async def _send(self, method: str, path: str, body: Any, *,
                    stream: bool) -> tuple[httpx.Response, _Shard]:
        shard = self._shard()
        shard.active += 1
        try:
            with translate_errors(self.url):
                if shard.transport is not None:
                    return await self._send_lean(shard.transport, method, path, body,
                                                 stream=stream), shard
                request = shard.client.build_request(method, self.url + path, json=body,
                                                     headers=self._headers,
                                                     timeout=self.timeout)
                return await shard.client.send(request, stream=stream), shard
        except BaseException:
            shard.active -= 1
            raise

    async def _send_lean(self, transport: LeanTransport, method: str, path: str, body: Any,
                         *, stream: bool) -> httpx.Response:
        """Straight to our transport: a client of ours has no auth flow, hooks, cookies or
        redirects to apply, and ``AsyncClient.send`` costs about as much as the transport."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.url + path)
        content = None if body is None else orjson.dumps(body)
        request = httpx.Request(method, url, content=content, headers=self._lean_headers,
                                extensions={"timeout": self._timeouts})
        response = await transport.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def _raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        with translate_errors(self.url):
            body = await response.aread()
        raise error_from_response(response.status_code, _payload(body), url=self.url,
                                  retry_after=parse_retry_after(response.headers))

    async def request(self, method: str, path: str, body: Any = None, *,
                      retry: bool = True) -> httpx.Response:
        """A complete (non-streamed) request; error answers raise mapped exceptions."""
        async def once() -> httpx.Response:
            response, shard = await self._send(method, path, body, stream=False)
            shard.active -= 1
            await self._raise_for_status(response)
            return response

        if not retry:
            return await once()
        return await self.retry.call(f"{method} {self.url}{path}", once)

    async def request_json(self, method: str, path: str, body: Any = None, *,
                           retry: bool = True) -> Any:
        response = await self.request(method, path, body, retry=retry)
        try:
            return response.json()
        except ValueError as exc:
            raise BackendError(f"{method} {path} answered with invalid JSON", url=self.url) from exc

    async def open_stream(self, path: str, body: Any, *, on_attempt: OnAttempt | None,
                          check_first: FirstEventCheck) -> SSEStream:
        """POST ``body`` and return the stream once its first event has arrived.

        Everything up to that first event is retried on transient failures (tenacity); what
        happens later is the engine's business (it resumes from the accepted text).
        """
        attempts = 0

        async def once() -> SSEStream:
            nonlocal attempts
            attempts += 1
            if on_attempt is not None:
                on_attempt(attempts)
            response, shard = await self._send("POST", path, body, stream=True)
            stream = SSEStream(response, self.url, shard)
            try:
                await self._raise_for_status(response)
                first = await stream.next_event(opening=True)
                if first is not None:
                    check_first(first)
                    stream.push_back(first)
            except BaseException:
                await stream.aclose()
                raise
            return stream

        return await self.retry.call(f"POST {self.url}{path}", once)
