"""uvicorn's HTTP protocols with a request-head size limit (431) and a head-read timeout (408).

Why a protocol of our own: uvicorn has neither for httptools, the parser ``serve`` runs on.
httptools (llhttp) buffers header fields without any limit, and uvicorn arms no timer before
a request's head is complete (``timeout_keep_alive`` only runs between requests), so one
client could make a worker hold a 50 MB header, or hold a connection open forever by sending
one byte a minute. h11 has ``h11_max_incomplete_event_size``, but answers 400 and has no
timeout either. An ASGI middleware would come too late: the app only sees a request once its
whole head has been parsed. So the limits sit where the bytes arrive, in front of whichever
parser runs, as nginx's ``large_client_header_buffers`` and ``client_header_timeout`` do:

- A request head (request line and header fields, up to the blank line) is counted as its
  bytes arrive; past :attr:`HeaderLimits.max_bytes` the answer is ``431 Request Header Fields
  Too Large`` and the connection is closed, before the parser has seen more than one read's
  worth of it. At most that much is ever held per connection.
- A head must be complete within :attr:`HeaderLimits.timeout` seconds of the connection
  opening or of the previous request's body ending; else ``408 Request Timeout`` and close.

The answers are OpenAI error objects like every other error of ``serve``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HeaderLimits", "LimitedH11Protocol", "LimitedHttpToolsProtocol", "configure",
           "protocol_path"]

logger = logging.getLogger("specthink.serve")


@dataclass(frozen=True, slots=True)
class HeaderLimits:
    max_bytes: int = 64 * 1024
    """Largest request head (request line and headers); nginx allows 4 x 8 KiB, Node 16 KiB."""
    timeout: float = 20.0
    """Seconds a client may take to send a request head (nginx's ``client_header_timeout``
    is 60 s; a slow-header client holds a connection for this long at most)."""


_limits = HeaderLimits()


def configure(limits: HeaderLimits) -> None:
    """Set the limits of the connections accepted from now on (the process's serve settings:
    the CLI sets them, and each ``--workers`` process from its environment)."""
    global _limits
    _limits = limits


def limits() -> HeaderLimits:
    return _limits


def _answer(status: int, reason: str, message: str, code: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                   "param": None, "code": code}})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class _HeadLimiter:
    """Mixed in before a uvicorn protocol: watches the bytes of each request head."""

    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._head_limits = _limits
        self._head_bytes = 0
        self._head_tail = b""
        self._head_timer: asyncio.TimerHandle | None = None
        self._reading_head = False
        self._start_head()  # a fresh connection owes a request head

    def _start_head(self) -> None:
        self._reading_head = True
        self._head_bytes = 0
        self._head_tail = b""
        self._head_timer = asyncio.get_running_loop().call_later(
            self._head_limits.timeout, self._head_timed_out)

    def _end_head(self) -> None:
        self._reading_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if not self._reading_head and (self.cycle is None or not self.cycle.more_body):
            self._start_head()  # the previous request's body is in: the next head begins
        if self._reading_head:
            # Where the head ends in this read, if it does (the tail of the previous read
            # covers a blank line split between two reads).
            seen = self._head_tail + data
            ends = [i for i in (seen.find(b"\r\n\r\n"), seen.find(b"\n\n")) if i >= 0]
            if ends:
                head = self._head_bytes - len(self._head_tail) + min(ends)
            else:
                head = self._head_bytes + len(data)
            if head > self._head_limits.max_bytes:
                self._refuse(_answer(
                    431, "Request Header Fields Too Large",
                    f"The request line and headers are larger than "
                    f"{self._head_limits.max_bytes} bytes.", "request_header_too_large"))
                return
            if ends:
                self._end_head()
            else:
                self._head_bytes = head
                self._head_tail = seen[-3:]
        super().data_received(data)  # type: ignore[misc]

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._reading_head or self.transport.is_closing():
            return
        if not self._head_bytes:  # a connection that never sent a byte: closed unanswered
            self._refuse(b"")
            return
        self._refuse(_answer(408, "Request Timeout", f"The request head did not arrive within "
                             f"{self._head_limits.timeout:g} seconds.", "request_timeout"))

    def _refuse(self, answer: bytes) -> None:
        self._end_head()
        logger.debug("closing a connection: %s",
                     answer.split(b"\r\n", 1)[0].decode() or "no request head")
        if answer:
            self.transport.write(answer)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)  # type: ignore[misc]


class LimitedHttpToolsProtocol(_HeadLimiter, HttpToolsProtocol):
    """uvicorn's httptools protocol with the head limits (see the module)."""


class LimitedH11Protocol(_HeadLimiter, H11Protocol):
    """uvicorn's h11 protocol with the head limits (see the module)."""


def protocol_path(parser: str) -> str:
    """The ``http`` option uvicorn takes (an import path, so ``--workers`` processes import
    it) for ``"httptools"`` or ``"h11"``."""
    name = {"httptools": "LimitedHttpToolsProtocol", "h11": "LimitedH11Protocol"}[parser]
    return f"{__name__}:{name}"
