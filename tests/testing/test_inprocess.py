"""The in-process backend keeps what the engine sent, as the loopback server's records do."""

from __future__ import annotations

from specthink.backends import Backend, SamplingParams
from specthink.testing import EchoModel
from specthink.testing.inprocess import ScriptedBackend


async def test_the_routing_key_of_each_stream_is_recorded() -> None:
    """Broken: engine tests cannot see which routing key a request carried."""
    backend = ScriptedBackend(EchoModel())
    assert isinstance(backend, Backend)
    for key in ("conv-1", None):
        async with backend.stream("Hello", max_new_tokens=4, sampling=SamplingParams(),
                                  routing_key=key) as tokens:
            _ = [token async for token in tokens]
    assert [request.routing_key for request in backend.requests] == ["conv-1", None]


async def test_info_counts_its_calls_and_accepts_refresh() -> None:
    """Broken: tests of the engine's /info refresh-and-retry cannot count the refreshes."""
    backend = ScriptedBackend(EchoModel(), max_total_tokens=10)
    await backend.info()
    backend.max_total_tokens = 20
    assert (await backend.info(refresh=True)).max_total_tokens == 20
    assert backend.info_calls == 2
