"""Which failures are worth another attempt, and the one retry loop (tenacity) around a
request: exponential backoff with jitter, a server's ``Retry-After`` obeyed up to a cap, and a
deadline after which no retry starts."""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
)
from tenacity.stop import stop_base

from specthink import _constants
from specthink.errors import (
    BackendConnectionError,
    BackendStatusError,
    ConfigError,
    InStreamError,
    StreamDroppedError,
)

__all__ = ["RetryPolicy", "is_transient", "parse_retry_after"]

T = TypeVar("T")

logger = logging.getLogger("specthink.backends")


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds a server asks us to wait: ``retry-after-ms``, or ``Retry-After`` as seconds or an
    HTTP date. ``None`` when absent or unreadable. ``headers`` is case-insensitive (httpx's)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def is_transient(exc: BaseException) -> bool:
    """Worth another attempt: 429/503 answers, a router's 502 (it could not reach the replica,
    so nothing was generated), a refused or reset connection, and an ``overloaded`` event
    before the first token. Never a timeout or a dropped stream."""
    if isinstance(exc, BackendStatusError):
        return exc.status_code in (429, 502, 503)
    if isinstance(exc, InStreamError):
        return exc.error_type == "overloaded" and exc.tokens_received == 0
    return isinstance(exc, BackendConnectionError) and not isinstance(exc, StreamDroppedError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries around the call that opens a stream: exponential backoff with jitter from
    ``initial_backoff`` up to ``max_backoff``; a server's ``Retry-After`` wins, up to
    ``retry_after_cap``."""

    max_retries: int = _constants.DEFAULT_MAX_RETRIES
    initial_backoff: float = _constants.RETRY_INITIAL_BACKOFF
    max_backoff: float = _constants.RETRY_MAX_BACKOFF
    retry_after_cap: float = _constants.RETRY_AFTER_CAP
    deadline: float | None = _constants.RETRY_DEADLINE
    """Seconds from the first attempt after which no retry starts (``None``: only
    ``max_retries`` bounds them)."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.deadline is not None and self.deadline < 0:
            raise ConfigError(f"deadline must be >= 0 seconds, got {self.deadline}")
        for name in ("initial_backoff", "max_backoff", "retry_after_cap"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")

    def wait_seconds(self, retry_number: int, exc: BaseException | None) -> float:
        """Seconds to wait before retry number ``retry_number`` (1, 2, ...)."""
        retry_after = exc.retry_after if isinstance(exc, BackendStatusError) else None
        if retry_after is not None:
            return min(float(retry_after), self.retry_after_cap)
        backoff = min(self.initial_backoff * 2.0 ** (retry_number - 1), self.max_backoff)
        # Jitter spreads the retries of many conversations hitting one overloaded server.
        return float(backoff * (1.0 - 0.25 * random.random()))

    def retrying(self, describe: str) -> AsyncRetrying:
        """Tenacity's loop over every attempt of one request: retried while the failure
        :func:`is_transient`, at most ``max_retries`` times, never starting a wait that would
        end past ``deadline`` seconds after the first attempt."""
        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self.wait_seconds(state.attempt_number, exc)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            seconds = float(state.next_action.sleep) if state.next_action else 0.0
            logger.warning("retrying %s in %.3f s (attempt %d of %d) after: %s", describe,
                           seconds, state.attempt_number + 1, self.max_retries + 1, exc)

        stop: stop_base = stop_after_attempt(self.max_retries + 1)
        if self.deadline is not None:
            stop = stop | stop_before_delay(self.deadline)
        return AsyncRetrying(stop=stop, wait=wait, retry=retry_if_exception(is_transient),
                             before_sleep=before_sleep, reraise=True)

    async def call(self, describe: str, once: Callable[[], Awaitable[T]]) -> T:
        """``once()``, retried on transient failures (one tenacity loop, first attempt
        included)."""
        async for attempt in self.retrying(describe):
            with attempt:
                return await once()
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover
