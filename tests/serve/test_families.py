"""``specthink serve`` in front of every family's scripted pair (tests/core/formats/
family_pairs.py: vLLM-protocol servers rendering the family's real chat template, the pair named
by its model ids alone), driven by the openai SDK: the content is exactly the answer, the
reasoning exactly the reasoning, the call exactly the call and never the decoy drafted in the
reasoning, after a takeover, whole and streamed; a tool's result is answered with the earlier
reasoning handed back; a required or named ``tool_choice`` gives the call; the Responses API
runs the same tool loop. Then what is particular to one family: the reasoning handed back as
``reasoning`` or client-side, a call no format can open, Gemma 4's thinking switch, the instruct
preset's warning."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseFunctionToolCall, ResponseReasoningItem

from specthink.formats.families import builtin_template
from tests.core.formats import test_pair_tool_choice as required
from tests.core.formats.family_pairs import (
    ARGUMENTS,
    FAMILIES,
    FINAL_ANSWER,
    FINAL_REASONING,
    PLAIN_ANSWER,
    PLAIN_REASONING,
    QUESTION,
    TOOL_RESULT,
    FamilyPair,
    start_family_pair,
)
from tests.core.formats.family_pairs import WEATHER as FAMILY_WEATHER
from tests.core.formats.test_pair_formats import (
    ANSWER,
    CALL_TURN,
    EARLIER_REASONING,
    FAMILY_PAIRS,
    GPT_OSS_TEMPLATE_FILE,
    HARMONY_TOOLS,
    REASONING,
    WEATHER,
    start,
    start_family,
    start_tool_loop,
)
from tests.serve.conftest import client

PLAIN = [{"role": "user", "content": "What is 12 * 13?"}]
ASK = [{"role": "user", "content": QUESTION}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def serve_family(loopback_server: Callable[..., object], serve: Callable[..., Any],
                 name: str) -> tuple[FamilyPair, openai.OpenAI]:
    """Family ``name``'s pair, and an SDK client of ``serve`` in front of it."""
    pair = start_family_pair(loopback_server, name)
    return pair, client(serve(pair, **pair.settings))


def takeovers(extra: Mapping[str, Any] | None) -> int:
    """The takeovers in the ``specthink`` statistics of a completion or a stream's last
    chunk."""
    return sum((extra or {})["specthink"]["takeovers"].values())


def calls_of(message: Any) -> list[tuple[str, Any]]:
    """A whole message's tool calls, arguments decoded."""
    return [(call.function.name, json.loads(call.function.arguments))
            for call in message.tool_calls or []]


def sent(message: Mapping[str, Any]) -> dict[str, Any]:
    """``message`` as the SDK sends it: a call's arguments as a JSON string (a copy: the
    family's history shares its call)."""
    calls = [{**call, "function": {**call["function"],
                                   "arguments": json.dumps(call["function"]["arguments"])}}
             for call in message.get("tool_calls", [])]
    return {**message, "tool_calls": calls} if calls else dict(message)


@dataclass
class Streamed:
    """A streamed completion put together as the SDK's users do: text deltas joined, tool-call
    deltas accumulated by index."""

    content: str = ""
    reasoning: str = ""
    names: dict[int, str] = field(default_factory=dict)
    arguments: dict[int, str] = field(default_factory=dict)
    finish: str | None = None
    takeovers: int = 0

    @property
    def calls(self) -> list[tuple[str, Any]]:
        return [(self.names[i], json.loads(self.arguments[i])) for i in sorted(self.names)]


