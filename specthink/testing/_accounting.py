"""What the loopback server charges and keeps: the latency model, the prefix cache, a record of
every generation request and a shorter one of every request of any kind."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from specthink.testing._faults import Fault

__all__ = ["CallRecord", "LatencyModel", "PrefixCache", "RequestRecord"]


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Seconds a request takes: ``per_request`` plus ``per_uncached_prompt_token`` for each
    prompt token not served from the prefix cache (prefill, before the first token), then
    ``per_token`` before each generated token.

    ``burst`` is how many tokens that are already due (no per-token latency, or a server that
    has fallen behind its schedule) go out in one write, as a real server does when it is
    ahead of its reader; 1 writes every token on its own, which tests of cancellation rely on.

    ``max_batch`` bounds what one replica gets through, as a GPU's batch does: up to that many
    generations in flight each run at the modelled speed; beyond it they share the replica
    (processor sharing), each prefill and token taking ``in flight / max_batch`` times
    longer. ``None`` (the default) models no contention. Scale-out benchmarks need it: without
    a bound, more replicas could not serve more.
    """

    per_request: float = 0.0
    per_uncached_prompt_token: float = 0.0
    per_token: float = 0.0
    burst: int = 1
    max_batch: int | None = None

    def __post_init__(self) -> None:
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1 token per write, got {self.burst}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 generation, got {self.max_batch}")

    def slowdown(self, in_flight: int) -> float:
        """How many times longer prefill and tokens take with ``in_flight`` generations."""
        if self.max_batch is None or in_flight <= self.max_batch:
            return 1.0
        return in_flight / self.max_batch

    def prefill_seconds(self, uncached_tokens: int) -> float:
        return self.per_request + self.per_uncached_prompt_token * uncached_tokens

    def service_seconds(self, uncached_tokens: int, generated_tokens: int) -> float:
        return self.prefill_seconds(uncached_tokens) + self.per_token * generated_tokens


@dataclass(slots=True)
class RequestRecord:
    """One generation request as the server saw it."""

    id: int
    path: str
    prompt: str
    parameters: dict[str, Any]
    started: float
    """``time.monotonic()`` when the request arrived."""
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    """Prompt tokens served from the prefix cache; the rest were recomputed."""
    max_new_tokens: int = 0
    tokens_sent: int = 0
    """Generated tokens written to the socket (the final special token included)."""
    finish_reason: str | None = None
    """TGI's finish reason once the answer is complete; ``None`` if it was cut short."""
    status: int = 200
    error_type: str | None = None
    """Set when the request failed: an error status, or an error event inside the stream."""
    fault: Fault | None = None
    disconnected: bool = False
    """The client closed the connection before the answer was complete."""
    finished: float | None = None
    service_seconds: float = 0.0
    """What the latency model charged (stalls excluded)."""
    model_input: str = ""
    """The text the model continued: the BOS text the server's tokenizer adds to a raw prompt
    (none for ChatML models, or when the request asked for no special tokens), then
    ``prompt``."""
    headers: dict[str, str] = field(default_factory=dict)
    """The request's headers, names in lower case (``authorization`` left out)."""

    @property
    def recomputed_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_prompt_tokens


@dataclass(slots=True)
class CallRecord:
    """Any request the server received (generation, ``/info``, ``/tokenize``, ...), in arrival
    order."""

    method: str
    path: str
    headers: dict[str, str]
    """Names in lower case; ``authorization`` left out."""
    started: float
    """``time.monotonic()`` when the request arrived."""
    generation: bool = False
    """The path is a generation endpoint (``/generate_stream``, ``/generate``,
    ``/v1/completions``)."""
    status: int | None = None
    """The answer's HTTP status, once it has started (``None`` before)."""


def recorded_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI headers as a dict for the records: lower-case names, no credentials."""
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        if key != "authorization":
            headers[key] = value.decode("latin-1")
    return headers


class PrefixCache:
    """Exact token-id prefix matching, as TGI v3 and vLLM's prefix caching: a hash chain over
    token ids, one entry per prefix, least recently used evicted beyond ``capacity``."""

    def __init__(self, capacity: int | None = 1_000_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, None] = OrderedDict()

    @staticmethod
    def chain(ids: Iterable[int], start: int = 0) -> list[int]:
        hashes = []
        h = start
        for token_id in ids:
            h = hash((h, token_id))
            hashes.append(h)
        return hashes

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading tokens are cached."""
        matched = 0
        for h in hashes:
            if h not in self._entries:
                break
            self._entries.move_to_end(h)
            matched += 1
        return matched

    def add(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self._entries[h] = None
            self._entries.move_to_end(h)
        if self.capacity is not None:
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
