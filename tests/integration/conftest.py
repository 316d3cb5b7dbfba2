"""The ``scale_out`` fixture: replica pools and routers (see ``scale_support``), stopped when
the test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from benchmarks.traces import SmallTraceModel, TargetTraceModel
from specthink.testing import LatencyModel, LoopbackServer
from specthink.testing.routers import Router, RouterKind, unavailable_reason

from .scale_support import REPLICAS, TRACE, ScaleOut


@pytest.fixture
def scale_out() -> Iterator[Callable[..., ScaleOut]]:
    """``scale_out(kind, small_latency=..., target_latency=..., **router_options)``: pools and
    routers, all stopped when the test ends (routers by pid, servers by handle)."""
    started: list[ScaleOut] = []

    def start(kind: RouterKind, *, small_latency: LatencyModel | None = None,
              target_latency: LatencyModel | None = None, **router_options: Any) -> ScaleOut:
        reason = unavailable_reason(kind)
        if reason is not None:
            pytest.skip(reason)
        small = [LoopbackServer(SmallTraceModel(TRACE), model_id="scale/small",
                                latency=small_latency).start() for _ in range(REPLICAS)]
        target = [LoopbackServer(TargetTraceModel(TRACE), model_id="scale/target",
                                 latency=target_latency).start() for _ in range(REPLICAS)]
        setup = ScaleOut(kind, small, target, {})
        started.append(setup)
        for role in ("small", "target"):
            router = Router(kind, [s.url for s in setup.pool(role)],
                            **{"health_check_interval": 1, **router_options})
            setup.routers[role] = router
            router.start()
        return setup

    yield start
    for setup in started:
        for router in setup.routers.values():
            router.stop()
        for server in (*setup.small, *setup.target):
            server.stop()

