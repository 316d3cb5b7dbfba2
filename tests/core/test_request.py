"""``ChatRequest``: one request, checked once, before any server is asked."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from specthink import SpeculativeThinker, TakeoverRules
from specthink.backends.base import SamplingParams
from specthink.backends.tgi import TGIBackend
from specthink.errors import ConfigError
from specthink.output import OutputSplitter, split_result
from specthink.request import ChatRequest
from specthink.testing.models import ScriptedModel
from specthink.testing.server import LoopbackServer
from specthink.trace import StartEvent

HI = [{"role": "user", "content": "Hi"}]
CLOCK = {"type": "function", "function": {"name": "clock", "description": "The time.",
                                          "parameters": {"type": "object", "properties": {}}}}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {}}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}

BAD: list[tuple[str, dict[str, Any]]] = [
    ("messages", {"messages": []}),
    ("messages", {"messages": [{"role": "wizard", "content": "Hi"}]}),
    ("messages", {"messages": [{"role": "user", "content": {"text": "Hi"}}]}),
    ("messages", {"messages": "Hi"}),
    ("tools", {"tools": [{"description": "no name"}]}),
    ("tools", {"tools": ["clock"]}),
    ("tool_choice", {"tools": [CLOCK], "tool_choice": "search"}),
    ("tool_choice", {"tool_choice": "required"}),
    ("tool_choice", {"tools": [CLOCK], "tool_choice": {"type": "function"}}),
    ("tool_choice", {"tools": [CLOCK], "tool_choice": 3}),
    ("parallel_tool_calls", {"parallel_tool_calls": "no"}),
    ("response_format", {"response_format": {"type": "xml"}}),
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": 1}}),
    ("response_format", {"response_format": "json"}),
    ("stop", {"stop": [""]}),
    ("stop", {"stop": ["ok", 3]}),
    ("max_new_tokens", {"max_new_tokens": 0}),
    ("max_new_tokens", {"max_new_tokens": True}),
    ("max_new_tokens", {"max_new_tokens": "many"}),
    ("sampling", {"sampling": {"temperature": 0.5}}),
    ("session_id", {"session_id": "  "}),
    ("session_id", {"session_id": 7}),
    ("rules", {"rules": "fastest"}),
    ("rules", {"rules": 3}),
    ("rules.n1", {"rules": {"n1": 0}}),
    ("rules.n1", {"rules": {"n1": "many"}}),
]


def build(**fields: Any) -> ChatRequest:
    messages = fields.pop("messages", HI)
    return ChatRequest.build(messages, **fields)


@pytest.mark.parametrize(("field", "fields"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_a_bad_field_is_a_config_error_naming_it(field: str, fields: dict[str, Any]) -> None:
    """Broken if: a bad request field is not a ConfigError, or its ``field`` does not name it
    (specthink serve answers the OpenAI parameter from it)."""
    with pytest.raises(ConfigError) as raised:
        build(**dict(fields))
    assert raised.value.field == field


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    model = ScriptedModel.single("Hello there.")
    with LoopbackServer(model) as small, LoopbackServer(model) as target:
        yield small, target


@pytest.mark.parametrize(("field", "fields"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
async def test_the_engine_sends_nothing_for_a_bad_request(
        servers: tuple[LoopbackServer, LoopbackServer], field: str,
        fields: dict[str, Any]) -> None:
    """Broken if: a bad field reaches a server (any request, ``/info`` included) before it
    fails, or fails with another field named."""
    small, target = servers
    small.reset()
    target.reset()
    thinker = SpeculativeThinker(small=TGIBackend(small.url), target=TGIBackend(target.url),
                                 small_template="chatml", target_template="chatml")
    fields = dict(fields)
    messages = fields.pop("messages", HI)
    try:
        with pytest.raises(ConfigError) as raised:
            await thinker.agenerate(messages, **fields)
    finally:
        await thinker.aclose()
    assert raised.value.field == field
    assert small.calls == [] and target.calls == []


def test_tools_are_offered_unless_tool_choice_is_none() -> None:
    """Broken if: the names whose calls count disagree with what was offered (``none`` hides
    them, a named choice still counts every offered tool's calls)."""
    assert build().tool_names is None
    assert build(tools=[CLOCK, WEATHER]).tool_names == ("clock", "weather")
    assert build(tools=[CLOCK, WEATHER], tool_choice="none").tool_names is None
    named = build(tools=[CLOCK, WEATHER], tool_choice="clock")
    assert named.tool_names == ("clock", "weather")
    assert named.prompt_tools == [CLOCK]
    assert named.prompt_messages[0] == {"role": "system",
                                        "content": "You must call the tool clock."}
    assert named.messages == HI
    assert build(tools=[CLOCK], tool_choice="none").prompt_tools is None


def test_the_call_limit_follows_parallel_tool_calls() -> None:
    """Broken if: ``parallel_tool_calls=False`` does not keep one call, or another value
    limits them."""
    assert build(tools=[CLOCK], parallel_tool_calls=False).max_tool_calls == 1
    assert build(tools=[CLOCK], parallel_tool_calls=True).max_tool_calls is None
    assert build(tools=[CLOCK]).max_tool_calls is None


def test_response_format_gives_an_instruction_and_a_grammar_but_none_with_tools() -> None:
    """Broken if: the schema is not shown to the model, or a grammar is asked for beside
    offered tools (it would make them uncallable)."""
    request = build(messages=[{"role": "system", "content": "Be brief."}, *HI],
                    response_format=SCHEMA)
    assert request.grammar == {"type": "json", "value": {"type": "object"}}
    assert request.prompt_messages[0]["content"].startswith("Be brief.\n\nAnswer with a JSON")
    assert request.messages[0]["content"] == "Be brief."
    assert build(response_format=SCHEMA, tools=[CLOCK]).grammar is None
    assert build(response_format={"type": "text"}).grammar is None


def test_rule_overrides_apply_to_the_base_rules() -> None:
    """Broken if: a dict of rules fields does not override the given base rules."""
    base = TakeoverRules.paper_instruct()
    request = build(rules={"n1": 7}, base_rules=base)
    assert request.rules == base.model_copy(update={"n1": 7})
    assert build(rules="paper_instruct").rules == TakeoverRules.paper_instruct()
    assert build().rules is None


def test_defaults() -> None:
    """Broken if: the budget, stop sequences or sampling default differently."""
    request = build(stop="END")
    assert request.stop == ("END",)
    assert request.max_new_tokens == 4096
    assert request.sampling == SamplingParams()
    assert request.session_id is None


async def test_the_stream_carries_the_tools_to_the_splitter() -> None:
    """Broken if: the engine's StartEvent and Result do not carry the request's tools and call
    limit, so a splitter built without arguments reads no tool calls."""
    answer = ('<tool_call>{"name": "clock", "arguments": {}}</tool_call>'
              '<tool_call>{"name": "clock", "arguments": {}}</tool_call>')
    model = ScriptedModel.single(answer)
    with LoopbackServer(model) as small, LoopbackServer(model) as target:
        thinker = SpeculativeThinker(small=TGIBackend(small.url), target=TGIBackend(target.url),
                                     small_template="chatml", target_template="chatml")
        request = thinker.request(HI, tools=[CLOCK], parallel_tool_calls=False)
        splitter = OutputSplitter()
        try:
            async for event in thinker.astream(request):
                if isinstance(event, StartEvent):
                    assert (event.tool_names, event.max_tool_calls) == (("clock",), 1)
                splitter.feed(event)
                last = event
        finally:
            await thinker.aclose()
    assert [call.name for call in splitter.finish().tool_calls] == ["clock"]
    result = last.result  # type: ignore[attr-defined]
    assert [call.name for call in split_result(result).tool_calls] == ["clock"]


async def test_a_request_takes_no_parameters_beside_it() -> None:
    """Broken if: parameters given beside a built request are silently ignored."""
    thinker = SpeculativeThinker(small=TGIBackend("http://127.0.0.1:9"),
                                 target=TGIBackend("http://127.0.0.1:9"),
                                 small_template="chatml", target_template="chatml")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        thinker.request(build(), max_new_tokens=3)
    await thinker.aclose()


def test_template_kwargs_are_checked_and_kept() -> None:
    """If this fails, a call's chat template variables are lost on the way to the engine, or
    a malformed value reaches a template instead of an error naming ``template_kwargs``."""
    messages = [{"role": "user", "content": "Hi"}]
    request = ChatRequest.build(messages, template_kwargs={"enable_thinking": False})
    assert request.template_kwargs == {"enable_thinking": False}
    assert ChatRequest.build(messages).template_kwargs is None
    for bad in ([("enable_thinking", False)], {1: True}):
        with pytest.raises(ConfigError) as refused:
            ChatRequest.build(messages, template_kwargs=bad)  # type: ignore[arg-type]
        assert refused.value.field == "template_kwargs"
