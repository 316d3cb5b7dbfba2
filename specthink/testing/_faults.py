"""Faults the loopback server injects on purpose, and the TGI error bodies it answers with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ERROR_MESSAGES", "OVERLOADED", "STATUS_BODIES", "Fault", "FaultKind"]

FaultKind = Literal["status", "error_event", "drop", "stall"]

STATUS_BODIES: dict[int, tuple[str, str]] = {
    422: ("Input validation error: injected fault", "validation"),
    424: ("Request failed during generation: injected fault", "generation"),
    429: ("Model is overloaded", "overloaded"),
    500: ("Incomplete generation", "incomplete_generation"),
    503: ("Model is not ready", "unhealthy"),
}
"""TGI's ``(error, error_type)`` for each status a fault may answer with."""
OVERLOADED = ("Model is overloaded", "overloaded")
ERROR_MESSAGES = {error_type: message for message, error_type in STATUS_BODIES.values()}
"""The message of an in-stream error event, by its ``error_type``."""


@dataclass(frozen=True, slots=True)
class Fault:
    """Something going wrong on purpose. Build one with :meth:`status`, :meth:`error_event`,
    :meth:`drop` or :meth:`stall` and pass it to :meth:`LoopbackServer.inject`.

    Faults apply to the next matching generation requests in FIFO order, ``times`` requests
    each. Status faults match any generation request; the others match streamed ones, and act
    once ``after_tokens`` tokens have been sent (never if the answer is shorter). ``path``
    limits a fault to one endpoint; a status fault whose ``path`` is not a generation endpoint
    (``/info``, ``/tokenize``, ``/v1/models``, ...) answers that endpoint's next requests.
    """

    kind: FaultKind
    times: int = 1
    status_code: int | None = None
    retry_after: float | None = None
    after_tokens: int = 0
    error_type: str = "generation"
    seconds: float = 0.0
    path: str | None = None

    @classmethod
    def status(cls, status_code: int, *, times: int = 1, retry_after: float | None = None,
               path: str | None = None) -> Fault:
        """Answer with ``status_code`` and TGI's ``{"error", "error_type"}`` body (and a
        ``Retry-After`` header when given)."""
        return cls("status", times, status_code=status_code, retry_after=retry_after, path=path)

    @classmethod
    def error_event(cls, *, after_tokens: int = 0, error_type: str = "generation",
                    times: int = 1, path: str | None = None) -> Fault:
        """Send an ``{"error", "error_type"}`` event inside the 200 stream, then end it."""
        return cls("error_event", times, after_tokens=after_tokens, error_type=error_type,
                   path=path)

    @classmethod
    def drop(cls, *, after_tokens: int = 0, times: int = 1, path: str | None = None) -> Fault:
        """Close the TCP connection mid-stream: the client sees an incomplete chunked body."""
        return cls("drop", times, after_tokens=after_tokens, path=path)

    @classmethod
    def stall(cls, *, after_tokens: int = 0, seconds: float, times: int = 1,
              path: str | None = None) -> Fault:
        """Pause ``seconds`` before token ``after_tokens + 1`` (a client read timeout fires)."""
        return cls("stall", times, after_tokens=after_tokens, seconds=seconds, path=path)

    def matches(self, path: str, streaming: bool) -> bool:
        if self.path is not None and self.path != path:
            return False
        return self.kind == "status" or streaming
