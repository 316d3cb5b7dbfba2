"""``GenerateClient``: TGI's non-streamed ``/generate`` (the benchmark's authors' loop
drives it), with stop strings, retries counted and the routing key sent."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.generate import GenerateClient
from specthink.backends import SamplingParams
from specthink.testing import LoopbackServer, ScriptedModel
from specthink.testing.server import Fault

Start = Callable[..., LoopbackServer]
PROMPT = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


async def test_generate_stops_at_a_stop_string_and_keeps_it(loopback_server: Start) -> None:
    """Broken: the stop strings are not sent, or the answer's tokens are misread."""
    server = loopback_server(ScriptedModel.single("One step.\n\nTwo steps."))
    backend = GenerateClient(server.url)
    try:
        answer = await backend.generate(PROMPT, max_new_tokens=64, sampling=SamplingParams(),
                                        stop=["\n\n"])
    finally:
        await backend.aclose()
    assert answer.text == "One step.\n\n"
    assert answer.finish_reason == "stop"
    assert server.records[0].parameters["stop"] == ["\n\n"]


async def test_generate_is_retried_and_each_attempt_reported(loopback_server: Start) -> None:
    """Broken: a 503 fails the call at once, or the caller cannot count the attempts, or the
    retried request loses its routing key."""
    server = loopback_server(ScriptedModel.single("Done."))
    server.inject(Fault.status(503))
    attempts: list[int] = []
    backend = GenerateClient(server.url, initial_backoff=0.0)
    try:
        answer = await backend.generate(PROMPT, max_new_tokens=8, sampling=SamplingParams(),
                                        on_attempt=attempts.append, routing_key="conv-9")
    finally:
        await backend.aclose()
    assert answer.text == "Done."
    assert answer.finish_reason == "eos"
    assert attempts == [1, 2]
    assert [r.headers.get("x-session-id") for r in server.records] == ["conv-9", "conv-9"]
