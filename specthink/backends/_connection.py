"""One server's connection: its URL, auth, headers and timeouts, the httpx clients (one set per
event loop), and the sending of requests, retried by the retry policy. What a response body
means (events, lines of JSON) is the caller's: :meth:`ServerConnection.open_stream` hands the
open :class:`ResponseBody` to the protocol's opener.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import urllib.request
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Literal, TypeVar

import httpx
import orjson

from specthink import _constants
from specthink.backends._errors import error_for_status, translate_errors, translated
from specthink.backends._retry import RetryPolicy
from specthink.backends._transport import LeanResponseStream, LeanTransport
from specthink.backends.base import OnAttempt
from specthink.errors import BackendError, ConfigError, redact_url

__all__ = [
    "SHARD_SIZE",
    "ResponseBody",
    "ServerConnection",
    "resolve_timeout",
    "uses_environment_proxy",
    "validate_url",
]

R = TypeVar("R")


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
        raise ConfigError("server url must be a non-empty http(s) URL, got "
                          f"{redact_url(url) if isinstance(url, str) else repr(url)}")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"server url {redact_url(url)!r} is not a valid URL") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"server url must start with http:// or https:// and name a host, "
                          f"got {redact_url(url)!r}")
    return url.rstrip("/")


def resolve_timeout(timeout: httpx.Timeout | float | None, *, connect: float,
                    read: float | None) -> httpx.Timeout:
    """An ``httpx.Timeout`` with connect and read limits and never a total limit.

    ``timeout``, when given, is the read timeout (seconds between two bytes), as everywhere in
    specthink; an ``httpx.Timeout`` is taken as it is.
    """
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if timeout is not None:
        read = float(timeout)
    for name, value in (("connect_timeout", connect), ("read_timeout", read)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be > 0 seconds, got {value}")
    return _constants.default_timeout(read=read, connect=connect)


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


class ResponseBody:
    """An open response, read chunk by chunk; closing it early closes its connection (which is
    how a server learns to cancel the generation)."""

    __slots__ = ("_chunks", "_shard", "response", "url")

    def __init__(self, response: httpx.Response, url: str, shard: _Shard | None = None) -> None:
        self.response = response
        self.url = url
        self._shard = shard
        body = response.stream
        # Our transport's body is read directly: httpx's aiter_bytes is a chain of async
        # generators, and a stream left early leaves each to the garbage collector, which
        # schedules a task per generator to close it.
        self._chunks: AsyncIterator[bytes] = (
            body.__aiter__() if isinstance(body, LeanResponseStream) else response.aiter_bytes())

    async def next_chunk(self, tokens_received: int | None) -> bytes | None:
        """The next bytes, or ``None`` at the end; httpx's errors become ``specthink.errors``
        (a ``StreamDroppedError`` once ``tokens_received`` is a count)."""
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None
        except httpx.HTTPError as exc:
            raise translated(exc, self.url, tokens_received=tokens_received) from exc

    async def aclose(self) -> None:
        # Closing an unfinished HTTP/1.1 response closes its connection.
        shard, self._shard = self._shard, None
        if shard is not None:
            shard.active -= 1
        await self.response.aclose()


class ServerConnection:
    """One server: its URL, auth, headers, timeouts, retry policy and its HTTP clients.

    Clients belong to one event loop (a sync edge runs its own loop thread), so each loop gets
    its own; within a loop, requests fill one client up to ``SHARD_SIZE`` requests in flight
    before the next is opened. A client the caller passed is used for everything, and left open.
    """

    def __init__(self, url: str, *, api_key: str | None = None,
                 client: httpx.AsyncClient | None = None,
                 timeout: httpx.Timeout | float | None = None,
                 connect_timeout: float = _constants.DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float | None = _constants.DEFAULT_READ_TIMEOUT,
                 retry: RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None,
                 transport: Literal["lean", "httpx"] = "lean") -> None:
        self.url = validate_url(url)
        self.shown_url = redact_url(self.url)
        """The URL for messages and logs (:func:`~specthink.errors.redact_url`)."""
        self.timeout = resolve_timeout(timeout, connect=connect_timeout, read=read_timeout)
        self.retry = retry or RetryPolicy()
        key = api_key if api_key is not None else os.environ.get(_constants.API_KEY_ENV)
        self._has_key = bool(key)
        self._headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
        # Bodies are never compressed: they are read straight from the transport, undecoded.
        self._lean_headers = {"Accept": "*/*", "User-Agent": f"specthink/{_constants.VERSION}",
                              **self._headers, "Accept-Encoding": "identity",
                              "Content-Type": "application/json"}
        self._timeouts = self.timeout.as_dict()
        self._urls: dict[str, httpx.URL] = {}
        self._given = None if client is None else _Shard(client)
        if transport not in ("lean", "httpx"):
            raise ConfigError(f"transport must be 'lean' or 'httpx', got {transport!r}")
        self._lean = (transport == "lean" and client is None
                      and not uses_environment_proxy(self.url))
        """Our own clients use :class:`LeanTransport`, unless ``transport="httpx"`` or a proxy
        from the environment applies (httpx's transport knows proxies; ours does not)."""
        self._shards: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Shard]]
        self._shards = weakref.WeakKeyDictionary()
        self.on_auxiliary_attempt: OnAttempt | None = None
        """Called with the attempt number of every request sent without an ``on_attempt`` of
        its own (what a backend asks besides its generation streams: ``/info``, tokenizers,
        templates, health), retries included, as each goes out."""

    @property
    def has_api_key(self) -> bool:
        return self._has_key

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

    async def _send(self, method: str, path: str, body: Any, *, stream: bool,
                    headers: Mapping[str, str] | None = None) -> tuple[httpx.Response, _Shard]:
        shard = self._shard()
        shard.active += 1
        try:
            with translate_errors(self.url):
                if shard.transport is not None:
                    return await self._send_lean(shard.transport, method, path, body,
                                                 stream=stream, headers=headers), shard
                request = shard.client.build_request(
                    method, self.url + path, json=body,
                    headers={**self._headers, **headers} if headers else self._headers,
                    timeout=self.timeout)
                return await shard.client.send(request, stream=stream), shard
        except BaseException:
            shard.active -= 1
            raise

    async def _send_lean(self, transport: LeanTransport, method: str, path: str, body: Any,
                         *, stream: bool,
                         headers: Mapping[str, str] | None = None) -> httpx.Response:
        """Straight to our transport: a client of ours has no auth flow, hooks, cookies or
        redirects to apply, and ``AsyncClient.send`` costs about as much as the transport."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.url + path)
        content = None if body is None else orjson.dumps(body)
        request = httpx.Request(method, url, content=content,
                                headers={**self._lean_headers, **headers} if headers
                                else self._lean_headers,
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
        raise error_for_status(response, body, self.url)

    async def request(self, method: str, path: str, body: Any = None, *, retry: bool = True,
                      on_attempt: OnAttempt | None = None,
                      headers: Mapping[str, str] | None = None) -> httpx.Response:
        """A complete (non-streamed) request; error answers raise mapped exceptions. Each
        attempt is reported to ``on_attempt``, else to :attr:`on_auxiliary_attempt`."""
        attempts = 0
        report = on_attempt or self.on_auxiliary_attempt

        async def once() -> httpx.Response:
            nonlocal attempts
            attempts += 1
            if report is not None:
                report(attempts)
            response, shard = await self._send(method, path, body, stream=False,
                                               headers=headers)
            shard.active -= 1
            await self._raise_for_status(response)
            return response

        if not retry:
            return await once()
        return await self.retry.call(f"{method} {self.shown_url}{path}", once)

    async def request_json(self, method: str, path: str, body: Any = None, *,
                           retry: bool = True, on_attempt: OnAttempt | None = None,
                           headers: Mapping[str, str] | None = None) -> Any:
        response = await self.request(method, path, body, retry=retry, on_attempt=on_attempt,
                                      headers=headers)
        try:
            return response.json()
        except ValueError as exc:
            raise BackendError(f"{method} {path} answered with invalid JSON", url=self.url) from exc

    async def open_stream(self, path: str, body: Any, *,
                          opened: Callable[[ResponseBody], Awaitable[R]],
                          on_attempt: OnAttempt | None = None,
                          headers: Mapping[str, str] | None = None) -> R:
        """POST ``body`` and return ``await opened(response_body)``: the protocol's reader,
        once it has checked the stream's beginning (its first event, say). ``headers`` are
        added to every attempt.

        Everything up to that point is retried on transient failures; what happens later is
        the engine's business (it resumes from the accepted text). Each attempt is reported to
        ``on_attempt`` (a generation stream's), else to :attr:`on_auxiliary_attempt` (a
        tokenizer's answer read as it streams, say).
        """
        attempts = 0
        report = on_attempt or self.on_auxiliary_attempt

        async def once() -> R:
            nonlocal attempts
            attempts += 1
            if report is not None:
                report(attempts)
            response, shard = await self._send("POST", path, body, stream=True, headers=headers)
            answer = ResponseBody(response, self.url, shard)
            try:
                await self._raise_for_status(response)
                return await opened(answer)
            except BaseException:
                await answer.aclose()
                raise

        return await self.retry.call(f"POST {self.shown_url}{path}", once)
