"""TGI's non-streamed ``POST /generate``, the call the authors' control loop is built on.

The library never needs a whole answer in one response (the engine streams), so this client
lives with the benchmark. It pays what the engine's backends pay per request (the engine's
lean transport, its timeouts and pool limits, its retry bounds on the same transient
failures), so the policies compared differ only in their control loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from specthink import _constants
from specthink.backends import SamplingParams
from specthink.backends._transport import LeanTransport
from specthink.backends.base import FinishReason
from specthink.backends.tgi import generate_parameters

__all__ = ["GenerateClient", "GenerateError", "Generated"]

_FINISH: dict[str, FinishReason] = {"length": "length", "stop_sequence": "stop"}
"""TGI's finish reasons other than ``eos_token``."""

TRANSIENT_STATUS = frozenset({429, 502, 503})
"""Answers worth another attempt, as for the engine's streams (overloaded, a router that could
not reach its replica, unavailable)."""


@dataclass(frozen=True, slots=True)
class Generated:
    """One non-streamed answer."""

    tokens: tuple[str, ...]
    """Texts of the generated tokens, special ones excluded."""
    finish_reason: FinishReason

    @property
    def text(self) -> str:
        return "".join(self.tokens)


class GenerateError(Exception):
    """``/generate`` failed: an error answer or a malformed one."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, GenerateError):
        return exc.status_code in TRANSIENT_STATUS
    # Refused or reset before an answer: nothing was generated. A timeout is not retried.
    return isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.TimeoutException)


class GenerateClient:
    """``POST /generate`` against one TGI server; ``on_attempt(number)`` is called before each
    attempt (1, 2, ...), so the caller counts requests and retries."""

    def __init__(self, url: str, *, max_retries: int = _constants.DEFAULT_MAX_RETRIES,
                 initial_backoff: float = _constants.RETRY_INITIAL_BACKOFF,
                 routing_header: str = "X-Session-ID") -> None:
        self.url = url
        self._client = httpx.AsyncClient(base_url=url, timeout=_constants.default_timeout(),
                                         limits=_constants.POOL_LIMITS,
                                         transport=LeanTransport())
        self._max_retries = max_retries
        self._initial_backoff = initial_backoff
        self._routing_header = routing_header

    async def generate(self, prompt: str, *, max_new_tokens: int,
                       sampling: SamplingParams | None = None, stop: Sequence[str] = (),
                       on_attempt: Callable[[int], None] | None = None,
                       routing_key: str | None = None) -> Generated:
        """The whole continuation of ``prompt``, cut at the first of ``stop`` (which TGI
        keeps in the text)."""
        parameters = generate_parameters(max_new_tokens, sampling or SamplingParams())
        if stop:
            parameters["stop"] = list(stop)
        body = {"inputs": prompt, "parameters": parameters}
        headers = {self._routing_header: routing_key} if routing_key else None
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_retries + 1),
            # Doubling from the first backoff with a quarter of it as jitter, as the engine's.
            wait=wait_exponential_jitter(multiplier=self._initial_backoff,
                                         jitter=self._initial_backoff / 4,
                                         max=_constants.RETRY_MAX_BACKOFF),
            retry=retry_if_exception(_transient), reraise=True)
        async for attempt in retrying:
            with attempt:
                if on_attempt is not None:
                    on_attempt(attempt.retry_state.attempt_number)
                response = await self._client.post("/generate", json=body, headers=headers)
                if response.status_code >= 400:
                    raise GenerateError(f"/generate answered {response.status_code}: "
                                        f"{response.text[:200]}", response.status_code)
        return _generated(response.json())

    async def aclose(self) -> None:
        await self._client.aclose()


def _generated(answer: Any) -> Generated:
    details = answer.get("details") if isinstance(answer, dict) else None
    tokens = details.get("tokens") if isinstance(details, dict) else None
    if not isinstance(details, dict) or not isinstance(tokens, list):
        raise GenerateError(f"/generate answered without details: {str(answer)[:200]}")
    return Generated(
        tuple(str(t.get("text", "")) for t in tokens if isinstance(t, dict)
              and not t.get("special")),
        _FINISH.get(str(details.get("finish_reason")), "eos"))
