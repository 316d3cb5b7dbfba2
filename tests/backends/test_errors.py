"""httpx's exceptions become ``specthink.errors`` by phase (``specthink.backends._errors``)."""

from __future__ import annotations

import httpx
import pytest

from specthink.backends._errors import translate_errors
from specthink.errors import (
    BackendConnectionError,
    BackendError,
    BackendTimeoutError,
    StreamDroppedError,
)


@pytest.mark.parametrize(("raised", "expected"), [
    (httpx.ConnectError("refused"), BackendConnectionError),
    (httpx.ConnectTimeout("slow"), BackendTimeoutError),
    (httpx.ReadTimeout("stall"), BackendTimeoutError),
    (httpx.PoolTimeout("busy"), BackendTimeoutError),
    (httpx.RemoteProtocolError("reset"), BackendConnectionError),
    (httpx.ReadError("reset"), BackendConnectionError),
    (httpx.UnsupportedProtocol("gopher"), BackendError),
])
def test_httpx_errors_before_the_stream_map_and_chain(raised: Exception,
                                                       expected: type[Exception]) -> None:
    with pytest.raises(expected) as info, translate_errors("http://h:1"):
        raise raised
    assert type(info.value) is expected
    assert info.value.__cause__ is raised
    assert "http://h:1" in str(info.value)


@pytest.mark.parametrize("raised", [httpx.RemoteProtocolError("incomplete chunked read"),
                                    httpx.ReadError("connection reset")])
def test_a_break_after_tokens_is_a_dropped_stream(raised: Exception) -> None:
    with pytest.raises(StreamDroppedError) as info, translate_errors("http://h:1",
                                                                     tokens_received=3):
        raise raised
    assert info.value.tokens_received == 3
    assert info.value.__cause__ is raised
