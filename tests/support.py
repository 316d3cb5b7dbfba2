"""Helpers shared by more than one test package (import them as ``tests.support``): the pair of
loopback servers, a scenario in which the target takes over and writes a long, slow answer (for
hang-up and cancellation tests), bounded waiting, and streaming a backend's answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from specthink.backends import SamplingParams, StreamToken
from specthink.backends.base import Backend
from specthink.testing import LatencyModel, LoopbackServer, RequestRecord
from specthink.testing.models import Script, ScriptedModel


@dataclass(frozen=True)
class ServerPair:
    small: LoopbackServer
    target: LoopbackServer


SLOW = LatencyModel(per_token=0.02)
LONG = " ".join(f"word{n}" for n in range(400))
REFLECTING = "Let x be 2.\n\nWait, x is 3.\n\n" + LONG


@contextmanager
def reflecting_servers() -> Iterator[ServerPair]:
    """The small model reflects after a blank line, so the target takes over and writes a long
    text; the small model alone, without a blank line, writes a long text too. Both answer
    slowly enough to be interrupted."""
    small = ScriptedModel([Script("", REFLECTING)])
    target = ScriptedModel([Script("Let x be 2.\n\n", LONG)])
    with LoopbackServer(small, latency=SLOW, model_id="test/small") as small_server, \
            LoopbackServer(target, latency=SLOW, model_id="test/target") as target_server:
        yield ServerPair(small_server, target_server)


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` for up to about ten seconds; an ``AssertionError`` names ``what``."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


def streaming(server: LoopbackServer) -> bool:
    """``server`` is in the middle of an answer (two tokens sent, not finished)."""
    return any(r.tokens_sent >= 2 and r.finished is None for r in server.records)


def last(server: LoopbackServer) -> RequestRecord:
    return server.records[-1]


async def stream_tokens(backend: Backend, prompt: str, *, max_new_tokens: int,
                        **options: Any) -> list[StreamToken]:
    """Every token of one greedy stream, then ``backend`` closed (also when the stream
    raises)."""
    try:
        async with backend.stream(prompt, max_new_tokens=max_new_tokens,
                                  sampling=SamplingParams(), **options) as tokens:
            return [token async for token in tokens]
    finally:
        await backend.aclose()
