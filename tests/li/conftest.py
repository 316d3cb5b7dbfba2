"""Fixtures of the LlamaIndex adapter tests: they contain two resource leaks of LlamaIndex itself
so that they cannot surface, as ResourceWarnings at a random garbage collection, in some
unrelated test."""

from __future__ import annotations

import asyncio
import gc
import inspect
import warnings
from collections.abc import Iterator

import pytest

from .li_support import AIOSQLITE_LEAK


@pytest.fixture(autouse=True, scope="module")
def _collect_memory_leaks() -> Iterator[None]:
    yield
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=AIOSQLITE_LEAK, category=ResourceWarning)
        gc.collect()


@pytest.fixture(autouse=True)
def _close_loops_left_by_llamaindex(request: pytest.FixtureRequest) -> Iterator[None]:
    """LlamaIndex's sync entry points (``query``, ``chat``) run coroutines with
    ``asyncio.get_event_loop().run_until_complete``, which leaves a new, never-closed loop set on
    the main thread. Close it after a sync test (an async test's loop is pytest-asyncio's)."""
    yield
    if inspect.iscoroutinefunction(getattr(request.node, "obj", None)):
        return
    policy = asyncio.get_event_loop_policy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loop = policy.get_event_loop()
    except RuntimeError:  # no loop was left behind
        return
    if not loop.is_running() and not loop.is_closed():
        loop.close()
    policy.set_event_loop(None)
