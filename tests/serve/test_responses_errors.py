"""``POST /v1/responses`` refuses what it cannot honour with OpenAI error objects before any
model server is asked: 400 naming the Responses field (also for what the chat path's
``prepare`` finds), 401 without the key, 404 for an unknown model or response id; a failure
after the stream began is a ``response.failed`` event; the metrics count Responses requests."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specthink.testing import Fault, LatencyModel

from .conftest import Pair, Served, client, conversation_pair
from .test_errors import KEYS, error_of

OK: dict[str, Any] = {"model": "specthink", "input": "hello there"}
FUNCTION = {"type": "function", "name": "a", "parameters": {"type": "object"}}


def post(served: Served, body: bytes | dict[str, Any],
         headers: dict[str, str] | None = None) -> httpx.Response:
    url = f"{served.base_url}/responses"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, timeout=30,
                          headers={"content-type": "application/json", **(headers or {})})
    return httpx.post(url, json=body, headers=headers, timeout=30)


BAD_REQUESTS: list[tuple[str, bytes | dict[str, Any], str | None]] = [
    ("malformed JSON", b'{"model": "specthink", "input": [', None),
    ("not an object", b'["specthink"]', None),
    ("no input", {"model": "specthink"}, "input"),
    ("empty input", {**OK, "input": []}, "input"),
    ("an item that is no object", {**OK, "input": ["hi"]}, "input[0]"),
    ("an unknown role", {**OK, "input": [{"role": "wizard", "content": "hi"}]},
     "input[0].role"),
    ("an image part", {**OK, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://x/cat.png"}]}]}, "input[0].content[0]"),
    ("an item type it cannot run", {**OK, "input": [
        {"role": "user", "content": "hi"}, {"type": "web_search_call", "id": "ws_1"}]},
     "input[1].type"),
    ("a function_call without call_id", {**OK, "input": [
        {"type": "function_call", "name": "a", "arguments": "{}"}]}, "input[0].call_id"),
    ("a built-in tool", {**OK, "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ("a function tool without a name", {**OK, "tools": [{"type": "function"}]}, "tools"),
    ("tool_choice naming no offered tool", {**OK, "tools": [FUNCTION],
                                            "tool_choice": {"type": "function", "name": "b"}},
     "tool_choice"),
    ("tool_choice allowed_tools", {**OK, "tools": [FUNCTION], "tool_choice": {
        "type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice"),
    ("an unknown text.format", {**OK, "text": {"format": {"type": "xml"}}}, "text.format"),
    ("text.verbosity", {**OK, "text": {"verbosity": "low"}}, "text.verbosity"),
    ("max_output_tokens zero", {**OK, "max_output_tokens": 0}, "max_output_tokens"),
    ("max_output_tokens above the limit", {**OK, "max_output_tokens": 10**6},
     "max_output_tokens"),
    ("temperature out of range", {**OK, "temperature": 3}, "temperature"),
    ("an unknown reasoning.effort", {**OK, "reasoning": {"effort": "maximal"}},
     "reasoning.effort"),
    ("background", {**OK, "background": True}, "background"),
    ("a conversation", {**OK, "conversation": "conv_1"}, "conversation"),
    ("truncation auto", {**OK, "truncation": "auto"}, "truncation"),
    ("logprobs", {**OK, "include": ["message.output_text.logprobs"]}, "include"),
    ("top_logprobs", {**OK, "top_logprobs": 2}, "top_logprobs"),
    ("max_tool_calls above one", {**OK, "max_tool_calls": 3}, "max_tool_calls"),
    ("an unknown field", {**OK, "frobnicate": True}, "frobnicate"),
    ("stream not a bool", {**OK, "stream": "sometimes"}, "stream"),
    ("store not a bool", {**OK, "store": "maybe"}, "store"),
    ("an unknown stream option", {**OK, "stream_options": {"turbo": True}},
     "stream_options.turbo"),
    ("input neither text nor items", {**OK, "input": 5}, "input"),
    ("an unknown rules preset", {**OK, "specthink": {"rules": "fastest"}}, "specthink.rules"),
    # ~1,000 levels, under orjson's 1,024: once a RecursionError (a 500)
    ("tool parameters nested 1,000 deep",
     b'{"model": "specthink", "input": "hi", "tools": [{"type": "function", "name": "f", '
     b'"parameters": ' + b'{"a": [' * 498 + b"1" + b"]}" * 498 + b"}]}", "tools"),
]


@pytest.mark.parametrize(("case", "body", "param"), BAD_REQUESTS,
                         ids=[case for case, _, _ in BAD_REQUESTS])
def test_bad_request_is_a_400_naming_the_responses_field(
        fresh: Served, case: str, body: bytes | dict[str, Any], param: str | None) -> None:
    """Failing: the server forwards what it cannot honour, silently drops a field, or names
    the chat field (messages, response_format) the client never sent."""
    error = error_of(post(fresh, body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fresh.pair.requests() == 0, "a model server was asked"


def test_accepted_neutral_values_are_served(fresh: Served) -> None:
    """What clients send by default (include [], truncation disabled, store false, empty
    metadata, reasoning.effort, service_tier auto, stream_options) is accepted."""
    response = post(fresh, {**OK, "include": ["reasoning.encrypted_content"],
                            "truncation": "disabled", "store": False, "metadata": {},
                            "reasoning": {"effort": "low", "summary": "auto"},
                            "service_tier": "auto", "top_logprobs": 0,
                            "stream_options": {"include_obfuscation": False},
                            "safety_identifier": "u1", "max_tool_calls": 1})
    assert response.status_code == 200, response.text
    assert response.json()["output"][-1]["content"][0]["text"] == "You said: hello there"


def test_unknown_model_and_response_ids_are_404s(fresh: Served) -> None:
    error = error_of(post(fresh, {**OK, "model": "gpt-5"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    error = error_of(post(fresh, {**OK, "previous_response_id": "resp_nope"}), 404)
    assert error["param"] == "previous_response_id" and "resp_nope" in error["message"]
    for method in ("GET", "DELETE"):
        response = httpx.request(method, f"{fresh.base_url}/responses/resp_gone", timeout=10)
        error = error_of(response, 404)
        assert error["code"] == "response_not_found" and "resp_gone" in error["message"]
    error_of(httpx.get(f"{fresh.base_url}/responses", timeout=10), 405)
    assert fresh.pair.requests() == 0


def test_api_keys_guard_create_get_and_delete(pair: Pair, serve: Callable[..., Served]) -> None:
    """--api-key: without the key, every Responses route is a 401 before anything else; with
    it, the SDK creates and reads back."""
    served = serve(pair, api_keys=KEYS)
    pair.reset()
    assert error_of(post(served, OK), 401)["type"] == "authentication_error"
    assert error_of(post(served, OK, {"Authorization": "Bearer wrong"}), 401)
    error_of(httpx.get(f"{served.base_url}/responses/resp_1", timeout=10), 401)
    error_of(httpx.delete(f"{served.base_url}/responses/resp_1", timeout=10), 401)
    assert pair.requests() == 0
    sdk = client(served, api_key=KEYS[1])
    made = sdk.responses.create(model="specthink", input="hello there")
    assert sdk.responses.retrieve(made.id).output_text == "You said: hello there"
    with pytest.raises(openai.AuthenticationError):
        client(served, api_key="wrong").responses.retrieve(made.id)


def test_a_model_server_failing_is_502_before_the_stream_and_response_failed_after(
        fresh: Served) -> None:
    """Before any text: a real 502 naming the small server. After the stream began: a
    response.failed event carrying the error, which LangChain and the Agents SDK raise on."""
    fresh.pair.small.inject(Fault.error_event(error_type="generation", times=5))
    error = error_of(post(fresh, {**OK, "stream": True}), 502)
    assert error["code"] == "small_server_error"
    fresh.pair.reset()
    fresh.pair.small.inject(Fault.error_event(error_type="generation", after_tokens=3,
                                              times=5))
    with httpx.stream("POST", f"{fresh.base_url}/responses", json={**OK, "stream": True},
                      timeout=30) as response:
        assert response.status_code == 200
        data = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                if line.startswith("data: ")]
    assert data[-1]["type"] == "response.failed"
    failed = openai.types.responses.Response.model_validate(data[-1]["response"])
    assert failed.status == "failed" and failed.error is not None
    assert "small model server" in failed.error.message
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    fresh.pair.reset()  # the faults left over


def test_metrics_count_responses_requests_beside_chat(pair: Pair,
                                                      serve: Callable[..., Served]) -> None:
    """specthink_serve_responses_requests_total counts Responses requests by status (a 200, a
    streamed 200, a 400, a 404); requests_total counts them and the chat ones. Failing: a
    dashboard cannot tell the two APIs apart, or Responses traffic is invisible."""
    served = serve(pair)
    pair.reset()  # faults another test left
    sdk = client(served)
    sdk.responses.create(model="specthink", input="hello there")
    list(sdk.responses.create(model="specthink", input="hello there", stream=True))
    sdk.chat.completions.create(model="specthink",
                                messages=[{"role": "user", "content": "hello there"}])
    assert post(served, {**OK, "input": []}).status_code == 400
    assert post(served, {**OK, "model": "x"}).status_code == 404
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    responses = "specthink_serve_responses_requests_total"
    assert samples[(responses, (("status", "200"),))] == 2
    assert samples[(responses, (("status", "400"),))] == 1
    assert samples[(responses, (("status", "404"),))] == 1
    assert samples[("specthink_serve_requests_total", (("status", "200"),))] == 3
    assert samples[("specthink_serve_time_to_first_token_seconds_count", ())] == 1
    assert samples[("specthink_serve_tokens_total", (("model", "target"),))] > 0


@pytest.fixture
def slow_pair() -> Iterator[Pair]:
    with conversation_pair(LatencyModel(per_token=0.02)) as servers:
        yield servers


async def test_over_max_concurrency_is_a_429_shared_with_chat(
        slow_pair: Pair, serve: Callable[..., Served]) -> None:
    """--max-concurrency 1 counts both APIs: while a streamed response runs, a chat request and
    a Responses request are refused with 429 and no upstream request."""
    served = serve(slow_pair, max_concurrency=1)
    async with openai.AsyncOpenAI(base_url=served.base_url, api_key="x",
                                  max_retries=0) as sdk:
        stream = await sdk.responses.create(model="specthink", input="hello there",
                                            stream=True)
        first = await anext(aiter(stream))
        assert first.type == "response.created"
        requests_before = slow_pair.requests()
        async with httpx.AsyncClient(timeout=30) as raw:
            refused = await raw.post(f"{served.base_url}/responses", json=OK)
            chat = await raw.post(f"{served.base_url}/chat/completions", json={
                "model": "specthink", "messages": [{"role": "user", "content": "hi"}]})
        assert error_of(refused, 429)["type"] == "rate_limit_error"
        assert refused.headers["retry-after"] == "1"
        error_of(chat, 429)
        assert slow_pair.requests() == requests_before
        async for _ in stream:
            pass
