"""Every fault of DESIGN.md injected through specthink.testing over real loopback HTTP.

Each test names the behaviour it proves; docs/reliability.md maps faults to these tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from specthink import SpeculativeThinker, TakeoverRules
from specthink.backends.tgi import TGIBackend
from specthink.errors import (
    BackendConnectionError,
    BackendTimeoutError,
    ConfigError,
    GenerationError,
    InStreamError,
    OverloadedError,
    PromptTooLongError,
    TargetFallbackWarning,
    UnhealthyError,
)
from specthink.testing.models import Continuation, Script, ScriptedModel, Tokenizer
from specthink.testing.server import Fault, LatencyModel, LoopbackServer
from specthink.trace import TextEvent

QUESTION = [{"role": "user", "content": "What is x?"}]
TARGET_FIX = ("Actually x is two because both terms are equal and their sum doubles one of them "
              "so we keep going with two here and more words follow")
FIX20 = "".join(Tokenizer().tokenize(TARGET_FIX)[:20])
SMALL = ScriptedModel([
    Script("", "Let x be 2.\n\nWait, x is 3.\n\nSo x is 3."),
    Script(FIX20, "\n\nSo the answer is 2."),
])
TARGET = ScriptedModel([Script("Let x be 2.\n\n", TARGET_FIX)])
EXPECTED = "Let x be 2.\n\n" + FIX20 + "\n\nSo the answer is 2."


@pytest.fixture
def servers() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    latency = LatencyModel(per_token=0.002)
    with LoopbackServer(SMALL, latency=latency) as small, \
            LoopbackServer(TARGET, latency=latency) as target:
        yield small, target


def thinker_for(small: LoopbackServer | str, target: LoopbackServer | str, **options: Any
                ) -> SpeculativeThinker:
    backend_options = {key: options.pop(key) for key in ("max_retries", "read_timeout",
                                                           "connect_timeout", "api_key")
                       if key in options}

    def backend(server: LoopbackServer | str) -> TGIBackend:
        url = server if isinstance(server, str) else server.url
        return TGIBackend(url, retry_backoff=0.01, **backend_options)

    return SpeculativeThinker(small=backend(small), target=backend(target),
                              small_template="chatml", target_template="chatml", **options)


@pytest.fixture
async def closing() -> AsyncIterator[list[SpeculativeThinker]]:
    thinkers: list[SpeculativeThinker] = []
    yield thinkers
    for thinker in thinkers:
        await thinker.aclose()


def unused_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---- overload -----------------------------------------------------------------------------

@pytest.mark.parametrize("status", [429, 503])
async def test_overload_is_retried_with_backoff(servers: Any, closing: list[Any],
                                                status: int) -> None:
    small, target = servers
    small.inject(Fault.status(status, times=2))
    closing.append(thinker := thinker_for(small, target, max_retries=2))

    result = await thinker.agenerate(QUESTION)

    assert result.text == EXPECTED
    assert result.stats.retries["small"] == 2
    assert [r.status for r in small.records[:3]] == [status, status, 200]


async def test_overload_beyond_max_retries_names_the_server_and_its_message(
        servers: Any, closing: list[Any]) -> None:
    small, target = servers
    small.inject(Fault.status(429, times=5))
    closing.append(thinker := thinker_for(small, target, max_retries=2))

    with pytest.raises(OverloadedError) as caught:
        await thinker.agenerate(QUESTION)

    error = caught.value
    assert error.role == "small" and error.url == small.url
    assert "overloaded" in str(error).lower() and small.url in str(error)
    assert len(small.records) == 3  # the first try and two retries, no more


async def test_retries_stop_at_the_deadline_even_with_retries_left(
        servers: Any, closing: list[Any]) -> None:
    small, target = servers
    small.inject(Fault.status(503, times=10, retry_after=0.3))
    closing.append(thinker := SpeculativeThinker(
        small=TGIBackend(small.url, max_retries=10, retry_deadline=0.5),
        target=TGIBackend(target.url), small_template="chatml", target_template="chatml"))

    with pytest.raises(UnhealthyError):
        await thinker.agenerate(QUESTION)

    # attempts at 0 s and 0.3 s; a third would start at 0.6 s, past the 0.5 s deadline
    assert len(small.records) == 2


async def test_retry_after_header_is_obeyed(servers: Any, closing: list[Any]) -> None:
    small, target = servers
    small.inject(Fault.status(503, times=1, retry_after=0.2))
    closing.append(thinker := thinker_for(small, target))

    result = await thinker.agenerate(QUESTION)

    first, second = small.records[:2]
    assert result.text == EXPECTED
    assert second.started - first.started >= 0.2


# ---- dropped streams ----------------------------------------------------------------------

@pytest.mark.parametrize("role", ["small", "target"])
async def test_dropped_stream_resumes_with_nothing_lost_or_repeated(
        servers: Any, closing: list[Any], role: str) -> None:
    small, target = servers
    (small if role == "small" else target).inject(Fault.drop(after_tokens=5))
    closing.append(thinker := thinker_for(small, target))

    result = await thinker.agenerate(QUESTION)

    assert result.text == EXPECTED
    assert result.stats.resumed_streams[role] == 1
    assert result.stats.target_tokens == 20


async def test_stream_dropping_every_time_gives_up_after_the_resume_limit(
        servers: Any, closing: list[Any]) -> None:
    small, target = servers
    small.inject(Fault.drop(after_tokens=2, times=10))
    closing.append(thinker := SpeculativeThinker(
        small=TGIBackend(small.url, retry_backoff=0.01), target=TGIBackend(target.url),
        small_template="chatml", target_template="chatml", max_stream_resumes=2))

    with pytest.raises(BackendConnectionError):
        await thinker.agenerate(QUESTION)
    assert len(small.records) == 3


# ---- errors inside a 200 stream -----------------------------------------------------------

async def test_error_event_inside_a_stream_carries_tgi_error_type(
        servers: Any, closing: list[Any]) -> None:
    small, target = servers
    small.inject(Fault.error_event(after_tokens=3, error_type="generation"))
    closing.append(thinker := thinker_for(small, target))

    with pytest.raises(InStreamError) as caught:
        await thinker.agenerate(QUESTION)

    assert caught.value.error_type == "generation"
    assert caught.value.role == "small"
    assert len(small.records) == 1  # a generation error is not retried


async def test_overloaded_error_event_before_the_first_token_is_retried(
        servers: Any, closing: list[Any]) -> None:
    small, target = servers
    small.inject(Fault.error_event(after_tokens=0, error_type="overloaded"))
    closing.append(thinker := thinker_for(small, target))

    result = await thinker.agenerate(QUESTION)

    assert result.text == EXPECTED
    assert result.stats.retries["small"] == 1


async def test_generation_error_status_is_not_retried(servers: Any, closing: list[Any]) -> None:
    small, target = servers
    small.inject(Fault.status(424))
    closing.append(thinker := thinker_for(small, target))
    with pytest.raises(GenerationError):
        await thinker.agenerate(QUESTION)
    assert len(small.records) == 1


# ---- a server down --------------------------------------------------------------------------

async def test_target_down_falls_back_and_says_so(servers: Any, closing: list[Any]) -> None:
    small, _ = servers
    closing.append(thinker := thinker_for(small, unused_url(), max_retries=1))

    with pytest.warns(TargetFallbackWarning, match="small model continues alone"):
        result = await thinker.agenerate(QUESTION)

    assert result.stats.fallback
    assert result.stats.fallback_error and "target server" in result.stats.fallback_error
    assert result.text == "Let x be 2.\n\nWait, x is 3.\n\nSo x is 3."  # the small model alone


async def test_target_down_raises_with_the_raise_policy(servers: Any, closing: list[Any]) -> None:
    small, _ = servers
    closing.append(thinker := thinker_for(small, unused_url(), max_retries=0,
                                          on_target_error="raise"))
    with pytest.raises(BackendConnectionError) as caught:
        await thinker.agenerate(QUESTION)
    assert caught.value.role == "target"


async def test_target_unhealthy_mid_conversation_falls_back(servers: Any,
                                                           closing: list[Any]) -> None:
    small, target = servers
    target.inject(Fault.status(503, times=5))
    closing.append(thinker := thinker_for(small, target, max_retries=1))
    with pytest.warns(TargetFallbackWarning):
        result = await thinker.agenerate(QUESTION)
    assert result.stats.fallback
    assert "unhealthy" in (result.stats.fallback_error or "")


async def test_small_down_is_a_clear_error_before_any_text(servers: Any,
                                                          closing: list[Any]) -> None:
    _, target = servers
    url = unused_url()
    closing.append(thinker := thinker_for(url, target, max_retries=1))
    events: list[Any] = []
    with pytest.raises(BackendConnectionError) as caught:
        async with asyncio.timeout(10):  # no hang
            async for event in thinker.astream(QUESTION):
                events.append(event)
    assert events == []
    assert caught.value.role == "small" and url in str(caught.value)


# ---- stalls and long streams ----------------------------------------------------------------

async def test_a_stall_ends_with_a_read_timeout(servers: Any, closing: list[Any]) -> None:
    small, target = servers
    small.inject(Fault.stall(after_tokens=2, seconds=3.0))
    closing.append(thinker := thinker_for(small, target, read_timeout=0.3, max_retries=0))
    with pytest.raises(BackendTimeoutError) as caught:
        await thinker.agenerate(QUESTION)
    assert caught.value.role == "small"


async def test_a_long_healthy_stream_is_never_cut(closing: list[Any]) -> None:
    long_text = " word" * 400  # 400 tokens at 2 ms: far longer than the read timeout
    with LoopbackServer(ScriptedModel.single(long_text),
                        latency=LatencyModel(per_token=0.002)) as small, \
            LoopbackServer(ScriptedModel.single("unused")) as target:
        closing.append(thinker := thinker_for(small, target, read_timeout=0.25))
        result = await thinker.agenerate(QUESTION)
    assert result.text == long_text
    assert result.stats.finish_reason == "stop"


# ---- cancellation ---------------------------------------------------------------------------

async def _wait_for(predicate: Any, seconds: float = 5.0) -> None:
    """Poll the server's records (they change on the server's thread, so no event to await)."""
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


class AlwaysWrites:
    """A model that writes ``text`` wherever it is asked to continue."""

    def __init__(self, text: str) -> None:
        self.text = text

    def continuation(self, prompt: str) -> Continuation:
        return Continuation(self.text, eos=False)


@pytest.mark.parametrize("while_writing", ["small", "target"])
async def test_cancelling_closes_the_open_server_stream(closing: list[Any],
                                                        while_writing: str) -> None:
    slow = LatencyModel(per_token=0.02)
    small_model = ScriptedModel.single("x is 2.\n\nWait," + " more" * 200)
    with LoopbackServer(small_model, latency=slow) as small, \
            LoopbackServer(AlwaysWrites(" fine" * 200), latency=slow) as target:
        closing.append(thinker := thinker_for(small, target))
        task = asyncio.create_task(thinker.agenerate(QUESTION))
        server = small if while_writing == "small" else target
        await _wait_for(lambda: any(r.tokens_sent > 2 for r in server.records))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_for(lambda: all(r.finished is not None for r in server.records))
        assert server.records[-1].disconnected
        assert server.records[-1].finish_reason is None
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []


async def test_leaving_astream_closes_the_server_stream(closing: list[Any]) -> None:
    with LoopbackServer(ScriptedModel.single(" word" * 300),
                        latency=LatencyModel(per_token=0.01)) as small, \
            LoopbackServer(ScriptedModel.single("unused")) as target:
        closing.append(thinker := thinker_for(small, target))
        stream = thinker.astream(QUESTION)
        async for event in stream:
            if isinstance(event, TextEvent):
                break
        await stream.aclose()  # type: ignore[attr-defined]
        await _wait_for(lambda: small.records[0].finished is not None)
        assert small.records[0].disconnected


# ---- load -----------------------------------------------------------------------------------

async def test_256_concurrent_conversations_each_equal_their_solo_run(
        closing: list[Any]) -> None:
    # No latency model: the servers share this process's GIL with the client, so throttling
    # 256 streams token by token would measure the test rig, not the engine.
    with LoopbackServer(SMALL) as small, LoopbackServer(TARGET) as target:
        # 512 connections opening at once on a shared 2-core machine: be patient connecting
        closing.append(thinker := thinker_for(small, target, connect_timeout=60.0))
        questions = [[{"role": "user", "content": f"What is x? ({i})"}] for i in range(256)]
        solo = await thinker.agenerate(questions[0])

        results = await asyncio.gather(*(thinker.agenerate(q) for q in questions))

    assert solo.text == EXPECTED
    assert all(r.text == solo.text for r in results)
    assert all(r.stats.takeovers == solo.stats.takeovers for r in results)


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize(("messages", "params", "error"), [
    ([], {}, "at least one message"),
    ([{"role": "wizard", "content": "hi"}], {}, "role"),
    (QUESTION, {"max_new_tokens": 0}, "max_new_tokens"),
    (QUESTION, {"max_new_tokens": -3}, "max_new_tokens"),
    (QUESTION, {"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ([{"role": "user", "content": "many words here " * 2000}], {}, "max_input_tokens"),
])
async def test_bad_input_is_refused_before_any_request(
        servers: Any, closing: list[Any], messages: Any, params: dict[str, Any],
        error: str) -> None:
    small, target = servers
    closing.append(thinker := thinker_for(small, target))
    with pytest.raises(ConfigError, match=error):
        await thinker.agenerate(messages, **params)
    assert small.records == [] and target.records == []


async def test_prompt_too_long_is_its_own_error(servers: Any, closing: list[Any]) -> None:
    small, target = servers
    closing.append(thinker := thinker_for(small, target))
    with pytest.raises(PromptTooLongError, match="max_input_tokens=4096"):
        await thinker.agenerate([{"role": "user", "content": "word " * 5000}])


@pytest.mark.parametrize("url", ["ftp://host:1", "localhost:8080", "", "http://"])
def test_non_http_url_is_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        TGIBackend(url)


def test_invalid_rule_numbers_are_refused() -> None:
    with pytest.raises(ValueError, match="n1"):
        TakeoverRules.paper(n1=0)
    with pytest.raises(ValueError, match="threshold_max"):
        TakeoverRules.paper(threshold_max=3)


# ---- secrets --------------------------------------------------------------------------------

async def test_api_key_never_appears_in_repr_logs_traces_or_errors(
        servers: Any, closing: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-very-secret-0123456789"
    small, target = servers
    small.inject(Fault.status(429, times=2))  # both attempts of the first call fail
    closing.append(thinker := thinker_for(small, target, api_key=secret, max_retries=1))
    caplog.set_level(logging.DEBUG)

    with pytest.raises(OverloadedError) as caught:
        await thinker.agenerate(QUESTION)
    result = await thinker.agenerate(QUESTION)

    import json
    seen = [repr(thinker), repr(thinker.small), str(caught.value), repr(caught.value),
            json.dumps(result.to_dict()), caplog.text]
    assert all(secret not in text for text in seen)
    assert result.text == EXPECTED
