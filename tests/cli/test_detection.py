"""``specthink ask`` / ``servers check`` with ``--backend auto``: the protocol is asked of the
server without blocking the event loop."""

from __future__ import annotations

import asyncio

import pytest

from specthink.backends import TGIBackend
from specthink.cli import _backend
from specthink.testing import EchoModel, LoopbackServer


async def test_detection_leaves_the_event_loop_running(silent_server: str) -> None:
    """Broken: detection is a blocking ``httpx.get`` inside the async command, so nothing else
    (the other server's detection, a progress display) runs until it returns."""
    detecting = asyncio.ensure_future(_backend(silent_server, "auto", api_key=None,
                                               model=None, role="small"))
    for _ in range(5):
        await asyncio.sleep(0.01)
    assert not detecting.done()
    detecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await detecting


async def test_detection_finds_tgi() -> None:
    """Broken: ``auto`` takes a TGI server for an OpenAI one."""
    with LoopbackServer(EchoModel()) as server:
        backend = await _backend(server.url, "auto", api_key=None, model=None)
        await backend.aclose()
    assert isinstance(backend, TGIBackend)