def stream(sdk: openai.OpenAI, messages: Any, **request: Any) -> Streamed:
    """The streamed completion of ``messages`` with ``request``'s fields."""
    out = Streamed()
    chunks: openai.Stream[ChatCompletionChunk] = sdk.chat.completions.create(
        model="specthink", messages=messages, stream=True, **request)
    for chunk in chunks:
        if "specthink" in (chunk.model_extra or {}):
            out.takeovers += takeovers(chunk.model_extra)
        for choice in chunk.choices:
            out.finish = choice.finish_reason or out.finish
            out.content += choice.delta.content or ""
            out.reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            for call in choice.delta.tool_calls or []:
                if call.function is not None:
                    out.names[call.index] = (out.names.get(call.index, "")
                                             + (call.function.name or ""))
                    out.arguments[call.index] = (out.arguments.get(call.index, "")
                                                 + (call.function.arguments or ""))
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_answers_through_serve(loopback_server: Callable[..., object],
                                           serve: Callable[..., Any], name: str) -> None:
    """If this fails, an OpenAI client of this family's pair (no tools) gets the reasoning in
    the content or loses it, a cut answer, or no takeover, whole or streamed."""
    _, sdk = serve_family(loopback_server, serve, name)
    completion = sdk.chat.completions.create(model="specthink", messages=PLAIN)  # type: ignore[arg-type]
    message = completion.choices[0].message
    assert message.content == PLAIN_ANSWER
    assert (message.model_extra or {})["reasoning_content"] == PLAIN_REASONING
    assert not message.tool_calls and completion.choices[0].finish_reason == "stop"
    assert takeovers(completion.model_extra) >= 1
    streamed = stream(sdk, PLAIN)
    assert (streamed.content, streamed.reasoning, streamed.calls, streamed.finish) == (
        PLAIN_ANSWER, PLAIN_REASONING, [], "stop")
    assert streamed.takeovers >= 1


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_calls_and_reads_the_tools_result_through_serve(
        loopback_server: Callable[..., object], serve: Callable[..., Any], name: str) -> None:
    """If this fails, an OpenAI client's tool loop on this family's pair breaks: the family's
    call comes as text (or not at all), the Oslo call drafted in the reasoning comes as a call,
    the reasoning or the answer beside the call is wrong, no takeover, whole or streamed; or
    the conversation sent back (the call's arguments a JSON string, its reasoning as
    ``reasoning_content``, the tool's result) is not answered, or the reasoning handed back is
    missing from the prompts of a template that shows it."""
    pair, sdk = serve_family(loopback_server, serve, name)
    family = pair.family
    completion = sdk.chat.completions.create(model="specthink", messages=ASK,  # type: ignore[arg-type]
                                             tools=FAMILY_WEATHER)  # type: ignore[arg-type]
    choice = completion.choices[0]
    assert (choice.message.content or "") == family.call_answer
    earlier = (choice.message.model_extra or {})["reasoning_content"]
    assert earlier == family.call_reasoning
    assert calls_of(choice.message) == [("get_weather", ARGUMENTS)]
    assert choice.finish_reason == "tool_calls"
    assert takeovers(completion.model_extra) >= 1
    streamed = stream(sdk, ASK, tools=FAMILY_WEATHER)
    assert (streamed.content, streamed.reasoning, streamed.calls, streamed.finish) == (
        family.call_answer, family.call_reasoning, [("get_weather", ARGUMENTS)], "tool_calls")
    assert streamed.takeovers >= 1

    history = [sent(message) for message in family.history(earlier)]
    final = sdk.chat.completions.create(model="specthink", messages=history,  # type: ignore[arg-type]
                                        tools=FAMILY_WEATHER)  # type: ignore[arg-type]
    message = final.choices[0].message
    assert message.content == FINAL_ANSWER and not message.tool_calls
    assert (message.model_extra or {})["reasoning_content"] == FINAL_REASONING
    assert takeovers(final.model_extra) >= 1
    if family.shows_earlier_reasoning(earlier):
        answering = [prompt for prompt in pair.prompts if TOOL_RESULT in prompt]
        assert answering and all(earlier in prompt for prompt in answering)


