"""Streams under load and when the client goes: a client that hangs up closes the model
servers' streams, 256 concurrent streams each equal their solo run, and the routing key comes
from the client's X-Session-ID header or ``user`` field."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest

from specthink.testing import LoopbackServer
from specthink.testing.models import ScriptedModel
from tests.support import LONG, last, reflecting_servers, streaming, wait_for

from .conftest import Pair, Served


@pytest.fixture
def reflecting_pair() -> Iterator[Pair]:
    """``tests.support.reflecting_servers``, as a serve test's pair."""
    with reflecting_servers() as servers:
        yield Pair(servers.small, servers.target)


async def hang_up_once(served: Served, server: LoopbackServer) -> None:
    """Stream a request and close the connection once ``server`` is streaming to us."""
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", f"{served.base_url}/chat/completions", json={
                "model": "specthink", "stream": True,
                "messages": [{"role": "user", "content": "Solve for x."}]}) as response:
            assert response.status_code == 200
            lines = aiter(response.aiter_lines())
            await anext(lines)
            await wait_for(lambda: streaming(server), f"the {server.model_id} server streams")
    # leaving both blocks closes the connection mid-stream


@pytest.mark.parametrize("role", ["small", "target"])
async def test_client_hanging_up_closes_the_model_servers_stream(
        reflecting_pair: Pair, serve: Callable[..., Served], role: str) -> None:
    """The client disconnects while the small model (before the blank line) or the target
    (after its takeover) streams: that server sees its client hang up, and no request follows.
    Failing: the server keeps generating for nobody, on a GPU."""
    served = serve(reflecting_pair)
    server = getattr(reflecting_pair, role)
    if role == "small":
        reflecting_pair.small.model = ScriptedModel.single(LONG)
    await hang_up_once(served, server)
    await wait_for(lambda: last(server).disconnected, f"the {role} server sees the hang-up")
    assert last(server).finish_reason is None
    counts = reflecting_pair.requests()
    await wait_for(lambda: served.metrics.in_flight._value.get() == 0, "the request ends")
    await asyncio.sleep(0.1)
    assert reflecting_pair.requests() == counts, "a request was sent after the hang-up"
    assert all(r.disconnected or r.finished is not None
               for s in (reflecting_pair.small, reflecting_pair.target) for r in s.records)
    assert served.metrics.requests.labels("499")._value.get() == 1


async def test_a_client_that_gives_up_on_a_whole_answer_cancels_it(
        reflecting_pair: Pair, serve: Callable[..., Served]) -> None:
    """Not streamed: the client's read timeout closes the connection while the target writes;
    the server notices without writing anything and closes the target's stream."""
    served = serve(reflecting_pair)
    async with httpx.AsyncClient(timeout=30) as client:
        request = asyncio.ensure_future(client.post(
            f"{served.base_url}/chat/completions", json={
                "model": "specthink", "messages": [{"role": "user", "content": "Solve."}]}))
        await wait_for(lambda: streaming(reflecting_pair.target), "the target streams")
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    await wait_for(lambda: last(reflecting_pair.target).disconnected,
                   "the target server sees the hang-up")
    await wait_for(lambda: served.metrics.in_flight._value.get() == 0, "the request ends")


async def read_stream(client: httpx.AsyncClient, served: Served, question: str,
                      ) -> tuple[str, str, str]:
    """(reasoning, content, finish_reason) of one streamed answer."""
    reasoning, content, finish = [], [], ""
    async with client.stream("POST", f"{served.base_url}/chat/completions", json={
            "model": "specthink", "stream": True,
            "messages": [{"role": "user", "content": question}]}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line or line == "data: [DONE]":
                continue
            choice = orjson.loads(line.removeprefix("data: "))["choices"][0]
            reasoning.append(choice["delta"].get("reasoning", ""))
            content.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(reasoning), "".join(content), finish


@pytest.mark.timeout(240)
async def test_256_concurrent_streams_each_equal_its_solo_run(fresh: Served) -> None:
    """256 conversations at once through one server: each stream is exactly what the same
    conversation streams alone (failing: chunks of concurrent requests mix, or are lost when
    the event loop is busy)."""
    questions = [f"hello number {n}" for n in range(256)]
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        solo = [await read_stream(client, fresh, q) for q in questions]
        together = await asyncio.gather(*(read_stream(client, fresh, q) for q in questions))
    assert list(together) == solo
    assert len(set(solo)) == 256
    assert all(finish == "stop" and content.startswith("You said: hello number")
               for _, content, finish in solo)


def test_session_id_header_or_user_becomes_the_routing_key(fresh: Served) -> None:
    """X-Session-ID (else ``user``) reaches both model servers as the routing key, so a router
    keeps the conversation on the replica holding its prefix. Failing: every request of a
    conversation may land on another replica and recompute its prompt."""
    url = f"{fresh.base_url}/chat/completions"
    body = {"model": "specthink", "messages": [{"role": "user", "content": "hello"}]}
    for headers, user, key in (({"X-Session-ID": "conv-42"}, None, "conv-42"),
                               ({}, "user-7", "user-7"),
                               ({"X-Session-ID": "conv-9"}, "user-7", "conv-9")):
        fresh.pair.reset()
        response = httpx.post(url, json={**body, "user": user}, headers=headers, timeout=30)
        assert response.status_code == 200
        records = [*fresh.pair.small.records, *fresh.pair.target.records]
        assert len(records) >= 2
        assert {record.headers.get("x-session-id") for record in records} == {key}


def test_any_session_id_or_user_works_as_a_routing_key(fresh: Served) -> None:
    """A non-ASCII X-Session-ID, a non-ASCII ``user`` and a 100 KB one are answered, and every
    request of each call carries one safe header value, the same for the same key. Broken:
    the first two are a 500 (httpx cannot encode the header), the third a 502 blamed on the
    model server (a router refuses a 100 KB header)."""
    url = f"{fresh.base_url}/chat/completions"
    body = {"model": "specthink", "messages": [{"role": "user", "content": "hello"}]}
    for headers, user in (({"X-Session-ID": "sessão-7 ✓".encode()}, None),
                          ({}, "utilisateur-é-中文"), ({}, "u" * 100_000)):
        values = []
        for _ in range(2):
            fresh.pair.reset()
            response = httpx.post(url, json={**body, "user": user}, headers=headers,
                                  timeout=30)
            assert response.status_code == 200, response.text
            records = [*fresh.pair.small.records, *fresh.pair.target.records]
            values.append({record.headers.get("x-session-id") for record in records})
        assert values[0] == values[1] and len(values[0]) == 1
        assert all(value.startswith("sha256-") and len(value) == 39 for value in values[0])
