"""The library's single sync edge: a private event loop on a daemon thread (public: the
adapters' sync methods run on it too).

Blocking APIs (``SpeculativeThinker.generate``/``stream``, the adapters' sync methods) run their
coroutines here. Unlike ``asyncio.run`` this works where the calling thread already runs a loop,
as in a notebook, and the HTTP connections opened by sync calls stay on one loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

from .backends.base import Backend

__all__ = ["close_on_sync_loop", "run_sync"]

T = TypeVar("T")

STREAM_BUFFER = 64
"""Items a sync stream may run ahead of its consumer before the producer waits for it."""


def run_sync(awaitable: Awaitable[T]) -> T:
    """Run ``awaitable`` to completion from synchronous code, on the library's private loop.

    The single sync edge of specthink (adapters use it too); it works where the calling thread
    already runs an event loop, as in a notebook.
    """
    return _LoopThread.get().run(awaitable)


def close_on_sync_loop(*backends: Backend) -> None:
    """Close ``backends``' connections on the private loop, if it ever ran, without waiting
    (for finalizers: the sync methods' connections live on that loop)."""
    loop_thread = _LoopThread._instance
    if loop_thread is not None and loop_thread.loop.is_running():
        async def close_all() -> None:
            await asyncio.gather(*(backend.aclose() for backend in backends))

        asyncio.run_coroutine_threadsafe(close_all(), loop_thread.loop)


class _LoopThread:
    """A private event loop on a daemon thread: the single sync edge of the library.

    Running coroutines here (rather than with ``asyncio.run``) works even where the calling
    thread already runs a loop, as in a notebook.
    """

    _instance: _LoopThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="specthink-loop",
                                       daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coroutine: Awaitable[T]) -> T:
        async def wrapper() -> T:
            return await coroutine

        future = asyncio.run_coroutine_threadsafe(wrapper(), self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def iterate(self, stream: AsyncIterator[T], *, buffer: int = STREAM_BUFFER) -> Iterator[T]:
        """Iterate ``stream`` (run on the private loop) from the calling thread.

        At most ``buffer`` items wait for the consumer: then the producer awaits a free slot, so
        a slow reader slows the generation down instead of piling the answer up in memory (and
        the loop, shared by every sync call, never blocks).
        """
        items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        space = asyncio.Semaphore(buffer)  # bound to the private loop at its first wait
        loop = self.loop

        async def pump() -> None:
            try:
                async for item in stream:
                    await space.acquire()
                    items.put(("item", item))
            except BaseException as exc:  # handed to the consuming thread
                items.put(("error", exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                items.put(("done", None))
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()

        future = asyncio.run_coroutine_threadsafe(pump(), loop)
        try:
            while True:
                kind, value = items.get()
                if kind == "item":
                    loop.call_soon_threadsafe(space.release)
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            if not future.done():
                future.cancel()
