"""The single sync edge (``specthink.sync``): a sync stream applies back-pressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from specthink import SpeculativeThinker
from specthink.sync import STREAM_BUFFER, _LoopThread, run_sync
from specthink.testing.inprocess import ScriptedBackend
from specthink.testing.models import ScriptedModel


def let_the_loop_run(rounds: int) -> None:
    """Give the private loop ``rounds`` turns (each call below takes at least one)."""
    for _ in range(rounds):
        run_sync(asyncio.sleep(0))


def test_a_slow_sync_reader_holds_the_producer_back() -> None:
    """Fails when the queue between the loop and the reading thread is unbounded: the producer
    then runs to the end of the stream while the reader still holds the first item."""
    produced = 0

    async def numbers() -> AsyncIterator[int]:
        nonlocal produced
        for number in range(1000):
            produced += 1
            yield number

    items = _LoopThread.get().iterate(numbers(), buffer=8)
    assert next(items) == 0
    let_the_loop_run(50)
    # 8 waiting in the queue, one released by the read, one waiting for a slot
    assert produced <= 8 + 2
    assert list(items) == list(range(1, 1000))


def test_sync_stream_of_a_long_answer_waits_for_its_reader() -> None:
    """Fails when ``SpeculativeThinker.stream`` buffers the whole answer ahead of its reader
    (memory grows with the answer, and the generation is not slowed by a slow consumer)."""
    small = ScriptedBackend(ScriptedModel.single(" word" * 2000))
    thinker = SpeculativeThinker(small=small, target=ScriptedBackend(ScriptedModel.single("y")),
                                 small_template="chatml", target_template="chatml")
    events = thinker.stream([{"role": "user", "content": "Go on."}])
    first = next(events)
    let_the_loop_run(300)  # the scripted server sends a token per loop turn
    assert small.requests[0].tokens_sent <= STREAM_BUFFER + 3
    text = "".join(getattr(event, "text", "") for event in (first, *events))
    assert text == " word" * 2000
