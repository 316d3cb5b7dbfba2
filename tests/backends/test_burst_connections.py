"""The first requests of a burst open their connections side by side (issue "First token fast
under a burst"): nothing in the pool makes one request's connect wait for another's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from specthink.backends._connection import ServerConnection

BURST = 24


class HeldServer:
    """Answers no request until ``expected`` connections are open at once, then all of them:
    a client whose connects waited on each other (a pool lock held across a connect or a
    response) never gets there."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.open = 0
        self.most_open = 0
        self.all_open = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        if self.open >= self.expected:
            self.all_open.set()
        try:
            await reader.readuntil(b"\r\n\r\n")
            await self.all_open.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.read()  # until the client closes or the test ends
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"


@pytest.fixture
async def held() -> AsyncIterator[HeldServer]:
    server = HeldServer(BURST)
    server.server = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()


async def _burst(connection: ServerConnection) -> list[httpx.Response]:
    return await asyncio.wait_for(asyncio.gather(
        *(connection.request("GET", "/info", retry=False) for _ in range(BURST))), timeout=20)


async def test_a_burst_opens_every_connection_before_any_answer(held: HeldServer) -> None:
    """specthink's own transport: 24 first requests at once have 24 connections open at once
    (broken: connects serialised on a pool lock, or one connection shared in turn; the burst
    then times out)."""
    connection = ServerConnection(held.url)
    try:
        responses = await _burst(connection)
    finally:
        await connection.aclose()
    assert [r.status_code for r in responses] == [200] * BURST
    assert held.most_open == BURST


async def test_a_passed_httpx_client_opens_them_side_by_side_too(held: HeldServer) -> None:
    """Over httpx's own pool (a client the caller passed), the same holds: httpcore's pool lock
    is not held across a connect (broken: a pool setting or an httpcore upgrade that queues
    connects)."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None)) as client:
        connection = ServerConnection(held.url, client=client)
        responses = await _burst(connection)
    assert [r.status_code for r in responses] == [200] * BURST
    assert held.most_open == BURST