@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_makes_a_required_call_through_serve(
        loopback_server: Callable[..., object], serve: Callable[..., Any], name: str,
        choice: Any) -> None:
    """If this fails, an OpenAI client's ``tool_choice`` "required" or naming get_weather on
    this family's pair gets no call, words beside it, or a 400, whole or streamed: serve drops
    the choice, or the engine opens the call otherwise than the family's model writes one."""
    pair, sdk = serve_family(loopback_server, serve, name)
    completion = sdk.chat.completions.create(model="specthink", messages=ASK,  # type: ignore[arg-type]
                                             tools=FAMILY_WEATHER,  # type: ignore[arg-type]
                                             tool_choice=choice)
    answer = completion.choices[0]
    assert answer.finish_reason == "tool_calls", answer.message
    assert calls_of(answer.message) == [("get_weather", ARGUMENTS)]
    assert not answer.message.content
    assert (answer.message.model_extra or {})["reasoning_content"] == pair.family.call_reasoning
    streamed = stream(sdk, ASK, tools=FAMILY_WEATHER, tool_choice=choice)
    assert (streamed.content, streamed.reasoning, streamed.calls, streamed.finish) == (
        "", pair.family.call_reasoning, [("get_weather", ARGUMENTS)], "tool_calls")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_runs_a_tool_loop_through_the_responses_api(
        loopback_server: Callable[..., object], serve: Callable[..., Any], name: str) -> None:
    """If this fails, a Responses API client of this family's pair gets the reasoning item,
    the answer or the function call wrong (the decoy as a call), no takeover, or its second
    turn (every output item sent back, then the function's output) is not answered, or the
    reasoning item sent back is missing from the prompts of a template that shows it."""
    pair, sdk = serve_family(loopback_server, serve, name)
    family = pair.family
    tools: Any = [{"type": "function", **cast(dict[str, Any], tool["function"])}
                  for tool in FAMILY_WEATHER]
    first = sdk.responses.create(model="specthink", input=QUESTION, tools=tools,
                                 store=False)
    reasoning = [item for item in first.output if isinstance(item, ResponseReasoningItem)]
    assert [[c.text for c in item.content or []] for item in reasoning] == [
        [family.call_reasoning]]
    calls = [item for item in first.output if isinstance(item, ResponseFunctionToolCall)]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", ARGUMENTS)]
    assert first.output_text == family.call_answer
    assert takeovers(first.model_extra) >= 1
    conversation: list[Any] = [{"role": "user", "content": QUESTION}]
    conversation += [item.model_dump(exclude_none=True) for item in first.output]
    conversation.append({"type": "function_call_output", "call_id": calls[0].call_id,
                         "output": TOOL_RESULT})
    second = sdk.responses.create(model="specthink", input=conversation, tools=tools,
                                  store=False)
    assert second.output_text == FINAL_ANSWER
    assert [[c.text for c in item.content or []] for item in second.output
            if isinstance(item, ResponseReasoningItem)] == [[FINAL_REASONING]]
    if family.shows_earlier_reasoning(family.call_reasoning):
        answering = [prompt for prompt in pair.prompts if TOOL_RESULT in prompt]
        assert answering and all(family.call_reasoning in prompt for prompt in answering)


@pytest.mark.parametrize("template", ["server", GPT_OSS_TEMPLATE_FILE],
                         ids=["server-rendered", "client-side"])
@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_serve_hands_a_tool_turns_reasoning_back(loopback_server: Callable[..., object],
                                                 serve: Callable[..., Any], field: str,
                                                 template: str) -> None:
    """If this fails, an OpenAI client's tool loop through serve on gpt-oss loses the
    reasoning of the turn that called the tool (sent back as ``reasoning_content`` or
    ``reasoning``, as it came): the template, rendered by the server or client-side (where it
    reads ``thinking``), no longer shows it on the next call."""
    pair = start_tool_loop(loopback_server)
    served = serve(pair, backend="openai", small_model="openai/gpt-oss-20b",
                   target_model="openai/gpt-oss-120b", small_template=template,
                   target_template=template)
    completion = client(served).chat.completions.create(
        model="specthink", tools=HARMONY_TOOLS,  # type: ignore[arg-type]
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, field: EARLIER_REASONING,  # type: ignore[list-item]
             "tool_calls": [{"id": "c1", "type": "function", "function": {
                 "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21 C"}])
    analysis = f"<|channel|>analysis<|message|>{EARLIER_REASONING}<|end|>"
    prompts = [r.model_input for s in (pair.small, pair.target) for r in s.records]
    assert prompts and all(analysis in prompt for prompt in prompts)
    assert completion.choices[0].message.content == ANSWER


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"])
def test_a_required_call_a_format_cannot_open_is_a_400_naming_tool_choice(
        loopback_server: Callable[..., object], serve: Callable[..., Any],
        tool_choice: Any, tmp_path: Path) -> None:
    """If this fails, a pair read with a response template that declares no call opener (the
    model's own tokenizer_config.json, here harmony's template without specthink's
    ``call_opener``), given tool_choice "required" or a named function, answers whatever the
    model chose to write (text, finish_reason "stop"): the engine cannot open such a call, so
    it must refuse before any generation request."""
    pair = start_tool_loop(loopback_server, CALL_TURN)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"response_template": dict(builtin_template("gpt-oss").spec)}),
                      encoding="utf-8")
    served = serve(pair, backend="openai", small_model="openai/gpt-oss-20b",
                   target_model="openai/gpt-oss-120b", small_template="server",
                   target_template="server", response_template=str(config))
    with pytest.raises(openai.BadRequestError) as refused:
        client(served).chat.completions.create(
            model="specthink", tools=WEATHER, tool_choice=tool_choice,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "Weather in Paris?"}])
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "tool_choice", error
    assert "cannot be enforced" in error["message"]
    generations = [r for server in (pair.small, pair.target) for r in server.records
                   if r.path.endswith("/completions")]
    assert generations == []


