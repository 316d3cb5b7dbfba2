"""The loopback server's ``text/event-stream`` responses: writing events, noticing a client that
hangs up, and dropping a connection on purpose."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from specthink.testing._accounting import RequestRecord

__all__ = ["EventStream", "Produce", "StreamControl", "Write"]

Write = Callable[[bytes], Awaitable[None]]
Produce = Callable[[Write, "StreamControl"], Awaitable[None]]
"""Writes a stream's events; the response ends when it returns."""


class EventStream(Response):
    """A ``text/event-stream`` response that notices a client hanging up at once (not only at
    the next write) and records it."""

    media_type = "text/event-stream"

    def __init__(self, produce: Produce, control: StreamControl) -> None:
        # No Response.__init__: it would render an empty body and send Content-Length: 0.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._produce = produce
        self._control = control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        control = self._control
        control.client = tuple(scope.get("client") or ())
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})

        async def write(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async with anyio.create_task_group() as group:
            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                control.gone.set()
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self._produce(write, control)
                if not control.dropped:
                    control.complete = True
                    # Recorded before the last bytes: a client that has read the end of the
                    # stream may look at the record at once.
                    control.on_close()
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                control.on_close()
                group.cancel_scope.cancel()


@dataclass(eq=False)
class StreamControl:
    record: RequestRecord
    lock: threading.Lock
    connections: Callable[[], Iterable[Any]]
    client: tuple[Any, ...] = ()
    gone: anyio.Event = field(default_factory=anyio.Event)
    release: Callable[[], None] | None = None
    """Gives the request's concurrency permit back when the stream ends."""
    complete: bool = False
    dropped: bool = False
    closed: bool = False

    def on_close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self.lock:
            self.record.finished = time.monotonic()
            if not self.complete and not self.dropped:
                self.record.disconnected = True
        if self.release is not None:
            self.release()

    async def drop_connection(self) -> None:
        """Close this request's TCP connection and wait until uvicorn has noticed."""
        self.dropped = True
        for protocol in self.connections():
            if getattr(protocol, "client", None) == self.client:
                protocol.transport.close()
                break
        else:  # pragma: no cover - uvicorn internals changed; let uvicorn close it instead
            raise RuntimeError("injected drop: connection not found")
        with anyio.move_on_after(5.0):
            await self.gone.wait()
