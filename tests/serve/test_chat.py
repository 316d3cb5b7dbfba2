"""``POST /v1/chat/completions`` through the ``openai`` SDK (sync, async, streamed) and raw SSE:
reasoning in both fields, the stream's shape chunk by chunk, usage and statistics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from specthink.testing import LoopbackServer
from specthink.testing.models import Continuation

from .conftest import CHATML_ASSISTANT, REASONING, Pair, Served, client, conversation_pair

HELLO = [{"role": "user", "content": "hello there"}]
HELLO_REASONING = REASONING.format(topic="about 'hello there'")


def sse_lines(served: Served, body: dict[str, Any]) -> list[bytes]:
    """The raw ``data:`` payloads of a streamed answer, in order."""
    with httpx.stream("POST", f"{served.base_url}/chat/completions", json=body,
                      timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line.removeprefix("data: ").encode() for line in response.iter_lines()
                if line]


def test_sync_answer_has_reasoning_in_both_fields_and_the_engines_statistics(
        fresh: Served) -> None:
    """The answer and the reasoning are split apart; DeepSeek-style clients read
    reasoning_content, vLLM >= 0.11 / OpenRouter-style ones reasoning. Failing: the server
    mixes the reasoning into content, drops a field, or loses usage/statistics."""
    completion = client(fresh).chat.completions.create(model="specthink", messages=HELLO)
    assert isinstance(completion, ChatCompletion)
    message = completion.choices[0].message
    assert message.content == "You said: hello there"
    extra = message.model_extra or {}
    assert extra["reasoning_content"] == extra["reasoning"] == HELLO_REASONING
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None and usage.completion_tokens_details is not None
    stats = (completion.model_extra or {})["specthink"]
    assert usage.completion_tokens == stats["output_tokens"] > 0
    assert usage.prompt_tokens == stats["input_tokens"] > 0
    assert usage.completion_tokens_details.reasoning_tokens == stats["reasoning_tokens"] > 0
    assert stats["takeovers"]["rule1"] >= 1 and stats["target_tokens"] > 0
    assert stats["requests"] == {"small": len(fresh.pair.small.records),
                                 "target": len(fresh.pair.target.records)}


async def test_async_client_gets_the_same_answer(fresh: Served) -> None:
    """The async SDK client works the same (failing: the server breaks with concurrent
    keep-alive connections or answers differently)."""
    async with openai.AsyncOpenAI(base_url=fresh.base_url, api_key="unused",
                                  max_retries=0) as aclient:
        completion = await aclient.chat.completions.create(model="specthink", messages=HELLO)
        streamed = await aclient.chat.completions.create(model="specthink", messages=HELLO,
                                                         stream=True)
        pieces = [chunk.choices[0].delta.content or "" async for chunk in streamed
                  if chunk.choices]
    assert completion.choices[0].message.content == "You said: hello there"
    assert "".join(pieces) == "You said: hello there"


def test_stream_shape_chunk_by_chunk(fresh: Served) -> None:
    """OpenAI's stream, exactly: one id; first delta {"role": "assistant", "content": ""};
    reasoning deltas, then content deltas; a final chunk with finish_reason; with include_usage
    one more chunk with choices [] carrying usage and statistics; then [DONE]. Failing: a
    client (LlamaIndex drops a first chunk without content, LangChain reads usage from the
    choices-less chunk) loses text or usage."""
    lines = sse_lines(fresh, {"model": "specthink", "messages": HELLO, "stream": True,
                              "stream_options": {"include_usage": True}})
    assert lines[-1] == b"[DONE]"
    chunks = [ChatCompletionChunk.model_validate(orjson.loads(line)) for line in lines[:-1]]
    assert len({chunk.id for chunk in chunks}) == 1
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    raw_first = orjson.loads(lines[0])["choices"][0]["delta"]
    assert raw_first == {"role": "assistant", "content": ""}
    *body, final, usage_chunk = chunks[1:]
    kinds = []
    for chunk in body:
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        assert chunk.choices[0].finish_reason is None
        if "reasoning_content" in extra:
            assert extra["reasoning_content"] == extra["reasoning"] and not delta.content
            kinds.append("reasoning")
        else:
            assert delta.content
            kinds.append("content")
    assert kinds == sorted(kinds, key=["reasoning", "content"].index), "reasoning after content"
    assert "reasoning" in kinds and "content" in kinds
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning", "") for c in body)
    content = "".join(c.choices[0].delta.content or "" for c in body)
    assert reasoning == HELLO_REASONING and content == "You said: hello there"
    assert final.choices[0].finish_reason == "stop" and final.choices[0].delta.content is None
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    stats = (usage_chunk.model_extra or {})["specthink"]
    assert usage_chunk.usage.completion_tokens == stats["output_tokens"]
    assert usage_chunk.usage.completion_tokens_details is not None
    assert usage_chunk.usage.completion_tokens_details.reasoning_tokens == \
        stats["reasoning_tokens"]


def test_stream_without_include_usage_ends_with_the_finish_chunk(fresh: Served) -> None:
    """Without stream_options.include_usage there is no choices-less chunk (a client that
    indexes choices[0] would crash on one); the statistics ride on the finish chunk."""
    lines = sse_lines(fresh, {"model": "specthink", "messages": HELLO, "stream": True})
    assert lines[-1] == b"[DONE]"
    last = orjson.loads(lines[-2])
    assert last["choices"][0]["finish_reason"] == "stop" and "usage" not in last
    assert last["specthink"]["output_tokens"] > 0
    assert all(orjson.loads(line)["choices"] for line in lines[:-1])


def test_sdk_stream_joins_to_the_whole_answer(fresh: Served) -> None:
    """The SDK's stream, joined, equals the non-streamed answer (failing: the stream loses or
    repeats text at a takeover)."""
    sdk = client(fresh)
    whole = sdk.chat.completions.create(model="specthink", messages=HELLO)
    pieces, reasoning = [], []
    for chunk in sdk.chat.completions.create(model="specthink", messages=HELLO, stream=True):
        delta = chunk.choices[0].delta
        pieces.append(delta.content or "")
        reasoning.append((delta.model_extra or {}).get("reasoning_content", ""))
    assert "".join(pieces) == whole.choices[0].message.content
    assert "".join(reasoning) == (whole.choices[0].message.model_extra or {})["reasoning"]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_field_option_keeps_only_that_field(
        pair: Pair, serve: Callable[..., Served], field: str) -> None:
    """--reasoning-field picks one field, in whole answers and in stream deltas."""
    served = serve(pair, reasoning_field=field)
    other = {"reasoning_content", "reasoning"} - {field}
    message = client(served).chat.completions.create(model="specthink",
                                                     messages=HELLO).choices[0].message
    assert (message.model_extra or {}).get(field) == HELLO_REASONING
    assert not other & set(message.model_extra or {})
    lines = sse_lines(served, {"model": "specthink", "messages": HELLO, "stream": True})
    deltas = [orjson.loads(line)["choices"][0]["delta"] for line in lines[:-1]]
    assert any(field in delta for delta in deltas)
    assert not any(other & set(delta) for delta in deltas)


def test_text_parts_and_sampling_fields_are_accepted(fresh: Served) -> None:
    """Content as a list of text parts, temperature/top_p/seed/max_completion_tokens/user and
    stop reach the engine (failing: a standard field is refused)."""
    completion = client(fresh).chat.completions.create(
        model="specthink", messages=[{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": [
                                         {"type": "text", "text": "hello "},
                                         {"type": "text", "text": "there"}]}],
        temperature=0, top_p=1, seed=7, max_completion_tokens=200, user="u-1",
        stop=[": hello"])
    assert completion.choices[0].message.content == "You said"
    assert completion.choices[0].finish_reason == "stop"


def test_max_tokens_cuts_the_answer_with_finish_reason_length(fresh: Served) -> None:
    completion = client(fresh).chat.completions.create(model="specthink", messages=HELLO,
                                                       max_tokens=5)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_per_request_rules_preset_and_overrides(fresh: Served) -> None:
    """The request's specthink object picks rules: a preset, or field overrides (failing: the
    object is ignored and the server's rules apply)."""
    sdk = client(fresh)
    default = sdk.chat.completions.create(model="specthink", messages=HELLO)
    no_reflection = sdk.chat.completions.create(
        model="specthink", messages=HELLO,
        extra_body={"specthink": {"rules": {"reflection_takeover": False}}})
    instruct = sdk.chat.completions.create(
        model="specthink", messages=HELLO,
        extra_body={"specthink": {"rules": "paper_instruct"}})
    stats = [(c.model_extra or {})["specthink"]["takeovers"]
             for c in (default, no_reflection, instruct)]
    assert stats[0]["rule1"] >= 1
    assert stats[1]["rule1"] == 0
    assert stats[2]["begin"] == 1
    assert {c.choices[0].message.content for c in (default, no_reflection, instruct)} == {
        "You said: hello there"}


