"""Timeouts, retry counts and backoff bounds, in one place (as openai-python's _constants)."""

from __future__ import annotations

from typing import Literal

import httpx

VERSION = "0.1.0"
"""The package's version (``specthink.__version__``; pyproject.toml says the same, tested)."""

Role = Literal["small", "target"]
"""The two models of a pair: the small (speculative) one and the target."""
ROLES: tuple[Role, ...] = ("small", "target")

# ---- environment variables (the CLI, both adapters and the backends read the same ones)

API_KEY_ENV = "SPECTHINK_API_KEY"
"""Where a backend finds its bearer token when none is passed."""
SMALL_URL_ENV = "SPECTHINK_SMALL_URL"
TARGET_URL_ENV = "SPECTHINK_TARGET_URL"
SMALL_MODEL_ENV = "SPECTHINK_SMALL_MODEL"
TARGET_MODEL_ENV = "SPECTHINK_TARGET_MODEL"
BACKEND_ENV = "SPECTHINK_BACKEND"
RULES_ENV = "SPECTHINK_RULES"
LOCAL_SMALL_PORT_ENV = "SPECTHINK_LOCAL_SMALL_PORT"
LOCAL_TARGET_PORT_ENV = "SPECTHINK_LOCAL_TARGET_PORT"
STATE_DIR_ENV = "SPECTHINK_STATE_DIR"
URL_ENV = {"small": SMALL_URL_ENV, "target": TARGET_URL_ENV}
MODEL_ENV = {"small": SMALL_MODEL_ENV, "target": TARGET_MODEL_ENV}

DEFAULT_CONNECT_TIMEOUT = 5.0
"""Seconds to open a TCP connection to a server."""

DEFAULT_READ_TIMEOUT = 120.0
"""Seconds between two bytes of a stream before it counts as stalled. There is no total timeout,
so a long healthy stream is never cut (the legacy ``text-generation`` client cut at 10 s)."""

DEFAULT_MAX_RETRIES = 2
"""Retries of a request that failed before its first token (429, 503, connection errors)."""

RETRY_INITIAL_BACKOFF = 0.5
RETRY_MAX_BACKOFF = 8.0
RETRY_AFTER_CAP = 30.0
"""A server's ``Retry-After`` is obeyed up to this many seconds."""
RETRY_DEADLINE = 60.0
"""No retry starts later than this many seconds after the first attempt of a request."""

DEFAULT_MAX_NEW_TOKENS = 4096
"""Tokens a call may generate, both models together, when the caller sets no budget."""

KEEPALIVE_EXPIRY = 4.0
POOL_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=512,
                           keepalive_expiry=KEEPALIVE_EXPIRY)
"""Idle connections are dropped before common servers drop them (uvicorn, behind vLLM and
llama.cpp's Python server, closes after 5 s), so a request never lands on a closing socket."""


def default_timeout(read: float | None = DEFAULT_READ_TIMEOUT,
                    connect: float = DEFAULT_CONNECT_TIMEOUT) -> httpx.Timeout:
    """A connect and read timeout, and no pool or total limit."""
    return httpx.Timeout(connect=connect, read=read, write=connect, pool=None)
