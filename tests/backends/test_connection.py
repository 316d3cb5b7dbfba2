"""One server's connection: URL and timeouts, and the clients per event loop
(``specthink.backends._connection``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import httpx
import pytest

from specthink.backends import _connection as connection_module
from specthink.backends._connection import (
    SHARD_SIZE,
    ServerConnection,
    resolve_timeout,
    uses_environment_proxy,
    validate_url,
)
from specthink.backends._sse import opening_sse
from specthink.backends._transport import LeanTransport
from specthink.errors import ConfigError
from specthink.testing import LoopbackServer, ScriptedModel

# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("url", ["", "ftp://h/x", "localhost:8080", "http://", "unix:///tmp/s"])
def test_non_http_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="http"):
        validate_url(url)


def test_url_loses_its_trailing_slash() -> None:
    assert validate_url("https://tgi.example/") == "https://tgi.example"


def test_timeouts_have_connect_and_read_but_no_pool_limit() -> None:
    timeout = resolve_timeout(None, connect=2.0, read=60.0)
    assert (timeout.connect, timeout.read, timeout.pool) == (2.0, 60.0, None)
    assert resolve_timeout(3.0, connect=2.0, read=60.0).read == 3.0
    given_timeout = httpx.Timeout(1.0)
    assert resolve_timeout(given_timeout, connect=2.0, read=60.0) is given_timeout
    with pytest.raises(ConfigError, match="read_timeout"):
        resolve_timeout(None, connect=2.0, read=0.0)


# --------------------------------------------------------------------------- clients per loop


async def test_one_client_per_event_loop_and_only_own_clients_closed() -> None:
    connection = ServerConnection("http://127.0.0.1:9")
    here = connection.client()
    assert connection.client() is here

    other: list[httpx.AsyncClient] = []

    async def in_other_loop() -> None:
        other.append(connection.client())
        await other[0].aclose()  # that loop's owner cleans up before its loop ends

    thread = threading.Thread(target=lambda: asyncio.run(in_other_loop()))
    thread.start()
    thread.join()
    assert other[0] is not here

    await connection.aclose()
    assert here.is_closed


async def test_a_passed_client_is_used_and_left_open() -> None:
    async with httpx.AsyncClient() as client:
        connection = ServerConnection("http://127.0.0.1:9", client=client)
        assert connection.client() is client
        await connection.aclose()
        assert not client.is_closed


async def test_one_lean_client_carries_every_request(
        loopback_server: Callable[..., LoopbackServer]) -> None:
    server = loopback_server(ScriptedModel.single("a b c"))
    connection = ServerConnection(server.url)
    streams = [await connection.open_stream(
        "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 5}},
        opened=opening_sse(lambda event: None)) for _ in range(SHARD_SIZE + 1)]
    [client] = connection.clients()
    assert isinstance(client._transport, LeanTransport)
    for stream in streams:
        await stream.aclose()
    await connection.aclose()
    assert client.is_closed


@pytest.mark.parametrize(("environment", "proxied"), [
    ({}, False),
    ({"HTTP_PROXY": "http://proxy:3128"}, True),
    ({"ALL_PROXY": "http://proxy:3128"}, True),
    ({"HTTPS_PROXY": "http://proxy:3128"}, False),  # the server is plain http
    ({"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "gpu-box"}, False),
])
def test_a_proxy_from_the_environment_keeps_httpx_own_transport(
        monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], proxied: bool) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert uses_environment_proxy("http://gpu-box:8080") is proxied


async def test_requests_spread_over_clients_beyond_the_shard_size(
        loopback_server: Callable[..., LoopbackServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx's own transport (used when a proxy applies) is sharded: httpcore scans its pool."""
    monkeypatch.setattr(connection_module, "uses_environment_proxy", lambda url: True)
    server = loopback_server(ScriptedModel.single("a b c"))
    connection = ServerConnection(server.url)
    streams = [await connection.open_stream(
        "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 5}},
        opened=opening_sse(lambda event: None)) for _ in range(SHARD_SIZE + 1)]
    clients = connection.clients()
    assert len(clients) == 2
    for stream in streams:
        await stream.aclose()
    assert connection.client() is clients[0]  # back to the first once it has room
    await connection.aclose()
    assert all(client.is_closed for client in clients)
