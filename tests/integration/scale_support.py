"""Replica pools behind real routers, on loopback: three loopback servers per role playing the
benchmark's reasoning traces, one router per role in front of them (``smg`` or
``vllm-router``, child processes stopped by their pids). The fixture is in ``conftest.py``."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

from benchmarks.traces import TraceSpec, conversation_of
from specthink import SpeculativeThinker
from specthink.backends import OpenAICompletionsBackend, TGIBackend
from specthink.backends.base import Backend
from specthink.testing import LoopbackServer, RequestRecord
from specthink.testing.routers import Router, RouterKind

Protocol = Literal["openai", "tgi"]
Role = Literal["small", "target"]
REPLICAS = 3
TRACE = TraceSpec(seed=7, paragraphs=10)
"""~450 small tokens and a few handoffs per conversation: several requests per role."""


@dataclass
class ScaleOut:
    """One router per role in front of ``REPLICAS`` loopback servers each."""

    kind: RouterKind
    small: list[LoopbackServer]
    target: list[LoopbackServer]
    routers: dict[Role, Router]

    def pool(self, role: Role) -> list[LoopbackServer]:
        return self.small if role == "small" else self.target

    def thinker(self, protocol: Protocol, **options: Any) -> SpeculativeThinker:
        """The engine with both backends pointed at the routers (close it: ``aclosing``)."""

        def backend(role: Role) -> Backend:
            url = self.routers[role].url
            if protocol == "tgi":
                return TGIBackend(url, **options)
            return OpenAICompletionsBackend(url, **options)

        thinker = SpeculativeThinker(backend("small"), backend("target"), rules="paper",
                                     small_template="deepseek-r1",
                                     target_template="deepseek-r1")
        return thinker

    def records(self, role: Role) -> dict[int, list[tuple[int, RequestRecord]]]:
        """Per conversation: (replica index, record) of every generation request, in order of
        arrival."""
        out: dict[int, list[tuple[int, RequestRecord]]] = defaultdict(list)
        for index, server in enumerate(self.pool(role)):
            for record in server.records:
                out[conversation_of(record.prompt)].append((index, record))
        for entries in out.values():
            entries.sort(key=lambda entry: entry[1].started)
        return out

    def replicas_of(self, role: Role, conversation: int) -> set[int]:
        return {index for index, _ in self.records(role).get(conversation, [])}

    def reset(self) -> None:
        for server in (*self.small, *self.target):
            server.reset()

