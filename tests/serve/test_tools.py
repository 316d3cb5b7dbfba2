"""Tools and structured output through the server: calls come from the answer only (a call the
model drafted while reasoning is ignored), stream as OpenAI's tool-call deltas, and the
tool-result turn is rendered back to the model; ``response_format`` shows the schema."""

from __future__ import annotations

import json
from typing import Any

import openai
import orjson
from openai.types.chat import ChatCompletionChunk

from .conftest import Served, client
from .test_chat import sse_lines

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_call_comes_from_the_answer_and_the_decoy_in_the_reasoning_is_ignored(
        fresh: Served) -> None:
    """The model considered get_weather(Rome) while thinking and called get_weather(Paris) in
    its answer: only Paris is a call, finish_reason is tool_calls, content is null. Failing:
    the server parses the reasoning, or leaks call markup into content."""
    completion = client(fresh).chat.completions.create(model="specthink", messages=ASK,
                                                       tools=[WEATHER])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    assert calls[0].id and calls[0].type == "function"
    assert "Rome" in (choice.message.model_extra or {})["reasoning_content"]


def test_streamed_tool_call_deltas_give_id_and_name_first_then_argument_pieces(
        fresh: Served) -> None:
    """Tool-call deltas as OpenAI streams them; the decoy in the reasoning stays reasoning.
    Failing: clients that accumulate deltas by index (openai, LangChain) get no call or a
    broken one."""
    lines = sse_lines(fresh, {"model": "specthink", "messages": ASK, "tools": [WEATHER],
                              "stream": True})
    chunks = [orjson.loads(line) for line in lines[:-1]]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    call_deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    first, *pieces = call_deltas
    assert first["id"] and first["function"]["name"] == "get_weather"
    assert first["type"] == "function" and first["function"]["arguments"] == ""
    assert pieces and all(set(p) == {"index", "function"} for p in pieces)
    arguments = "".join(p["function"]["arguments"] for p in pieces)
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert "tool_call" not in content and content == ""
    sdk_chunks = list(client(fresh).chat.completions.create(
        model="specthink", messages=ASK, tools=[WEATHER], stream=True))
    names = [tc.function.name for c in sdk_chunks for tc in c.choices[0].delta.tool_calls or []
             if tc.function and tc.function.name]
    assert names == ["get_weather"]


def test_parallel_calls_and_parallel_tool_calls_false(fresh: Served) -> None:
    """Two tools offered, the model calls both; parallel_tool_calls=False keeps the first."""
    sdk = client(fresh)
    both = sdk.chat.completions.create(model="specthink", messages=ASK, tools=[WEATHER, TIME])
    one = sdk.chat.completions.create(model="specthink", messages=ASK, tools=[WEATHER, TIME],
                                      parallel_tool_calls=False)
    assert [c.function.name for c in both.choices[0].message.tool_calls or []] == [
        "get_weather", "get_time"]
    assert [c.function.name for c in one.choices[0].message.tool_calls or []] == [
        "get_weather"]


def test_tool_choice_none_hides_the_tools(fresh: Served) -> None:
    completion = client(fresh).chat.completions.create(model="specthink", messages=ASK,
                                                       tools=[WEATHER], tool_choice="none")
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason == "stop"


def test_tool_result_turn_is_answered(fresh: Served) -> None:
    """The assistant's call and the tool's result go back as the next turn's messages and the
    model answers from the result (failing: tool messages are refused or not rendered)."""
    sdk = client(fresh)
    first = sdk.chat.completions.create(model="specthink", messages=ASK, tools=[WEATHER])
    call = (first.choices[0].message.tool_calls or [])[0]
    messages: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"},
    ]
    second = sdk.chat.completions.create(model="specthink", messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == "The tool says: Sunny, 24 C"
    assert second.choices[0].finish_reason == "stop"
    prompt = fresh.pair.small.records[-1].prompt
    assert "<tool_response>" in prompt and '"city": "Paris"' in prompt


def test_json_schema_response_format_shows_the_schema_and_the_answer_parses(
        fresh: Served) -> None:
    """response_format json_schema: the schema reaches the model's prompt and the answer is
    JSON in content (the openai SDK's parse() reads it). Failing: the field is dropped."""
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    completion = client(fresh).chat.completions.create(
        model="specthink", messages=[{"role": "user", "content": "Who is Ada?"}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema}})
    assert json.loads(completion.choices[0].message.content or "") == {"name": "Ada", "age": 36}
    prompt = fresh.pair.small.records[0].prompt
    assert json.dumps(schema) in prompt
    # TGI servers take a grammar: the schema constrains both models' output.
    assert fresh.pair.small.records[0].parameters["grammar"] == {"type": "json",
                                                                 "value": schema}


def test_json_schema_with_the_sdks_parse_helper(fresh: Served) -> None:
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    parsed = client(fresh).chat.completions.parse(
        model="specthink", messages=[{"role": "user", "content": "Who is Ada?"}],
        response_format=Person)
    assert parsed.choices[0].message.parsed == Person(name="Ada", age=36)


def test_json_object_response_format_sends_a_grammar(fresh: Served) -> None:
    client(fresh).chat.completions.create(
        model="specthink", messages=[{"role": "user", "content": "hello"}],
        response_format={"type": "json_object"})
    assert fresh.pair.small.records[0].parameters["grammar"] == {
        "type": "json", "value": {"type": "object"}}


def test_openai_errors_are_typed_by_the_sdk(fresh: Served) -> None:
    """The SDK maps our error objects to its exception classes (BadRequestError with param)."""
    try:
        client(fresh).chat.completions.create(model="specthink", messages=ASK,
                                              tools=[WEATHER], tool_choice={
                                                  "type": "function",
                                                  "function": {"name": "nope"}})
    except openai.BadRequestError as exc:
        assert exc.param == "tool_choice" and "nope" in exc.message
    else:
        raise AssertionError("an unknown tool in tool_choice was accepted")
