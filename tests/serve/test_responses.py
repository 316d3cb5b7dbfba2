"""``POST /v1/responses`` through the ``openai`` SDK: the whole response and every stream event
parsed with the SDK's own types, function tools over two turns (stateless and with
``previous_response_id``), ``text.format``, the store (GET, DELETE, 404s), the budget ending a
response as ``incomplete``, and the fields it translates into the chat request."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import (
    Response,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseReasoningItem,
    ResponseStreamEvent,
)
from pydantic import TypeAdapter

from .conftest import Served, client
from .test_chat import HELLO_REASONING

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
TIME = {"type": "function", "name": "get_time", "description": "Time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
ASK = "What is the weather in Paris?"
EVENTS: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)


def items(response: Response) -> dict[str, list[Any]]:
    """The output items by type."""
    out: dict[str, list[Any]] = {}
    for item in response.output:
        out.setdefault(item.type, []).append(item)
    return out


def raw_events(served: Served, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every event of a streamed response, checked to repeat its type on the ``event:`` line."""
    with httpx.stream("POST", f"{served.base_url}/responses", json=body,
                      timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    events = []
    for name, data in zip(lines[::2], lines[1::2], strict=True):
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def test_plain_response_has_a_reasoning_item_a_message_usage_and_statistics(
        fresh: Served) -> None:
    """responses.create without streaming: reasoning as a reasoning item whose content is
    reasoning_text, the answer as a message's output_text, usage with reasoning tokens, the
    engine's statistics under "specthink". Failing: agent clients that read output_text or the
    reasoning item get nothing or the wrong text."""
    response = client(fresh).responses.create(model="specthink", input="hello there")
    assert isinstance(response, Response)
    assert response.status == "completed" and response.error is None
    assert response.output_text == "You said: hello there"
    by_type = items(response)
    reasoning = by_type["reasoning"][0]
    assert isinstance(reasoning, ResponseReasoningItem)
    assert [(c.type, c.text) for c in reasoning.content or []] == [
        ("reasoning_text", HELLO_REASONING)]
    message = by_type["message"][0]
    assert isinstance(message, ResponseOutputMessage) and message.role == "assistant"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.id.startswith("resp_") and response.model == "specthink"
    stats = (response.model_extra or {})["specthink"]
    usage = response.usage
    assert usage is not None
    assert usage.input_tokens == stats["input_tokens"] > 0
    assert usage.output_tokens == stats["output_tokens"] > 0
    assert usage.output_tokens_details.reasoning_tokens == stats["reasoning_tokens"] > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert stats["takeovers"]["rule1"] >= 1 and stats["target_tokens"] > 0


def test_instructions_and_message_items_reach_the_prompt(fresh: Served) -> None:
    """instructions become the system message, developer messages system ones, text parts are
    joined. Failing: instructions are dropped or items are rendered in the wrong roles."""
    response = client(fresh).responses.create(
        model="specthink", instructions="Be brief.", input=[
            {"role": "developer", "content": "Answer in English."},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "hello "},
                         {"type": "input_text", "text": "there"}]}])
    assert response.output_text == "You said: hello there"
    assert response.instructions == "Be brief."
    prompt = fresh.pair.small.records[0].prompt
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n"
                             "<|im_start|>system\nAnswer in English.<|im_end|>\n"
                             "<|im_start|>user\nhello there<|im_end|>")


def test_stream_sends_every_event_in_order_and_the_deltas_add_up(fresh: Served) -> None:
    """The full event sequence, each parsed by the SDK's ResponseStreamEvent union, with
    sequence numbers 0, 1, 2, ...; reasoning then answer, each added, filled by deltas and
    done; the deltas join to the done texts and the final response. Failing: a client that
    rebuilds the response from events (Agents SDK, LangChain) loses text or stalls."""
    events = raw_events(fresh, {"model": "specthink", "input": "hello there", "stream": True})
    for event in events:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    reasoning_deltas = kinds.count("response.reasoning_text.delta")
    text_deltas = kinds.count("response.output_text.delta")
    assert reasoning_deltas >= 2 and text_deltas >= 1
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        *["response.reasoning_text.delta"] * reasoning_deltas,
        "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * text_deltas,
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    reasoning = "".join(e["delta"] for e in events if e["type"].endswith("reasoning_text.delta"))
    answer = "".join(e["delta"] for e in events if e["type"].endswith("output_text.delta"))
    done = {e["type"]: e for e in events if e["type"].endswith("text.done")}
    assert done["response.reasoning_text.done"]["text"] == reasoning == HELLO_REASONING
    assert done["response.output_text.done"]["text"] == answer == "You said: hello there"
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "completed" and final.output_text == answer
    assert events[0]["response"]["status"] == "in_progress"
    assert {e["response"]["id"] for e in (events[0], events[1], events[-1])} == {final.id}
    assert (final.model_extra or {})["specthink"]["output_tokens"] > 0


