"""Responses streams under load and when the client goes: a client that hangs up mid-stream
closes both model servers' streams (the chat path's handling), 64 concurrent streamed
responses each equal their solo run, and the routing key reaches the model servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator

import httpx
import pytest
from openai.types.responses import Response

from specthink.testing import LoopbackServer
from specthink.testing.models import ScriptedModel
from tests.support import LONG, last, reflecting_servers, streaming, wait_for

from .conftest import Pair, Served


@pytest.fixture
def reflecting_pair() -> Iterator[Pair]:
    with reflecting_servers() as servers:
        yield Pair(servers.small, servers.target)


async def hang_up_once(served: Served, server: LoopbackServer) -> None:
    """Stream a response and close the connection once ``server`` is streaming to us."""
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", f"{served.base_url}/responses", json={
                "model": "specthink", "stream": True, "input": "Solve for x."}) as response:
            assert response.status_code == 200
            lines = aiter(response.aiter_lines())
            await anext(lines)
            await wait_for(lambda: streaming(server), f"the {server.model_id} server streams")


@pytest.mark.parametrize("role", ["small", "target"])
async def test_client_leaving_mid_stream_closes_the_model_servers_stream(
        reflecting_pair: Pair, serve: Callable[..., Served], role: str) -> None:
    """The client disconnects while the small model or the target streams: that server sees
    the hang-up, no request follows, the request counts as 499 in both counters. Failing:
    the model servers keep generating for nobody."""
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
    assert served.metrics.responses.labels("499")._value.get() == 1
    assert served.metrics.requests.labels("499")._value.get() == 1


async def test_a_client_that_gives_up_on_a_whole_response_cancels_it(
        reflecting_pair: Pair, serve: Callable[..., Served]) -> None:
    """Not streamed: the client goes while the target writes; the target's stream is closed
    and the request counts as 499 (failing: a whole response runs to its end for nobody)."""
    served = serve(reflecting_pair)
    async with httpx.AsyncClient(timeout=30) as client:
        request = asyncio.ensure_future(client.post(
            f"{served.base_url}/responses", json={"model": "specthink", "input": "Solve."}))
        await wait_for(lambda: streaming(reflecting_pair.target), "the target streams")
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    await wait_for(lambda: last(reflecting_pair.target).disconnected,
                   "the target server sees the hang-up")
    await wait_for(lambda: served.metrics.in_flight._value.get() == 0, "the request ends")
    assert served.metrics.responses.labels("499")._value.get() == 1


async def read_stream(client: httpx.AsyncClient, served: Served, question: str,
                      ) -> tuple[str, str, str]:
    """(reasoning, answer, status) of one streamed response, from its deltas; the deltas are
    checked to equal the final response's items."""
    reasoning, answer, final = [], [], None
    async with client.stream("POST", f"{served.base_url}/responses", json={
            "model": "specthink", "stream": True, "input": question}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event["type"] == "response.reasoning_text.delta":
                reasoning.append(event["delta"])
            elif event["type"] == "response.output_text.delta":
                answer.append(event["delta"])
            elif event["type"] == "response.completed":
                final = Response.model_validate(event["response"])
    assert final is not None and final.output_text == "".join(answer)
    return "".join(reasoning), "".join(answer), final.status or ""


@pytest.mark.timeout(240)
async def test_64_concurrent_streamed_responses_each_equal_its_solo_run(fresh: Served) -> None:
    """64 responses at once through one server: each stream is exactly what the same input
    streams alone (failing: events of concurrent responses mix, or are lost)."""
    questions = [f"hello number {n}" for n in range(64)]
    limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        solo = [await read_stream(client, fresh, q) for q in questions]
        together = await asyncio.gather(*(read_stream(client, fresh, q) for q in questions))
    assert list(together) == solo
    assert len(set(solo)) == 64
    assert all(status == "completed" and answer == f"You said: {q}"
               for (_, answer, status), q in zip(solo, questions, strict=True))


def test_session_header_prompt_cache_key_or_user_is_the_routing_key(fresh: Served) -> None:
    """X-Session-ID, else prompt_cache_key, else user reaches both model servers as the
    routing key (failing: a router may move the conversation off its warm replica)."""
    url = f"{fresh.base_url}/responses"
    for headers, extra, key in (({"X-Session-ID": "conv-42"}, {"user": "u"}, "conv-42"),
                                ({}, {"prompt_cache_key": "pck-1", "user": "u"}, "pck-1"),
                                ({}, {"user": "user-7"}, "user-7")):
        fresh.pair.reset()
        response = httpx.post(url, json={"model": "specthink", "input": "hello", **extra},
                              headers=headers, timeout=30)
        assert response.status_code == 200
        records = [*fresh.pair.small.records, *fresh.pair.target.records]
        assert len(records) >= 2
        assert {record.headers.get("x-session-id") for record in records} == {key}
