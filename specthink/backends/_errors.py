"""The one place where httpx's exceptions and HTTP error answers become ``specthink.errors``.

``translated`` maps an httpx exception by the phase it happened in (opening a stream or after
tokens arrived); ``error_for_status`` maps an error answer by its body and status (through
``specthink.errors.error_from_response``, which reads TGI's, OpenAI's and FastAPI's bodies).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from specthink.backends._retry import parse_retry_after
from specthink.errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    StreamDroppedError,
    error_from_response,
)

__all__ = ["error_for_status", "error_payload", "translate_errors", "translated"]


def translated(exc: httpx.HTTPError, url: str, *,
               tokens_received: int | None = None) -> BackendError:
    """The ``specthink.errors`` exception for an httpx one (raise it ``from exc``).

    ``tokens_received`` is ``None`` while a stream is being opened and a count afterwards: a
    broken connection then is a ``StreamDroppedError`` the engine resumes from.
    """
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        phase = ("connecting" if isinstance(exc, httpx.ConnectTimeout)
                 else "waiting for a free connection" if isinstance(exc, httpx.PoolTimeout)
                 else "waiting for data")
        return BackendTimeoutError(f"timed out {phase} ({name})", url=url)
    if isinstance(exc, httpx.ConnectError):
        return BackendConnectionError(f"could not connect: {exc}", url=url)
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        if tokens_received is None:
            return BackendConnectionError(f"connection broke before the stream began: "
                                          f"{name}: {exc}", url=url)
        return StreamDroppedError(f"stream dropped after {tokens_received} tokens: {name}: {exc}",
                                  url=url, tokens_received=tokens_received)
    return BackendError(f"HTTP failure: {name}: {exc}", url=url)


@contextmanager
def translate_errors(url: str, *, tokens_received: int | None = None) -> Iterator[None]:
    """The one boundary where httpx exceptions become ``specthink.errors`` (chained)."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise translated(exc, url, tokens_received=tokens_received) from exc


def error_payload(body: bytes) -> object:
    """An error answer's body: its JSON, or its text."""
    text = body.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def error_for_status(response: httpx.Response, body: bytes, url: str) -> BackendStatusError:
    """The exception for an error answer (status >= 400) whose body has been read."""
    return error_from_response(response.status_code, error_payload(body), url=url,
                               retry_after=parse_retry_after(response.headers))