def test_a_requests_chat_template_kwargs_switch_gemma4s_thinking_off(
        loopback_server: Callable[..., object], serve: Callable[..., Any]) -> None:
    """If this fails, an OpenAI client cannot switch a Gemma 4 pair's thinking off for one
    request as vLLM clients do (``extra_body={"chat_template_kwargs": ...}``), the switch
    leaks into the next request, or a malformed one is not a 400 naming the parameter."""
    small, target = FAMILY_PAIRS["gemma-4"]
    served = serve(start_family(loopback_server, "gemma-4"), backend="openai",
                   small_model=small, target_model=target, small_template="server",
                   target_template="server")
    sdk = client(served)
    question = [{"role": "user", "content": "What is 12 * 13?"}]
    off = sdk.chat.completions.create(model="specthink", messages=question,  # type: ignore[arg-type]
                                      extra_body={"chat_template_kwargs":
                                                  {"enable_thinking": False}})
    assert off.choices[0].message.content == ANSWER
    assert "reasoning_content" not in (off.choices[0].message.model_extra or {})
    assert sum((off.model_extra or {})["specthink"]["takeovers"].values()) == 0
    on = sdk.chat.completions.create(model="specthink", messages=question)  # type: ignore[arg-type]
    assert (on.choices[0].message.model_extra or {})["reasoning_content"] == REASONING
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="specthink", messages=question,  # type: ignore[arg-type]
                                    extra_body={"chat_template_kwargs": [1]})
    assert "chat_template_kwargs" in str(refused.value)


@pytest.mark.parametrize(("family", "template_kwargs", "warning"), [
    ("gpt-oss", None, None),
    ("mistral-reasoning", None, None),
    ("gemma-4", None, None),
    ("gemma-4", {"enable_thinking": False}, "closes the reasoning"),
    ("phi-4-reasoning", None, None),
], ids=["gpt-oss", "mistral-reasoning", "gemma-4", "gemma-4-thinking-off", "phi-4-reasoning"])
def test_the_instruct_preset_is_suggested_only_when_the_small_model_will_not_reason(
        loopback_server: Callable[..., object], serve: Callable[..., Any],
        caplog: pytest.LogCaptureFixture, family: str,
        template_kwargs: dict[str, Any] | None, warning: str | None) -> None:
    """If this fails, ``serve`` in front of a gpt-oss, Ministral Reasoning or Gemma 4 pair,
    whose models write their reasoning's opener themselves (``<|channel|>analysis<|message|>``,
    ``[THINK]``, ``<|channel>thought``) after a prompt that opens none, tells the operator
    that no takeover will happen and to switch to ``--rules paper_instruct``, which is false
    (their takeovers are tested above); or it says nothing where Gemma 4's thinking is switched
    off, so its prompt closes the reasoning and no takeover can happen; or it takes the
    ``<think> {Thought section} </think>`` that Phi-4-reasoning's system text always writes for
    a reasoning its prompt closed. (The ChatML instruct pair under ``paper`` is warned:
    tests/serve/test_chat.py.)"""
    if family == "gpt-oss":
        pair = start(loopback_server)
        models = {"small_model": "openai/gpt-oss-20b", "target_model": "openai/gpt-oss-120b"}
    elif family in FAMILY_PAIRS:
        pair = start_family(loopback_server, family)
        small, target = FAMILY_PAIRS[family]
        models = {"small_model": small, "target_model": target}
    else:
        pair = required.start(loopback_server, family)  # type: ignore[arg-type]
        small, target = required.FAMILIES[family].models
        models = {"small_model": small, "target_model": target}
    with caplog.at_level(logging.WARNING, logger="specthink.serve"):
        serve(pair, backend="openai", small_template="server", target_template="server",
              response_template="auto", template_kwargs=template_kwargs, **models)
    suggestions = [r.getMessage() for r in caplog.records if "paper_instruct" in r.getMessage()]
    if warning is None:
        assert suggestions == []
    else:
        assert len(suggestions) == 1 and warning in suggestions[0], suggestions