def test_sdk_stream_and_its_final_response(fresh: Served) -> None:
    """The SDK's responses.stream helper accumulates our events into its final response."""
    with client(fresh).responses.stream(model="specthink", input="hello there") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == "You said: hello there"


def test_function_tools_two_turns_stateless(fresh: Served) -> None:
    """Turn 1: the call comes from the answer (the call drafted in the reasoning is ignored);
    turn 2 sends the whole conversation back (reasoning, function_call and its output) with
    store off, and the model answers from the tool's output. Failing: clients' tool loops
    never end or run the drafted call."""
    sdk = client(fresh)
    first = sdk.responses.create(model="specthink", input=ASK, tools=[WEATHER], store=False)
    calls = items(first)["function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    call = calls[0]
    assert isinstance(call, ResponseFunctionToolCall) and call.call_id.startswith("call_")
    assert "message" not in items(first) and first.status == "completed"
    assert "Rome" in (items(first)["reasoning"][0].content or [])[0].text
    conversation: list[Any] = [{"role": "user", "content": ASK}]
    conversation += [item.model_dump(exclude_none=True) for item in first.output]
    conversation.append({"type": "function_call_output", "call_id": call.call_id,
                         "output": "Sunny, 24 C"})
    second = sdk.responses.create(model="specthink", input=conversation, tools=[WEATHER],
                                  store=False)
    assert second.output_text == "The tool says: Sunny, 24 C"
    prompt = fresh.pair.small.records[-1].prompt
    assert "<tool_response>" in prompt and '"city": "Paris"' in prompt
    with pytest.raises(openai.NotFoundError):  # store=False: nothing was kept
        sdk.responses.retrieve(first.id)


def test_function_tools_two_turns_with_previous_response_id(fresh: Served) -> None:
    """Turn 2 sends only the function_call_output and previous_response_id: the server starts
    from the stored conversation. Failing: stateful clients (Agents SDK with
    previous_response_id, Codex) lose the conversation."""
    sdk = client(fresh)
    first = sdk.responses.create(model="specthink", input=ASK, tools=[WEATHER])
    call = items(first)["function_call"][0]
    second = sdk.responses.create(
        model="specthink", previous_response_id=first.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Rain"}])
    assert second.output_text == "The tool says: Rain"
    assert second.previous_response_id == first.id
    prompt = fresh.pair.small.records[-1].prompt
    assert prompt.count(ASK) == 1 and '"city": "Paris"' in prompt
    third = sdk.responses.create(model="specthink", previous_response_id=second.id,
                                 input="hello there")
    assert third.output_text == "You said: hello there"
    assert ASK in fresh.pair.small.records[-1].prompt


def test_parallel_calls_and_parallel_tool_calls_false(fresh: Served) -> None:
    sdk = client(fresh)
    both = sdk.responses.create(model="specthink", input=ASK, tools=[WEATHER, TIME])
    one = sdk.responses.create(model="specthink", input=ASK, tools=[WEATHER, TIME],
                               parallel_tool_calls=False)
    assert [c.name for c in items(both)["function_call"]] == ["get_weather", "get_time"]
    assert [c.name for c in items(one)["function_call"]] == ["get_weather"]
    assert one.parallel_tool_calls is False


def test_streamed_function_call_events(fresh: Served) -> None:
    """A call streams as output_item.added (empty arguments), argument deltas that join to the
    done arguments, and output_item.done."""
    events = raw_events(fresh, {"model": "specthink", "input": ASK, "tools": [WEATHER],
                                "stream": True})
    for event in events:
        EVENTS.validate_python(event)
    added = [e for e in events if e["type"] == "response.output_item.added"
             and e["item"]["type"] == "function_call"]
    assert len(added) == 1 and added[0]["item"]["arguments"] == ""
    deltas = "".join(e["delta"] for e in events
                     if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert json.loads(deltas) == json.loads(done["arguments"]) == {"city": "Paris"}
    assert done["name"] == "get_weather"
    assert not [e for e in events if e["type"] == "response.output_text.delta"]
    assert events[-1]["type"] == "response.completed"
    final = Response.model_validate(events[-1]["response"])
    assert [i.type for i in final.output] == ["reasoning", "function_call"]


def test_text_format_json_schema(fresh: Served) -> None:
    """text.format json_schema reaches the prompt (and TGI's grammar) as chat's
    response_format; the SDK's responses.parse reads the answer into the model."""
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    parsed = client(fresh).responses.parse(model="specthink", input="Who is Ada?",
                                           text_format=Person)
    assert parsed.output_parsed == Person(name="Ada", age=36)
    schema = fresh.pair.small.records[0].parameters["grammar"]["value"]
    assert set(schema["properties"]) == {"name", "age"}
    raw = client(fresh).responses.create(
        model="specthink", input="Who is Ada?",
        text={"format": {"type": "json_schema", "name": "person", "schema": {
            "type": "object", "properties": {"name": {"type": "string"}}}}})
    assert json.loads(raw.output_text) == {"name": "Ada"}
    assert raw.text is not None and raw.text.format is not None
    assert raw.text.format.type == "json_schema"


def test_store_get_delete_and_unknown_ids(fresh: Served) -> None:
    """A stored response reads back with GET and goes with DELETE; then (and for any unknown
    id) GET, DELETE and previous_response_id are 404s naming the id."""
    sdk = client(fresh)
    made = sdk.responses.create(model="specthink", input="hello there", metadata={"k": "v"})
    assert sdk.responses.retrieve(made.id).model_dump() == made.model_dump()
    sdk.responses.delete(made.id)
    for attempt in (lambda: sdk.responses.retrieve(made.id),
                    lambda: sdk.responses.delete(made.id),
                    lambda: sdk.responses.create(model="specthink", input="hi",
                                                 previous_response_id=made.id)):
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert made.id in caught.value.message
        assert caught.value.code == "response_not_found"


def test_store_setting_off_keeps_nothing(pair: Any, serve: Any) -> None:
    """--responses-store 0: answers are served, none is kept (previous_response_id is a 404
    naming its field)."""
    served = serve(pair, responses_store=0)
    sdk = client(served)
    made = sdk.responses.create(model="specthink", input="hello there")
    assert made.output_text == "You said: hello there"
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.responses.create(model="specthink", input="hi", previous_response_id=made.id)
    assert caught.value.param == "previous_response_id"  # type: ignore[attr-defined]


def test_budget_ends_it_as_incomplete(fresh: Served) -> None:
    """max_output_tokens reached: status incomplete with reason max_output_tokens, whole and
    streamed (response.incomplete as the last event)."""
    sdk = client(fresh)
    cut = sdk.responses.create(model="specthink", input="hello there", max_output_tokens=5)
    assert cut.status == "incomplete"
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[-1].status == "incomplete"  # type: ignore[union-attr]
    events = raw_events(fresh, {"model": "specthink", "input": "hello there",
                                "max_output_tokens": 5, "stream": True})
    assert events[-1]["type"] == "response.incomplete"
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "incomplete" and final.incomplete_details is not None


def test_a_conversation_handed_back_with_reasoning_and_effort(fresh: Served) -> None:
    """A whole earlier turn sent back (reasoning item, assistant message) is rendered as the
    assistant's turn, and reasoning.effort is accepted and echoed (the takeover rules, not the
    effort, shape the reasoning). Failing: clients that resend their history get a 400."""
    response = client(fresh).responses.create(
        model="specthink", reasoning={"effort": "high", "summary": "auto"}, input=[
            {"role": "user", "content": "hi"},
            {"type": "reasoning", "id": "rs_1", "summary": [],
             "content": [{"type": "reasoning_text", "text": "They greet."}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
            {"role": "user", "content": "hello there"}])
    assert response.output_text == "You said: hello there"
    assert response.reasoning is not None and response.reasoning.effort == "high"
    prompt = fresh.pair.small.records[0].prompt
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>" in prompt


def test_input_items_list_the_conversation_with_ids(fresh: Served) -> None:
    """responses.input_items.list pages through the conversation a stored response answered
    (with previous_response_id, the earlier turns too), newest first by default, each item
    parsed by the SDK's ResponseItem types. Failing: clients that inspect a stored
    conversation get a 404 or items without ids."""
    sdk = client(fresh)
    first = sdk.responses.create(model="specthink", input=ASK, tools=[WEATHER])
    call = items(first)["function_call"][0]
    second = sdk.responses.create(
        model="specthink", previous_response_id=first.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Rain"}])
    listed = list(sdk.responses.input_items.list(second.id, order="asc"))
    assert [item.type for item in listed] == ["message", "reasoning", "function_call",
                                              "function_call_output"]
    assert all(item.id for item in listed)
    assert listed[0].content[0].text == ASK  # type: ignore[union-attr]
    assert listed[2].id == call.id
    newest = sdk.responses.input_items.list(second.id, limit=1)
    assert [item.type for item in newest.data] == ["function_call_output"]
    assert newest.has_more
    rest = sdk.responses.input_items.list(second.id, after=newest.data[0].id, limit=100)
    assert [item.type for item in rest.data] == ["function_call", "reasoning", "message"]
    assert not rest.has_more
    bad = httpx.get(f"{fresh.base_url}/responses/{second.id}/input_items?limit=0", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    gone = httpx.get(f"{fresh.base_url}/responses/resp_x/input_items", timeout=10)
    assert gone.status_code == 404


def test_the_specthink_extension_picks_the_rules(fresh: Served) -> None:
    """``specthink.rules`` works as in chat: a rules override changes the takeovers."""
    sdk = client(fresh)
    default = sdk.responses.create(model="specthink", input="hello there")
    no_rules = sdk.responses.create(model="specthink", input="hello there", extra_body={
        "specthink": {"rules": {"reflection_takeover": False}}})
    assert no_rules.output_text == default.output_text
    before = (default.model_extra or {})["specthink"]["takeovers"]
    after = (no_rules.model_extra or {})["specthink"]["takeovers"]
    assert before["rule1"] >= 1 and after["rule1"] == 0
