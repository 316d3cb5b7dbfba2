"""The engine through real routers (``smg``, ``vllm-router``) in front of three replicas per
role, on loopback: conversations stay on their warm replica, cancellation reaches the replica,
a replica that dies mid-stream or is down before the call costs nothing but time, and which
protocol each router proxies.

OpenAI ``/v1/completions`` works behind both routers; TGI's native ``/generate_stream`` behind
``vllm-router`` only (``smg`` answers 404).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from contextlib import aclosing

import pytest

from benchmarks.traces import make_trace, messages_for
from specthink import SpeculativeThinker
from specthink.errors import BackendStatusError
from specthink.testing import LatencyModel
from specthink.trace import FinishEvent, TextEvent

from .scale_support import TRACE, Protocol, Role, ScaleOut

pytestmark = pytest.mark.timeout(90)

COMBINATIONS = [
    pytest.param("smg", "openai", id="smg-openai"),
    pytest.param("vllm-router", "openai", id="vllm-router-openai"),
    pytest.param("vllm-router", "tgi", id="vllm-router-tgi"),
]
ROLES: tuple[Role, ...] = ("small", "target")
BUDGET = 4000
# Slow enough that conversations overlap (a load-balancing router would spread them), fast
# enough that six conversations of ~450 tokens take about a second.
SMALL = LatencyModel(per_token=0.002)
TARGET = LatencyModel(per_token=0.004)


async def answer(thinker: SpeculativeThinker, conversation: int, **params: object) -> str:
    result = await thinker.agenerate(messages_for(make_trace(TRACE, conversation)),
                                     max_new_tokens=BUDGET, **params)
    assert not result.stats.fallback, result.stats.fallback_error
    return result.text


def assert_one_replica_and_warm(setup: ScaleOut, conversations: range) -> None:
    for role in ROLES:
        records = setup.records(role)
        for conversation in conversations:
            entries = records.get(conversation, [])
            if role == "small":
                assert entries, f"conversation {conversation} sent nothing to the small pool"
            replicas = {index for index, _ in entries}
            assert len(replicas) <= 1, (
                f"{role} requests of conversation {conversation} spread over replicas "
                f"{sorted(replicas)}")
            for (_, before), (_, after) in itertools.pairwise(entries):
                share = min(after.cached_prompt_tokens, before.prompt_tokens) / before.prompt_tokens
                assert share >= 0.99, (
                    f"{role} request {after.id} of conversation {conversation} found only "
                    f"{share:.1%} of its previous prompt in the replica's prefix cache")


@pytest.mark.parametrize(("kind", "protocol"), COMBINATIONS)
async def test_each_conversation_stays_on_one_warm_replica_per_role(
        scale_out: Callable[..., ScaleOut], kind: str, protocol: Protocol) -> None:
    """Six conversations at once through the routers: if this fails, a conversation's requests
    (every handoff and resume) are not carrying one routing key, or the router does not honour
    it, and follow-up requests recompute their prompt on a cold replica."""
    setup = scale_out(kind, small_latency=SMALL, target_latency=TARGET)
    conversations = range(1, 7)
    async with aclosing(setup.thinker(protocol)) as thinker:
        texts = await asyncio.gather(*(answer(thinker, c) for c in conversations))
    assert all(texts)
    assert sum(len(entries) for entries in setup.records("target").values()) > 0, (
        "the traces never handed over to the target: nothing tested for the target pool")
    assert_one_replica_and_warm(setup, conversations)


async def test_without_the_key_vllm_router_scatters_a_conversation(
        scale_out: Callable[..., ScaleOut]) -> None:
    """``routing_headers=()`` sends no key: ``consistent_hash`` then hashes each request's
    body, and every follow-up has a new one. If this fails, vllm-router keeps conversations
    together without a key and docs/scale-out.md says otherwise (each conversation makes
    several requests per pool, so all six staying put by chance is vanishingly unlikely)."""
    setup = scale_out("vllm-router", small_latency=SMALL, target_latency=TARGET)
    conversations = range(1, 7)
    async with aclosing(setup.thinker("openai", routing_headers=())) as thinker:
        await asyncio.gather(*(answer(thinker, c) for c in conversations))
    spread = [c for c in conversations if len(setup.replicas_of("small", c)) > 1]
    assert spread, "every conversation stayed on one small replica without a routing key"


@pytest.mark.parametrize(("kind", "protocol"), COMBINATIONS)
async def test_two_turns_keyed_by_one_session_stay_on_their_replicas(
        scale_out: Callable[..., ScaleOut], kind: str, protocol: Protocol) -> None:
    """Two turns of each of four conversations, each keyed by its session id: if this fails,
    the session id does not reach the router as the routing key, so a conversation's second
    turn lands on a replica that does not hold its first."""
    setup = scale_out(kind, small_latency=SMALL, target_latency=TARGET)
    conversations = range(1, 5)

    async def two_turns(thinker: SpeculativeThinker, conversation: int) -> None:
        session = f"session-{conversation}"
        messages = messages_for(make_trace(TRACE, conversation))
        first = await thinker.agenerate(messages, max_new_tokens=BUDGET, session_id=session)
        follow_up = [*messages, {"role": "assistant", "content": first.text},
                     {"role": "user", "content": f"Problem #{conversation}: and once more?"}]
        await thinker.agenerate(follow_up, max_new_tokens=BUDGET, session_id=session)

    async with aclosing(setup.thinker(protocol)) as thinker:
        await asyncio.gather(*(two_turns(thinker, c) for c in conversations))
    small = setup.records("small")
    for conversation in conversations:
        turns = sum(1 for _, r in small[conversation] if "and once more?" in r.prompt)
        assert turns >= 1, f"conversation {conversation}'s second turn never reached the pool"
        for role in ROLES:
            replicas = setup.replicas_of(role, conversation)
            assert len(replicas) <= 1, (
                f"the two turns of session-{conversation} used {role} replicas "
                f"{sorted(replicas)}")


async def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {seconds:g} s")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("kind", "protocol"), COMBINATIONS)
async def test_cancelling_astream_closes_the_replicas_stream(
        scale_out: Callable[..., ScaleOut], kind: str, protocol: Protocol) -> None:
    """The caller stops reading after a few tokens and closes the stream: if this fails, the
    router keeps the replica generating for nobody (the cancellation does not propagate)."""
    slow = LatencyModel(per_token=0.02)
    setup = scale_out(kind, small_latency=slow, target_latency=slow)
    async with aclosing(setup.thinker(protocol)) as thinker:
        events = thinker.astream(messages_for(make_trace(TRACE, 1)), max_new_tokens=BUDGET)
        async with aclosing(events):
            received = 0
            async for event in events:
                received += isinstance(event, TextEvent)
                if received >= 5:
                    break
    records = [r for server in setup.small for r in server.records]
    assert records, "no request reached the small pool"
    await wait_for(lambda: all(r.disconnected or r.finish_reason is not None
                               for server in setup.small for r in server.records))
    last = max((r for server in setup.small for r in server.records), key=lambda r: r.started)
    assert last.disconnected and last.finish_reason is None, (
        "the replica finished the answer instead of seeing the client hang up")
    assert last.tokens_sent < make_trace(TRACE, 1).small_tokens


@pytest.mark.parametrize(("kind", "protocol"), COMBINATIONS)
async def test_a_replica_that_dies_mid_stream_still_gives_the_whole_answer(
        scale_out: Callable[..., ScaleOut], kind: str, protocol: Protocol) -> None:
    """The small replica serving the conversation is stopped while it streams: if this fails,
    the engine does not resume through the router (or the router keeps sending the key to the
    dead replica), and the answer breaks, or differs from the uninterrupted one."""
    setup = scale_out(kind, small_latency=SMALL, target_latency=TARGET)
    # Retries span the router's health-check interval (1 s): vllm-router answers 502 for the
    # dead replica until its health check marks it down.
    async with aclosing(setup.thinker(protocol, max_retries=5)) as thinker:
        expected = await answer(thinker, 2)
        setup.reset()
        text, result, killed = "", None, None
        events = thinker.astream(messages_for(make_trace(TRACE, 2)), max_new_tokens=BUDGET)
        async with aclosing(events):
            async for event in events:
                if isinstance(event, TextEvent):
                    text += event.text
                    if killed is None and len(text) > 60:
                        killed = next(s for s in setup.small if s.records)
                        await asyncio.to_thread(killed.stop)
                elif isinstance(event, FinishEvent):
                    result = event.result
    assert killed is not None and result is not None
    assert result.text == expected
    assert result.stats.resumed_streams["small"] >= 1, "the stream was never broken"
    assert not result.stats.fallback
    live = [s for s in setup.small if s is not killed]
    assert any(s.records for s in live), "nothing was resumed on a live replica"


@pytest.mark.parametrize(("kind", "protocol"), COMBINATIONS)
async def test_a_replica_down_before_the_call_is_routed_around(
        scale_out: Callable[..., ScaleOut], kind: str, protocol: Protocol) -> None:
    """One replica of each pool is down when four conversations start: if this fails, the
    router sends conversations to the dead replica and answers an error the engine cannot
    retry (or the target's error makes the engine fall back to the small model)."""
    setup = scale_out(kind, small_latency=SMALL, target_latency=TARGET)
    conversations = range(1, 5)
    async with aclosing(setup.thinker(protocol)) as thinker:
        expected = await asyncio.gather(*(answer(thinker, c) for c in conversations))
    setup.reset()
    for role in ROLES:
        dead = setup.pool(role)[0]
        url = dead.url
        await asyncio.to_thread(dead.stop)
        # The routers' own health checks (every second here) take the replica out.
        await asyncio.to_thread(setup.routers[role].wait_unhealthy, url)
    async with aclosing(setup.thinker(protocol)) as thinker:
        texts = await asyncio.gather(*(answer(thinker, c) for c in conversations))
    assert texts == expected
    assert_one_replica_and_warm(setup, conversations)


async def test_smg_does_not_proxy_tgis_native_stream(scale_out: Callable[..., ScaleOut]) -> None:
    """``smg`` knows OpenAI and SGLang paths, not TGI's ``/generate_stream``: if this fails,
    smg started proxying it (update docs/scale-out.md), or the 404 no longer reaches the
    caller as a clear status error."""
    setup = scale_out("smg")
    async with aclosing(setup.thinker("tgi")) as thinker:
        with pytest.raises(BackendStatusError) as info:
            await answer(thinker, 1)
    assert info.value.status_code == 404
    assert not any(server.records for server in setup.small)