class FixedAnswer:
    """Writes ``answer``, resumed from wherever the assistant text stands."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def continuation(self, prompt: str) -> Continuation:
        written = prompt.rsplit(CHATML_ASSISTANT, 1)[-1]
        if self.answer.startswith(written):
            return Continuation(self.answer[len(written):], True)
        return Continuation("", True)


OPENING = "<think>\nLet me compute 12 * 13.\n\n"
SMALL_ANSWER = OPENING + "Hmm wait, is it 150?\n</think>\n\n150."
TARGET_ANSWER = OPENING + "Let me check: 12 * 13 = 156.\n</think>\n\n12 * 13 = 156."


@pytest.fixture
def probing_pair() -> Iterator[Pair]:
    """The small model's probe after the blank line ("Hmm wait") holds a keyword, so the target
    replaces it; the small model would have answered 150."""
    with LoopbackServer(FixedAnswer(SMALL_ANSWER), model_id="test/small") as small, \
            LoopbackServer(FixedAnswer(TARGET_ANSWER), model_id="test/target") as target:
        yield Pair(small, target)


def test_a_probe_the_engine_holds_back_is_never_sent(
        probing_pair: Pair, serve: Callable[..., Served]) -> None:
    """The small model wrote "Hmm wait" after the blank line; the engine held it back and the
    target replaced it. Failing: the server streams text before the engine accepted it."""
    served = serve(probing_pair)
    lines = sse_lines(served, {"model": "specthink", "messages": [
        {"role": "user", "content": "What is 12 * 13?"}], "stream": True,
        "stream_options": {"include_usage": True}})
    payload = b"".join(lines[:-2])  # the usage chunk's statistics quote no text
    assert b"Hmm" not in payload and b"150" not in payload
    chunks = [orjson.loads(line) for line in lines[1:-2]]
    text = "".join(d.get("reasoning", "") + (d.get("content") or "")
                   for c in chunks for d in [c["choices"][0]["delta"]])
    assert text == "\nLet me compute 12 * 13.\n\nLet me check: 12 * 13 = 156.\n12 * 13 = 156."
    stats = orjson.loads(lines[-2])["specthink"]
    assert stats["discarded_tokens"] == 2 and stats["takeovers"]["rule1"] == 1


def test_the_server_asks_the_model_servers_at_start_so_the_first_user_waits_no_longer(
        serve: Callable[..., Served]) -> None:
    """At start the server fetches both servers' limits and learns their templates
    (``warm_up``), so the first client's first upstream request is its generation (broken:
    the first user after every start or rollout paid the render, probe and /info round
    trips)."""
    with conversation_pair() as pair:
        served = serve(pair, small_template="auto", target_template="auto")
        assert pair.small.records == [] and pair.small.calls_to("/info")
        asked = len(pair.small.calls)
        completion = client(served).chat.completions.create(model="specthink", messages=HELLO)
        assert completion.choices[0].message.content == "You said: hello there"
        assert pair.small.calls[asked].path == "/generate_stream"
        assert len(pair.small.calls_to("/info")) == 1


@pytest.mark.parametrize(("overrides", "suggested"), [
    ({}, True),
    ({"rules": "paper_instruct"}, False),
    ({"small_template": "deepseek-r1", "target_template": "deepseek-r1"}, False),
], ids=["chatml-paper", "paper_instruct", "template-opens-think"])
def test_an_instruct_pair_under_reasoning_rules_gets_the_instruct_preset_suggested(
        serve: Callable[..., Served], caplog: pytest.LogCaptureFixture,
        overrides: dict[str, str], suggested: bool) -> None:
    """If this fails, `serve` in front of an instruct-only pair (whose template opens no
    reasoning) keeps the `paper` rules, makes no takeover and says nothing of
    `paper_instruct`; or it warns where the template opens the reasoning."""
    with conversation_pair() as pair:
        with caplog.at_level(logging.WARNING, logger="specthink.serve"):
            serve(pair, **overrides)
    assert ("--rules paper_instruct" in caplog.text) is suggested, caplog.text


def test_model_servers_down_at_start_are_asked_again_by_the_first_request(
        serve: Callable[..., Served], caplog: pytest.LogCaptureFixture) -> None:
    """Model servers that start after this one (compose, a rollout) are not fatal: the server
    says so, serves, and its first request checks them again."""
    with conversation_pair() as pair:
        with caplog.at_level(logging.WARNING, logger="specthink.serve"):
            served = serve(pair, small_url="http://127.0.0.1:9")  # nothing listens there
        assert "could not be asked at start" in caplog.text
        assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
        with pytest.raises(openai.APIStatusError) as caught:
            client(served).chat.completions.create(model="specthink", messages=HELLO)
        assert caught.value.status_code in (502, 503)
        assert pair.small.calls == []
