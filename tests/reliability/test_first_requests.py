"""What a conversation asks the servers before its first generation request (issue "First token
fast under a burst"), and the length limits refreshed when a server changed them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from specthink import SpeculativeThinker
from specthink.backends.base import SamplingParams
from specthink.backends.tgi import TGIBackend
from specthink.errors import BackendError, TargetFallbackWarning
from specthink.prompts import AutoTemplate
from specthink.testing.models import Script, ScriptedModel
from specthink.testing.server import LoopbackServer
from specthink.trace import FinishEvent, TextEvent

QUESTION = [{"role": "user", "content": "What is x?"}]
SMALL = ScriptedModel([Script("", "Let x be 2.\n\nWait, x is 3.\n\nSo x is 3.")])
TARGET = ScriptedModel([Script("", "Actually x is two, since both terms are equal.")])
GENERATION = "/generate_stream"


@pytest.fixture
def pair() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    with LoopbackServer(SMALL, model_id="Qwen/Qwen2.5-1.5B-Instruct") as small, \
            LoopbackServer(TARGET, model_id="Qwen/Qwen2.5-32B-Instruct") as target:
        yield small, target


def before_first_generation(server: LoopbackServer, since: int = 0) -> list[str]:
    paths = []
    for call in server.calls[since:]:
        if call.path == GENERATION:
            break
        paths.append(call.path)
    return paths


async def test_a_conversation_asks_nothing_once_the_servers_template_is_learnt(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """The first call renders its own conversation and the two probes side by side and fetches
    /info; the server's ChatML is then learnt, so a later call's first request is its
    generation (broken: each call paid a render round trip, or four requests, before its
    first token)."""
    small, target = pair
    thinker = SpeculativeThinker(small=TGIBackend(small.url), target=TGIBackend(target.url))
    try:
        await thinker.agenerate(QUESTION)
        assert sorted(before_first_generation(small)) == ["/chat_tokenize"] * 3 + ["/info"]
        mark = len(small.calls)
        await thinker.agenerate(QUESTION)
        assert before_first_generation(small, mark) == []
        assert [call.path for call in target.calls[mark:]].count("/chat_tokenize") == 0
    finally:
        await thinker.aclose()


async def test_a_cold_burst_renders_once_per_server_and_learns_once(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """64 calls at once on a freshly built thinker: one of them renders its conversation on
    each server beside the two probes, the other 63 wait for that learning and render
    client-side, and all of them answer alike (broken: a /chat_tokenize per call and role,
    a cold burst's first text paying a render round trip each)."""
    small, target = pair
    thinker = SpeculativeThinker(small=TGIBackend(small.url), target=TGIBackend(target.url))
    try:
        results = await asyncio.gather(*(thinker.agenerate(QUESTION) for _ in range(64)))
    finally:
        await thinker.aclose()
    assert len({result.text for result in results}) == 1
    assert all(result.stats.takeovers for result in results)  # the target rendered too
    for server in (small, target):
        assert len(server.calls_to("/chat_tokenize")) == 1 + 2
    assert len(small.calls_to(GENERATION)) >= 64


async def test_a_template_rendered_on_the_server_costs_one_request_per_conversation(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """With learning off (as for a server template no built-in reproduces), a later call asks
    for its prompt once and then generates: no /info, no render probe, nothing of the
    target's."""
    small, target = pair
    thinker = SpeculativeThinker(small=TGIBackend(small.url), target=TGIBackend(target.url),
                                 small_template=AutoTemplate("small", learn=False),
                                 target_template=AutoTemplate("target", learn=False))
    try:
        await thinker.agenerate(QUESTION)
        assert before_first_generation(small) == ["/chat_tokenize", "/info"]
        mark = len(small.calls)
        await thinker.agenerate(QUESTION)
        assert before_first_generation(small, mark) == ["/chat_tokenize"]
    finally:
        await thinker.aclose()


async def test_a_template_known_client_side_needs_no_request_at_all(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """With the template given, the generation request is the conversation's first."""
    small, target = pair
    thinker = SpeculativeThinker(small=TGIBackend(small.url), target=TGIBackend(target.url),
                                 small_template="chatml", target_template="chatml")
    try:
        await thinker.agenerate(QUESTION)
        mark = len(small.calls)
        await thinker.agenerate(QUESTION)
        assert before_first_generation(small, mark) == []
    finally:
        await thinker.aclose()


async def test_info_is_fetched_once_per_backend_across_many_conversations(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """32 conversations at once share one /info per server (broken: one per conversation)."""
    small, target = pair
    thinker = SpeculativeThinker(small=TGIBackend(small.url), target=TGIBackend(target.url))
    try:
        results = await asyncio.gather(*(thinker.agenerate(QUESTION) for _ in range(32)))
    finally:
        await thinker.aclose()
    assert len({r.text for r in results}) == 1
    assert len(small.calls_to("/info")) == 1
    assert len(target.calls_to("/info")) == 1


async def test_the_targets_preparation_never_delays_the_small_models_first_request(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """The target's render waits until the small server has a generation request: if the
    engine waited for the target before asking the small model, this would never finish."""
    small, target = pair

    class HeldTarget(TGIBackend):
        async def render_chat(self, messages: Sequence[dict[str, Any]],
                              tools: Sequence[dict[str, Any]] | None = None, *,
                              tool_choice: str | dict[str, Any] | None = None) -> str | None:
            if held:
                while len(small.records) <= seen:  # noqa: ASYNC110 - another thread's records
                    await asyncio.sleep(0.005)
            return await super().render_chat(messages, tools, tool_choice=tool_choice)

    held = False
    seen = 0
    thinker = SpeculativeThinker(small=TGIBackend(small.url), target=HeldTarget(target.url),
                                 target_template=AutoTemplate("target", learn=False))
    try:
        first = await thinker.agenerate(QUESTION)  # checks the target's template once
        held, seen = True, len(small.records)
        again = await asyncio.wait_for(thinker.agenerate(QUESTION), timeout=30)
    finally:
        await thinker.aclose()
    assert again.text == first.text
    assert again.stats.takeovers["rule1"] == 1


async def test_a_limit_lowered_on_the_server_refreshes_info_and_retries_once(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """The server restarted with a smaller max_total_tokens: the cached /info is stale, the
    first request gets a length error, the engine refreshes /info and asks again with room
    that fits (broken: the call failed, or every later call did)."""
    small, target = pair
    thinker = SpeculativeThinker(small=TGIBackend(small.url), target=TGIBackend(target.url),
                                 small_template="chatml", target_template="chatml")
    try:
        await thinker.agenerate(QUESTION, max_new_tokens=300)
        prompt_tokens = small.records[0].prompt_tokens
        small.max_total_tokens = prompt_tokens + 120
        mark = len(small.records)
        result = await thinker.agenerate(QUESTION, max_new_tokens=300)
    finally:
        await thinker.aclose()
    refused, retried = small.records[mark:mark + 2]
    assert refused.status == 422 or refused.error_type == "validation"
    assert refused.parameters["max_new_tokens"] > retried.parameters["max_new_tokens"]
    assert retried.prompt_tokens + retried.max_new_tokens <= small.max_total_tokens
    assert len(small.calls_to("/info")) == 2
    assert result.text.startswith("Let x be 2.")


async def test_the_targets_render_starts_after_the_small_models_request_is_built(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """After the first call, the small model's generation request is built and handed to its
    connection before the target's render begins (broken: the target's render went out first,
    one more request and its client CPU ahead of every conversation's first token under a
    burst)."""
    small, target = pair
    order: list[str] = []

    class Small(TGIBackend):
        async def _stream_request(self, prompt: str, max_new_tokens: int,
                                  sampling: SamplingParams) -> tuple[str, dict[str, Any]]:
            request = await super()._stream_request(prompt, max_new_tokens, sampling)
            order.append("small generation")
            return request

    class Target(TGIBackend):
        async def render_chat(self, messages: Sequence[dict[str, Any]],
                              tools: Sequence[dict[str, Any]] | None = None, *,
                              tool_choice: str | dict[str, Any] | None = None) -> str | None:
            order.append("target render")
            return await super().render_chat(messages, tools, tool_choice=tool_choice)

    thinker = SpeculativeThinker(small=Small(small.url), target=Target(target.url),
                                 target_template=AutoTemplate("target", learn=False))
    try:
        await thinker.agenerate(QUESTION)  # the first call checks the target before starting
        order.clear()
        result = await thinker.agenerate(QUESTION)
    finally:
        await thinker.aclose()
    assert order[:2] == ["small generation", "target render"]
    assert result.stats.takeovers["rule1"] == 1


async def test_warm_up_asks_beforehand_what_the_first_call_would_ask(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """After ``warm_up`` (what ``specthink serve`` does at start) even the first call's first
    request is its generation, on both servers (broken: the first user paid the /info, render
    and probe round trips, and the target's check)."""
    small, target = pair
    thinker = SpeculativeThinker(small=TGIBackend(small.url), target=TGIBackend(target.url))
    try:
        await thinker.warm_up()
        assert small.records == [] and target.records == []
        marks = len(small.calls), len(target.calls)
        result = await thinker.agenerate(QUESTION)
    finally:
        await thinker.aclose()
    assert before_first_generation(small, marks[0]) == []
    assert before_first_generation(target, marks[1]) == []
    assert result.stats.takeovers["rule1"] == 1
    assert len(small.calls_to("/info")) == len(target.calls_to("/info")) == 1


async def test_warm_up_names_the_server_that_cannot_answer_and_the_call_still_runs(
        pair: tuple[LoopbackServer, LoopbackServer], unused_tcp_port: int) -> None:
    """A target down at start: ``warm_up`` raises its ``BackendError`` (role "target"), and a
    later call checks again and goes on without it, as on any call."""
    small, _ = pair
    down = f"http://127.0.0.1:{unused_tcp_port}"
    thinker = SpeculativeThinker(small=TGIBackend(small.url),
                                 target=TGIBackend(down, max_retries=0))
    try:
        with pytest.raises(BackendError) as caught:
            await thinker.warm_up()
        assert caught.value.role == "target"
        with pytest.warns(TargetFallbackWarning):
            result = await thinker.agenerate(QUESTION)
    finally:
        await thinker.aclose()
    assert result.stats.fallback
    assert result.text.startswith("Let x be 2.")


async def test_the_targets_preparation_starts_after_the_first_text_reached_the_caller(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """When the caller holds the first text, the target has not been asked to render yet; the
    takeover still happens (broken: under a burst every conversation's target render ran
    ahead of the small models' first tokens, or the takeover lost the target's prompt)."""
    small, target = pair
    thinker = SpeculativeThinker(small=TGIBackend(small.url), target=TGIBackend(target.url),
                                 target_template=AutoTemplate("target", learn=False))
    try:
        await thinker.agenerate(QUESTION)  # checks the target's template once
        mark = len(target.calls_to("/chat_tokenize"))
        renders_at_first_text = None
        events = thinker.astream(QUESTION)
        async for event in events:
            if renders_at_first_text is None and isinstance(event, TextEvent) and event.text:
                renders_at_first_text = len(target.calls_to("/chat_tokenize")) - mark
            if isinstance(event, FinishEvent):
                result = event.result
    finally:
        await thinker.aclose()
    assert renders_at_first_text == 0
    assert len(target.calls_to("/chat_tokenize")) - mark == 1
    assert result.stats.takeovers["rule1"] == 1
