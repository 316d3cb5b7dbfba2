"""The lean HTTP/1.1 transport under httpx: framing, keep-alive, cancellation by closing, and
every way a server can misbehave, against a raw asyncio server that answers scripted bytes."""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from specthink.backends._transport import ChunkedDecoder, LeanTransport


def lean_client(*, timeout: httpx.Timeout | None = None,
                **transport_options: Any) -> httpx.AsyncClient:
    """An httpx client over the lean transport, as ``ServerConnection`` builds one."""
    return httpx.AsyncClient(transport=LeanTransport(**transport_options),
                             timeout=timeout or httpx.Timeout(5.0))


# --------------------------------------------------------------------------- chunked framing

CHUNKED = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n"


def test_chunks_with_extensions_and_trailers() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(CHUNKED) == b"hello, world"
    assert decoder.done


@given(st.lists(st.integers(min_value=0, max_value=len(CHUNKED)), max_size=8))
def test_any_cut_of_the_bytes_gives_the_same_payload(cuts: list[int]) -> None:
    decoder = ChunkedDecoder()
    points = [0, *sorted(cuts), len(CHUNKED)]
    payload = b"".join(decoder.feed(CHUNKED[a:b]) for a, b in itertools.pairwise(points))
    assert payload == b"hello, world"
    assert decoder.done


@pytest.mark.parametrize("body", [b"zz\r\nhello\r\n", b"3\r\nhello\r\n", b"-1\r\n"])
def test_malformed_chunks_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        ChunkedDecoder().feed(body)


# --------------------------------------------------------------------------- a scripted server


@dataclass
class Answer:
    """What the server does with one request: write ``data`` then ``then`` ("keep" the
    connection, "close" it, or "hang" without a word)."""

    data: bytes = b""
    then: str = "keep"
    delay: float = 0.0


def ok(body: bytes = b"ok", *headers: bytes) -> Answer:
    head = b"".join(h + b"\r\n" for h in headers)
    return Answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), head, body))


def chunked(*pieces: bytes, then: str = "keep") -> Answer:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n",
                  then)


@dataclass
class ScriptedServer:
    answers: list[Answer]
    url: str = ""
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed_by_client: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if answer.delay:
                    await asyncio.sleep(answer.delay)
                writer.write(answer.data)
                await writer.drain()
                if answer.then == "close":
                    return
                if answer.then == "hang":
                    if not await reader.read(1):
                        self.closed_by_client += 1
                    return
        finally:
            writer.close()


