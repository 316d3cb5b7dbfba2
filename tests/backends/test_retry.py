"""Which failures are retried, how long to wait, and ``Retry-After``
(``specthink.backends._retry``)."""

from __future__ import annotations

import httpx
import pytest

from specthink.backends._retry import RetryPolicy, is_transient, parse_retry_after
from specthink.errors import (
    BackendConnectionError,
    BackendStatusError,
    BackendTimeoutError,
    ConfigError,
    GenerationError,
    InStreamError,
    OverloadedError,
    RequestValidationError,
    StreamDroppedError,
    UnhealthyError,
)


def test_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after": "2.5"})) == 2.5
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}),
                             now=1445412480.0) == 10.0
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert parse_retry_after(httpx.Headers()) is None


@pytest.mark.parametrize(("error", "transient"), [
    (OverloadedError("busy"), True),
    (UnhealthyError("loading"), True),
    (BackendConnectionError("refused"), True),
    (InStreamError("busy", error_type="overloaded"), True),
    (InStreamError("busy", error_type="overloaded", tokens_received=1), False),
    (InStreamError("bad", error_type="validation"), False),
    (RequestValidationError("bad"), False),
    (GenerationError("oom"), False),
    # a router (vllm-router, smg) that could not reach its replica: nothing was generated
    (BackendStatusError("error sending request", status_code=502), True),
    (BackendStatusError("incomplete generation", status_code=500), False),
    (StreamDroppedError("reset", tokens_received=4), False),
    (BackendTimeoutError("stall"), False),
])
def test_which_failures_are_retried(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


def test_retry_after_wins_up_to_the_cap() -> None:
    policy = RetryPolicy(retry_after_cap=30.0)
    assert policy.wait_seconds(1, OverloadedError("busy", retry_after=3.0)) == 3.0
    assert policy.wait_seconds(1, OverloadedError("busy", retry_after=600.0)) == 30.0


def test_backoff_doubles_with_jitter_up_to_the_maximum() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=8.0)
    for retry, base in [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (9, 8.0)]:
        wait = policy.wait_seconds(retry, OverloadedError("busy"))
        assert 0.75 * base <= wait <= base


def test_negative_retry_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ConfigError, match="initial_backoff"):
        RetryPolicy(initial_backoff=-0.1)
