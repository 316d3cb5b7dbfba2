"""The Responses API's stored responses: a bounded in-memory map per worker process, with a
time to live, that ``previous_response_id`` and ``GET``/``DELETE /v1/responses/{id}`` read.

Each entry is kept serialised (orjson bytes), so what it costs is known exactly and a reader
gets its own copy. Entries go oldest first when the count or the byte budget is exceeded, and
are dropped when read after their TTL. A worker holds only what it answered: behind a load
balancer or with ``--workers`` above one, a ``previous_response_id`` may reach a worker that
never saw it (a 404); a shared store (Redis, a database) keyed by response id would remove
that, and is a later step (docs/serve.md).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["MAX_STORE_BYTES", "ResponseStore", "StoredResponse"]

MAX_STORE_BYTES = 256 * 1024 * 1024
"""Bytes of serialised entries one worker keeps at most, whatever the count allows."""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """One kept answer: the response object and the conversation items that preceded it."""

    response: dict[str, Any]
    input_items: list[dict[str, Any]]

    def conversation(self) -> list[dict[str, Any]]:
        """What a response continuing this one starts from: its input, then its output."""
        return [*self.input_items, *self.response.get("output", [])]


class ResponseStore:
    """At most ``capacity`` entries and ``max_bytes`` bytes, each readable for ``ttl`` seconds.
    ``capacity == 0``: nothing is kept."""

    def __init__(self, capacity: int, ttl: float, *, max_bytes: int = MAX_STORE_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        data = orjson.dumps({"response": response, "input": input_items})
        if len(data) > self.max_bytes:
            return
        key = str(response["id"])
        self._drop(key)
        self._entries[key] = (self._clock() + self.ttl, data)
        self._bytes += len(data)
        while len(self._entries) > self.capacity or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        expires, data = entry
        if self._clock() >= expires:
            self._drop(response_id)
            return None
        stored = orjson.loads(data)
        return StoredResponse(stored["response"], stored["input"])

    def delete(self, response_id: str) -> bool:
        """Forget a response; ``False`` when it was not (or no longer) held."""
        found = self.get(response_id) is not None
        self._drop(response_id)
        return found

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])
