"""Server-sent events: bytes in, events out (as httpx-sse's ``_decoders``), and the reader
that frames an open response body as events.

The decoders are pure (bytes or lines in, events out), so they are tested without sockets; the
reader knows nothing of HTTP either: it pulls chunks from a :class:`Body` (an open response,
see ``_connection``) and hands back events.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

__all__ = [
    "Body",
    "FirstEventCheck",
    "LineSplitter",
    "SSEDecoder",
    "SSEStream",
    "ServerSentEvent",
    "loads_json",
    "opening_sse",
]


def loads_json(text: str | bytes) -> Any:
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

    @property
    def rest(self) -> bytes:
        """Bytes after the last line break (a last line the stream did not end)."""
        return self._buffer


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


class Body(Protocol):
    """An open response body, read chunk by chunk (``_connection.ResponseBody``)."""

    url: str

    async def next_chunk(self, tokens_received: int | None) -> bytes | None:
        """The next bytes, or ``None`` at the end. A broken connection raises a
        ``specthink.errors`` exception: ``tokens_received`` ``None`` while the stream is being
        opened, else how many tokens had arrived (a ``StreamDroppedError``)."""
        ...

    async def aclose(self) -> None: ...


class SSEStream:
    """An open ``text/event-stream`` body, read event by event.

    ``tokens_received`` is kept up to date by the protocol layer so that a broken connection
    reports how far it got.
    """

    def __init__(self, body: Body) -> None:
        self.body = body
        self.url = body.url
        self.tokens_received = 0
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
            chunk = await self.body.next_chunk(None if opening else self.tokens_received)
            if chunk is None:
                self._eof = True
                # An event without its closing blank line is discarded, as WHATWG says.
                continue
            self._lines, self._next_line = self._splitter.feed_bytes(chunk), 0

    async def aclose(self) -> None:
        await self.body.aclose()


FirstEventCheck = Callable[[ServerSentEvent], None]
"""Raises (e.g. ``InStreamError``) when the first event of a stream is an error."""


def opening_sse(check_first: FirstEventCheck) -> Callable[[Body], Awaitable[SSEStream]]:
    """What opens an event stream on a fresh body: read the first event, raise if it is an
    error (so that the attempt can be retried), and keep it for the reader."""
    async def opened(body: Body) -> SSEStream:
        stream = SSEStream(body)
        first = await stream.next_event(opening=True)
        if first is not None:
            check_first(first)
            stream.push_back(first)
        return stream

    return opened
