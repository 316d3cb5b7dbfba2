"""A caller that stops reading, or is cancelled, stops the generation on both servers.

TGI cancels a generation when its client hangs up; the loopback servers record whether the
client disconnected before the answer was complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import cast

import pytest
from langchain_core.messages import AIMessageChunk

from specthink.testing import LoopbackServer
from specthink.testing.models import ScriptedModel
from specthink_lc import ChatSpeculativeThinking
from tests.support import LONG, ServerPair, last, reflecting_servers, streaming, wait_for


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
    """``tests.support.reflecting_servers``: the target takes over and writes slowly."""
    with reflecting_servers() as pair:
        yield pair


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