Serve = Callable[..., Awaitable[ScriptedServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def start(*answers: Answer) -> ScriptedServer:
        scripted = ScriptedServer(list(answers))
        server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
        servers.append(server)
        scripted.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return scripted

    yield start
    for server in servers:
        server.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with lean_client(timeout=httpx.Timeout(2.0)) as made:
        yield made


async def settle(condition: Callable[[], bool], seconds: float = 2.0) -> None:
    """Wait until the server has seen what the client did (a close lands a loop turn later)."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - a counter, not an event
            await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- requests


async def test_the_request_goes_out_whole_with_httpx_headers(
        serve: Serve, client: httpx.AsyncClient) -> None:
    server = await serve(ok(b'{"a": 1}', b"Content-Type: application/json"))
    answer = await client.post(server.url + "/generate?x=1", json={"inputs": "hi"},
                               headers={"Authorization": "Bearer k"})
    assert answer.json() == {"a": 1}
    assert answer.http_version == "HTTP/1.1" and answer.reason_phrase == "OK"
    [request] = server.requests
    head, body = request.split(b"\r\n\r\n")
    assert head.startswith(b"POST /generate?x=1 HTTP/1.1\r\n")
    assert b"authorization: Bearer k" in head.lower().replace(b"bearer", b"Bearer")
    assert b"content-length: %d" % len(body) in head.lower()
    assert body == b'{"inputs":"hi"}'


async def test_a_finished_response_leaves_its_connection_for_the_next(
        serve: Serve, client: httpx.AsyncClient) -> None:
    server = await serve(ok(), chunked(b"a", b"b"), ok())
    assert (await client.get(server.url)).text == "ok"
    assert (await client.get(server.url)).text == "ab"
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 1


async def test_leaving_a_stream_early_closes_its_connection(
        serve: Serve, client: httpx.AsyncClient) -> None:
    """Closing is the only way HTTP/1.1 tells a server to stop generating."""
    server = await serve(Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"3\r\nabc\r\n", then="hang"), ok())
    async with client.stream("GET", server.url) as response:
        async for piece in response.aiter_raw():
            assert piece == b"abc"
            break
    await settle(lambda: server.closed_by_client == 1)
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


@pytest.mark.parametrize("answer", [
    ok(b"ok", b"Connection: close"),
    Answer(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
])
async def test_connection_close_and_http_1_0_are_not_reused(
        serve: Serve, client: httpx.AsyncClient, answer: Answer) -> None:
    server = await serve(answer, ok())
    assert (await client.get(server.url)).text == "ok"
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


async def test_a_body_without_length_runs_until_the_server_closes(
        serve: Serve, client: httpx.AsyncClient) -> None:
    server = await serve(Answer(b"HTTP/1.1 200 OK\r\n\r\nall of it", then="close"), ok())
    assert (await client.get(server.url)).text == "all of it"
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


async def test_informational_answers_are_skipped_and_empty_bodies_end_at_once(
        serve: Serve, client: httpx.AsyncClient) -> None:
    server = await serve(Answer(b"HTTP/1.1 100 Continue\r\n\r\n" + ok().data),
                         Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
                         Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"))
    assert (await client.post(server.url, content=b"x")).text == "ok"
    assert (await client.get(server.url)).status_code == 204
    head = await client.head(server.url)
    assert (head.status_code, head.content) == (200, b"")
    assert server.connections == 1


async def test_an_idle_connection_the_server_closed_is_not_used(
        serve: Serve, client: httpx.AsyncClient) -> None:
    server = await serve(Answer(ok().data, then="close"), ok())
    assert (await client.get(server.url)).text == "ok"
    await asyncio.sleep(0.05)  # the loop reads the server's FIN meanwhile
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


async def test_a_kept_connection_closed_before_answering_is_retried_on_a_fresh_one(
        serve: Serve, client: httpx.AsyncClient) -> None:
    """The race keep-alive always has: the server drops an idle connection as we reuse it."""
    server = await serve(ok(), Answer(b"", then="close"), ok(b"again"))
    assert (await client.get(server.url)).text == "ok"
    assert (await client.get(server.url)).text == "again"
    assert server.connections == 2


async def test_idle_connections_expire(serve: Serve) -> None:
    server = await serve(ok(), ok())
    async with lean_client(keepalive_expiry=0.01) as client:
        await client.get(server.url)
        await asyncio.sleep(0.05)
        await client.get(server.url)
    assert server.connections == 2


# --------------------------------------------------------------------------- failures


async def test_a_refused_connection_is_a_connect_error(client: httpx.AsyncClient) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://127.0.0.1:{port}")


async def test_a_slow_connect_is_a_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(10)

    monkeypatch.setattr(asyncio, "open_connection", never)
    async with lean_client(timeout=httpx.Timeout(5.0, connect=0.05)) as client:
        with pytest.raises(httpx.ConnectTimeout):
            await client.get("http://127.0.0.1:9")


@pytest.mark.parametrize("answer", [
    Answer(b"", then="hang"),  # no head at all
    Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", then="hang"),
])
async def test_silence_is_a_read_timeout(serve: Serve, answer: Answer) -> None:
    server = await serve(answer)
    async with lean_client(timeout=httpx.Timeout(5.0, read=0.1)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url)
    await settle(lambda: server.closed_by_client == 1)


@pytest.mark.parametrize("answer", [
    Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", then="close"),
    Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", then="close"),
    Answer(b"HTTP/1.1 200 OK\r\nContent-Len", then="close"),
    Answer(b"SPDY/9 200 OK\r\n\r\n"),
    Answer(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"),
    Answer(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
    Answer(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000 + b"\r\n\r\n"),
    Answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"),
])
async def test_broken_answers_are_protocol_errors(serve: Serve, client: httpx.AsyncClient,
                                                  answer: Answer) -> None:
    server = await serve(answer)
    with pytest.raises(httpx.RemoteProtocolError) as caught:
        await client.get(server.url)
    assert caught.value.request.url == httpx.URL(server.url)


async def test_a_closed_transport_refuses_requests() -> None:
    transport = LeanTransport()
    await transport.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", "http://127.0.0.1:9"))


async def test_https_with_the_servers_certificate_and_keep_alive() -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    scripted = ScriptedServer([ok(b"secret"), chunked(b"again")])
    server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        async with lean_client(ssl_context=client_context) as client:
            assert (await client.get(f"https://127.0.0.1:{port}/")).text == "secret"
            assert (await client.get(f"https://127.0.0.1:{port}/")).text == "again"
        assert scripted.connections == 1
        async with lean_client() as untrusting:  # the system's CAs do not know this one
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusting.get(f"https://127.0.0.1:{port}/")
    finally:
        server.close()
