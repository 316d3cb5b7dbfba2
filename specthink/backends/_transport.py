"""A lean HTTP/1.1 transport for the httpx clients specthink opens itself.

Why by hand rather than httpx's own transport (httpcore): on the benchmark machine httpcore's
connection pool, anyio's cancel scopes and h11's event objects cost about 2.6 ms of client CPU
per streamed request and a few microseconds per event (``specthink bench``, client hot spots),
and the engine opens a request at every handoff. This transport speaks only what specthink
needs: one request at a time per connection, a body known in full, and responses sized by
``Content-Length``, chunked, or ended by the server closing. httpx still builds the request,
holds the response and names the errors, so the rest of the library sees no difference.

Clients a caller passes in, and servers reached through a proxy from the environment, keep
httpx's own transport (see ``ServerConnection``).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import httpx

from specthink import _constants

__all__ = ["ChunkedDecoder", "LeanResponseStream", "LeanTransport"]

MAX_HEAD_BYTES = 64 * 1024
"""Longest status line and headers accepted (asyncio's stream limit; h11 allows 16 KiB)."""

READ_SIZE = 64 * 1024

_Origin = tuple[str, str, int]


class ChunkedDecoder:
    """``Transfer-Encoding: chunked`` bytes in, payload out; ``done`` after the last chunk and
    its trailers. Pure, so it is tested without sockets."""

    __slots__ = ("_buffer", "_remaining", "_state", "done")

    def __init__(self) -> None:
        self._buffer = b""
        self._remaining = 0
        self._state = "size"  # size -> data -> crlf -> size ... -> trailers -> done
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The payload bytes ``data`` completes (possibly empty)."""
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        position = 0
        while not self.done:
            state = self._state
            if state == "data":
                take = buffer[position:position + self._remaining]
                if not take:
                    break
                out.append(take)
                position += len(take)
                self._remaining -= len(take)
                if self._remaining:
                    break
                self._state = "crlf"
                continue
            end = buffer.find(b"\r\n", position)
            if end < 0:
                if len(buffer) - position > MAX_HEAD_BYTES:
                    raise httpx.RemoteProtocolError("chunk size line or trailer too long")
                break
            line = buffer[position:end]
            position = end + 2
            if state == "size":
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise httpx.RemoteProtocolError(
                        f"malformed chunk size {line[:40]!r}") from None
                if size < 0:
                    raise httpx.RemoteProtocolError(f"malformed chunk size {line[:40]!r}")
                if size == 0:
                    self._state = "trailers"
                else:
                    self._state, self._remaining = "data", size
            elif state == "crlf":
                if line:
                    raise httpx.RemoteProtocolError("chunk data longer than its size")
                self._state = "size"
            elif not line:  # trailers end with a blank line
                self.done = True
        self._buffer = buffer[position:]
        return b"".join(out)


class _Connection:
    __slots__ = ("idle_since", "origin", "reader", "reused", "writer")

    def __init__(self, origin: _Origin, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.reused = False

    def usable(self, now: float, expiry: float) -> bool:
        # A server that closed an idle connection has fed EOF by now (the loop reads it), so a
        # request is not written into a closing socket.
        return (not self.writer.transport.is_closing() and not self.reader.at_eof()
                and now - self.idle_since < expiry)

    def close(self) -> None:
        # Closing mid-response is how the server learns to cancel the generation.
        self.writer.close()


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams with a keep-alive pool per origin (see the module doc).

    Connections belong to the event loop that opened them, as the clients do.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None,
                 keepalive_expiry: float = _constants.KEEPALIVE_EXPIRY,
                 max_idle_per_origin: int = 512) -> None:
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._max_idle = max_idle_per_origin
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport has been closed")
        url = request.url
        origin: _Origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https"
                                                                else 80))
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        head = _request_head(request, await request.aread())
        while True:
            connection = self._checkout(origin) or await self._connect(
                origin, timeouts.get("connect"), request)
            try:
                return await self._exchange(connection, request, head, timeouts)
            except _StaleConnection:
                # The server closed a kept-alive connection as we wrote to it, before it read
                # anything: the request never reached it, so a fresh connection may carry it.
                connection.close()

    def _checkout(self, origin: _Origin) -> _Connection | None:
        pool = self._idle.get(origin)
        now = time.monotonic()
        while pool:
            connection = pool.pop()
            if connection.usable(now, self._keepalive_expiry):
                connection.reused = True
                return connection
            connection.close()
        return None

    def _checkin(self, connection: _Connection) -> None:
        pool = self._idle.setdefault(connection.origin, [])
        if self._closed or len(pool) >= self._max_idle:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        pool.append(connection)

    async def _connect(self, origin: _Origin, connect_seconds: float | None,
                       request: httpx.Request) -> _Connection:
        scheme, host, port = origin
        tls = None
        if scheme == "https":
            if self._ssl_context is None:
                # Loading the CA bundle takes 100-300 ms: once per transport.
                self._ssl_context = ssl.create_default_context()
            tls = self._ssl_context
        try:
            async with asyncio.timeout(connect_seconds):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None,
                    limit=MAX_HEAD_BYTES)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out",
                                       request=request) from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Events are small and latency-bound: never wait to coalesce them.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(origin, reader, writer)

    async def _exchange(self, connection: _Connection, request: httpx.Request, head: bytes,
                        timeouts: dict[str, float | None]) -> httpx.Response:
        reader, writer = connection.reader, connection.writer
        try:
            writer.write(head)
            if writer.transport.get_write_buffer_size():
                async with asyncio.timeout(timeouts.get("write")):
                    await writer.drain()
            async with asyncio.timeout(timeouts.get("read")):
                while True:
                    raw = await reader.readuntil(b"\r\n\r\n")
                    status, reason, headers, keep_alive = _parse_head(raw)
                    if status >= 200:
                        break
                    if status == 101:
                        raise httpx.RemoteProtocolError("unexpected 101 Switching Protocols")
                    # 100 Continue and other informational answers precede the real one.
            framing = _framing(request.method, status, headers)
        except TimeoutError:
            connection.close()
            raise httpx.ReadTimeout("timed out waiting for the response", request=request) \
                from None
        except asyncio.IncompleteReadError as exc:
            connection.close()
            if connection.reused and not exc.partial:
                raise _StaleConnection from None
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.",
                                            request=request) from None
        except asyncio.LimitOverrunError:
            connection.close()
            raise httpx.RemoteProtocolError("response headers too long", request=request) \
                from None
        except httpx.RemoteProtocolError as exc:
            connection.close()
            exc.request = request
            raise
        except (ConnectionError, OSError) as exc:
            connection.close()
            if connection.reused and isinstance(exc, ConnectionResetError | BrokenPipeError):
                raise _StaleConnection from None
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        except BaseException:
            connection.close()
            raise
        keep_alive = keep_alive and framing != "close"
        stream = LeanResponseStream(self, connection, request, framing, keep_alive,
                                    timeouts.get("read"))
        return httpx.Response(status, headers=headers, stream=stream,
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason})

    async def aclose(self) -> None:
        self._closed = True
        pools, self._idle = self._idle, {}
        for pool in pools.values():
            for connection in pool:
                connection.close()


class _StaleConnection(Exception):
    """A reused connection turned out to be closed before the server read the request."""


def _request_head(request: httpx.Request, body: bytes) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    for name, value in request.headers.raw:
        if name.lower() == b"transfer-encoding":
            continue  # the body is sent whole, with its length
        lines.append(name + b": " + value)
    if body and b"content-length" not in (name.lower() for name, _ in request.headers.raw):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _parse_head(raw: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bool]:
    """Status, reason, headers and whether the connection may be kept (from a head block)."""
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"malformed status line {lines[0][:80]!r}")
    keep_alive = parts[0] == b"HTTP/1.1"
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        value = value.strip()
        if name.lower() == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            keep_alive = (b"keep-alive" in tokens if not keep_alive
                          else b"close" not in tokens)
        headers.append((name, value))
    return int(parts[1]), parts[2] if len(parts) > 2 else b"", headers, keep_alive


def _framing(method: str, status: int, headers: list[tuple[bytes, bytes]]) -> str | int:
    """``"none"``, ``"chunked"``, ``"close"`` (read until the server closes) or a length."""
    if method == "HEAD" or status in (204, 304):  # informational answers never get here
        return "none"
    length: int | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            if value.lower().rsplit(b",", 1)[-1].strip() == b"chunked":
                return "chunked"
            return "close"
        if lower == b"content-length":
            if not value.isdigit() or (length is not None and length != int(value)):
                raise httpx.RemoteProtocolError(f"bad Content-Length {value[:40]!r}")
            length = int(value)
    if length is None:
        return "close"
    return length if length else "none"


class LeanResponseStream(httpx.AsyncByteStream):
    """The body of one response; a fully read body gives its connection back to the pool,
    anything else closes it.

    Its own async iterator rather than an async generator: a generator left unfinished (a
    stream closed at a handoff) is closed later by a task the event loop schedules for it.
    """

    def __init__(self, transport: LeanTransport, connection: _Connection,
                 request: httpx.Request, framing: str | int, keep_alive: bool,
                 read_timeout: float | None) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._request = request
        self._keep_alive = keep_alive
        self._read_timeout = read_timeout
        self._until_close = framing == "close"
        self._decoder = ChunkedDecoder() if framing == "chunked" else None
        self._left = framing if isinstance(framing, int) else -1
        if framing == "none":
            self._finish()

    def _finish(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._keep_alive:
            self._transport._checkin(connection)
        else:
            connection.close()

    def _abandon(self) -> None:
        self._keep_alive = False
        self._finish()

    def __aiter__(self) -> LeanResponseStream:
        return self

    async def __anext__(self) -> bytes:
        while self._connection is not None:
            payload = await self._read()
            if payload:
                return payload
        raise StopAsyncIteration

    async def _read(self) -> bytes:
        """The next piece of the body (possibly empty); finishes the response at its end."""
        connection = self._connection
        assert connection is not None
        left = self._left
        try:
            async with asyncio.timeout(self._read_timeout):
                data = await connection.reader.read(READ_SIZE if left < 0
                                                    else min(left, READ_SIZE))
            if not data:
                if not self._until_close:
                    raise httpx.RemoteProtocolError(
                        "peer closed connection without sending complete message body")
                self._finish()
                return b""
            decoder = self._decoder
            if decoder is not None:
                data = decoder.feed(data)
                if decoder.done:
                    self._finish()
            elif left > 0:
                self._left = left = left - len(data)
                if not left:
                    self._finish()
            return data
        except TimeoutError:
            self._abandon()
            raise httpx.ReadTimeout("timed out waiting for data", request=self._request) \
                from None
        except httpx.RemoteProtocolError as exc:
            self._abandon()
            exc.request = self._request
            raise
        except (ConnectionError, OSError) as exc:
            self._abandon()
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=self._request) \
                from exc
        except BaseException:
            self._abandon()
            raise

    async def aclose(self) -> None:
        # Leaving a response before its end: only closing tells the server to stop.
        self._abandon()
