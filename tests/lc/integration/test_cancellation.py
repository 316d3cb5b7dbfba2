"""A caller that stops reading, or is cancelled, stops the generation on both servers.

TGI cancels a generation when its client hangs up; the loopback servers record whether the
client disconnected before the answer was complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import cast

import pytest
from langchain_core.messages import AIMessageChunk

from specthink.testing import LatencyModel, LoopbackServer, RequestRecord
from specthink.testing.models import Script, ScriptedModel
from specthink_lc import ChatSpeculativeThinking


@dataclass
class ServerPair:
    small: LoopbackServer
    target: LoopbackServer

SLOW = LatencyModel(per_token=0.02)
LONG = " ".join(f"word{n}" for n in range(400))
REFLECTING = "Let x be 2.\n\nWait, x is 3.\n\n" + LONG


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


def streaming(server: LoopbackServer) -> bool:
    return any(r.tokens_sent >= 2 and r.finished is None for r in server.records)


def last(server: LoopbackServer) -> RequestRecord:
    return server.records[-1]


async def cancel_once_streaming(model: ChatSpeculativeThinking, prompt: str,
                                server: LoopbackServer, what: str) -> None:
    """Stream ``prompt`` in a task, cancel the task once ``server`` streams, and check that the
    task ends cancelled."""
    async def consume() -> None:
        async for _ in model.astream(prompt):
            pass

    task = asyncio.create_task(consume())
    await wait_for(lambda: streaming(server), what)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture
def servers() -> Iterator[ServerPair]:
    """The small model reflects after a blank line, so the target takes over and writes a long
    text; both servers answer slowly enough to be interrupted."""
    small = ScriptedModel([Script("", REFLECTING)])
    target = ScriptedModel([Script("Let x be 2.\n\n", LONG)])
    with LoopbackServer(small, latency=SLOW, model_id="test/small") as small_server, \
            LoopbackServer(target, latency=SLOW, model_id="test/target") as target_server:
        yield ServerPair(small_server, target_server)


def chat_model(servers: ServerPair) -> ChatSpeculativeThinking:
    return ChatSpeculativeThinking(small_url=servers.small.url, target_url=servers.target.url,
                                   small_template="chatml", target_template="chatml")


@pytest.fixture
async def pair(servers: ServerPair) -> AsyncIterator[tuple[ServerPair, ChatSpeculativeThinking]]:
    model = chat_model(servers)
    yield servers, model
    await model.aclose()


async def test_cancelling_while_the_small_model_writes_closes_its_stream(
        pair: tuple[ServerPair, ChatSpeculativeThinking]) -> None:
    """If this fails, a cancelled request keeps the small server generating for nobody."""
    servers, model = pair
    servers.small.model = ScriptedModel.single(LONG)

    await cancel_once_streaming(model, "Count.", servers.small, "the small model streams")

    await wait_for(lambda: last(servers.small).disconnected, "the small server sees the hang-up")
    assert last(servers.small).finish_reason is None
    assert servers.target.records == []


async def test_cancelling_while_the_target_writes_closes_its_stream(
        pair: tuple[ServerPair, ChatSpeculativeThinking]) -> None:
    """If this fails, a cancelled request keeps the target server generating for nobody."""
    servers, model = pair

    await cancel_once_streaming(model, "What is x?", servers.target, "the target model streams")

    await wait_for(lambda: last(servers.target).disconnected,
                   "the target server sees the hang-up")
    # The small model's stream was closed at the takeover, before the cancellation.
    assert [r.disconnected for r in servers.small.records] == [True]
    assert all(r.finished is not None or r.disconnected
               for server in (servers.small, servers.target) for r in server.records)


async def test_closing_the_stream_early_closes_the_server_stream(
        pair: tuple[ServerPair, ChatSpeculativeThinking]) -> None:
    """``aclose()`` on ``astream`` (what ``async with aclosing(...)`` and ``break`` in a
    managed loop do) must hang up, not leave the generation running."""
    servers, model = pair
    servers.small.model = ScriptedModel.single(LONG)

    stream = cast(AsyncGenerator[AIMessageChunk, None], model.astream("Count."))
    seen = ""
    async for chunk in stream:
        seen += chunk.text
        if len(seen) > 20:
            break
    await stream.aclose()

    await wait_for(lambda: last(servers.small).disconnected, "the small server sees the hang-up")
    assert seen.startswith("word0 word1")


def test_leaving_a_sync_stream_early_closes_the_server_stream(servers: ServerPair) -> None:
    model = chat_model(servers)
    servers.small.model = ScriptedModel.single(LONG)

    stream = cast(Generator[AIMessageChunk, None, None], model.stream("Count."))
    first = next(stream)
    stream.close()

    asyncio.run(wait_for(lambda: last(servers.small).disconnected,
                         "the small server sees the hang-up"))
    assert first.text == "word"
    model.close()
