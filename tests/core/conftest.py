"""A model pair over either transport: in-process, or TGI over real loopback HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from specthink import SpeculativeThinker
from specthink.testing.inprocess import ScriptedBackend
from specthink.testing.models import TextModel, Tokenizer


@dataclass
class Pair:
    """A thinker plus a view of what each server saw, whatever the transport."""

    thinker: SpeculativeThinker
    transport: str
    servers: dict[str, Any] = field(default_factory=dict)

    def closed_early(self, role: str) -> list[bool]:
        """Per request to ``role``: did the client leave before the stream ended?"""
        if self.transport == "inprocess":
            backend = self.thinker.small if role == "small" else self.thinker.target
            assert isinstance(backend, ScriptedBackend)
            return [r.closed_early for r in backend.requests]
        return [r.disconnected for r in self.servers[role].records]

    def agenerate(self, *args: Any, **kwargs: Any) -> Any:
        return self.thinker.agenerate(*args, **kwargs)

    def astream(self, *args: Any, **kwargs: Any) -> Any:
        return self.thinker.astream(*args, **kwargs)

    def drop_small_after(self, tokens: int) -> None:
        """Break the small model's next stream after ``tokens`` tokens."""
        if self.transport == "inprocess":
            assert isinstance(self.thinker.small, ScriptedBackend)
            self.thinker.small.drop_after(tokens)
        else:
            from specthink.testing.server import Fault

            self.servers["small"].inject(Fault.drop(after_tokens=tokens))

    def prompts(self, role: str) -> list[str]:
        if self.transport == "inprocess":
            backend = self.thinker.small if role == "small" else self.thinker.target
            assert isinstance(backend, ScriptedBackend)
            return [r.prompt for r in backend.requests]
        return [r.prompt for r in self.servers[role].records]


PairFactory = Callable[..., Pair]


@pytest.fixture(params=["inprocess", "tgi"])
async def make_pair(request: pytest.FixtureRequest) -> AsyncIterator[PairFactory]:
    """``make_pair(small_model, target_model, tokenizer=None, **thinker_options)``.

    Over TGI each generated token takes a few milliseconds, so that a stream the engine leaves
    early is still running on the server (as on a real GPU) and its disconnect is recorded.
    """
    transport: str = request.param
    started: list[Any] = []
    thinkers: list[SpeculativeThinker] = []

    def factory(small: TextModel, target: TextModel, *, tokenizer: Tokenizer | None = None,
                **options: Any) -> Pair:
        if transport == "inprocess":
            thinker = SpeculativeThinker(
                small=ScriptedBackend(small, tokenizer=tokenizer, url="inprocess://small"),
                target=ScriptedBackend(target, tokenizer=tokenizer, url="inprocess://target"),
                small_template="chatml", target_template="chatml", **options)
            return Pair(thinker, transport)
        from specthink.backends.tgi import TGIBackend
        from specthink.testing.server import LatencyModel, LoopbackServer

        latency = LatencyModel(per_token=0.003)
        servers = {"small": LoopbackServer(small, tokenizer=tokenizer, latency=latency).start(),
                   "target": LoopbackServer(target, tokenizer=tokenizer, latency=latency).start()}
        started.extend(servers.values())
        thinker = SpeculativeThinker(
            small=TGIBackend(servers["small"].url, retry_backoff=0.01),
            target=TGIBackend(servers["target"].url, retry_backoff=0.01),
            small_template="chatml", target_template="chatml", **options)
        thinkers.append(thinker)
        return Pair(thinker, transport, servers)

    yield factory
    for thinker in thinkers:
        await thinker.aclose()
    for server in started:
        server.stop()
