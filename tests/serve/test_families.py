"""``specthink serve`` in front of a gpt-oss pair over vLLM-protocol servers that render the
real gpt-oss chat template (tests/core/formats/test_pair_formats.py sets it up), with
its model ids: through the openai SDK, the content is exactly the answer and
the reasoning exactly the reasoning, whole and streamed, after a takeover."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from specthink.formats.families import builtin_template
from tests.core.formats import test_pair_tool_choice as required
from tests.core.formats.test_pair_formats import (
    ANSWER,
    CALL_REASONING,
    CALL_TURN,
    EARLIER_REASONING,
    FAMILY_PAIRS,
    GPT_OSS_TEMPLATE_FILE,
    HARMONY_TOOLS,
    REASONING,
    WEATHER,
    XML_REASONING,
    start,
    start_family,
    start_qwen35,
    start_tool_loop,
)
from tests.serve.conftest import client


def test_gpt_oss_through_serve(loopback_server: Callable[..., object],
                               serve: Callable[..., Any]) -> None:
    """If this fails, an OpenAI client of a gpt-oss pair gets harmony's reasoning as content
    (or loses it), or the answer is cut."""
    served = serve(start(loopback_server), backend="openai", small_model="openai/gpt-oss-20b",
                   target_model="openai/gpt-oss-120b", small_template="server",
                   target_template="server")
    sdk = client(served)
    completion = sdk.chat.completions.create(
        model="specthink", messages=[{"role": "user", "content": "What is 12 * 13?"}])
    message = completion.choices[0].message
    assert message.content == ANSWER
    assert (message.model_extra or {})["reasoning_content"] == REASONING
    assert sum((completion.model_extra or {})["specthink"]["takeovers"].values()) >= 1
    content, reasoning = "", ""
    for chunk in sdk.chat.completions.create(
            model="specthink", messages=[{"role": "user", "content": "What is 12 * 13?"}],
            stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
    assert (content, reasoning) == (ANSWER, REASONING)


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
            {"role": "assistant", "content": None, field: EARLIER_REASONING,  # type: ignore[misc]
             "tool_calls": [{"id": "c1", "type": "function", "function": {
                 "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21 C"}])
    analysis = f"<|channel|>analysis<|message|>{EARLIER_REASONING}<|end|>"
    prompts = [r.model_input for s in (pair.small, pair.target) for r in s.records]
    assert prompts and all(analysis in prompt for prompt in prompts)
    assert completion.choices[0].message.content == ANSWER


@pytest.mark.parametrize("family", sorted(FAMILY_PAIRS))
def test_gemma4_and_ministral_through_serve(loopback_server: Callable[..., object],
                                            serve: Callable[..., Any], family: str) -> None:
    """If this fails, an OpenAI client of a Gemma 4 pair gets no reasoning (its thinking
    switch not on by default) or of a Ministral 3 Reasoning pair gets the ``[THINK]``
    reasoning as content, or no takeover happens."""
    small, target = FAMILY_PAIRS[family]
    served = serve(start_family(loopback_server, family), backend="openai", small_model=small,
                   target_model=target, small_template="server", target_template="server")
    completion = client(served).chat.completions.create(
        model="specthink", messages=[{"role": "user", "content": "What is 12 * 13?"}])
    message = completion.choices[0].message
    assert message.content == ANSWER
    assert (message.model_extra or {})["reasoning_content"] == REASONING
    assert sum((completion.model_extra or {})["specthink"]["takeovers"].values()) >= 1


@pytest.mark.parametrize("family", ["gpt-oss", "qwen3.5"])
def test_tool_calls_per_family_through_serve(loopback_server: Callable[..., object],
                                             serve: Callable[..., Any], family: str) -> None:
    """If this fails, an OpenAI client of a gpt-oss or Qwen3.5 pair gets the family's call as
    text (or none), the call drafted in the reasoning (the Oslo decoy) as a call, or loses the
    reasoning."""
    if family == "gpt-oss":
        pair = start_tool_loop(loopback_server, CALL_TURN)
        models = {"small_model": "openai/gpt-oss-20b", "target_model": "openai/gpt-oss-120b"}
        expected = (None, CALL_REASONING, [("get_weather", {"city": "Paris"})])
    else:
        pair = start_qwen35(loopback_server)
        models = {"small_model": "Qwen/Qwen3.5-4B", "target_model": "Qwen/Qwen3.5-27B"}
        expected = ("Let me check.", XML_REASONING,
                    [("get_weather", {"city": "Paris", "days": 2})])
    served = serve(pair, backend="openai", small_template="server", target_template="server",
                   **models)
    completion = client(served).chat.completions.create(
        model="specthink", tools=WEATHER,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    message = completion.choices[0].message
    calls = [(c.function.name, json.loads(c.function.arguments))
             for c in message.tool_calls or []]  # type: ignore[union-attr]
    assert (message.content or None, (message.model_extra or {})["reasoning_content"],
            calls) == expected
    assert completion.choices[0].finish_reason == "tool_calls"
    assert sum((completion.model_extra or {})["specthink"]["takeovers"].values()) >= 1


@pytest.mark.parametrize("choice", sorted(required.CHOICES))
@pytest.mark.parametrize("family", ["gpt-oss", "qwen3.5"])
def test_a_required_call_is_made_in_the_familys_syntax_through_serve(
        loopback_server: Callable[..., object], serve: Callable[..., Any], family: str,
        choice: str) -> None:
    """If this fails, an OpenAI client of a gpt-oss or Qwen3.5 pair whose models would answer
    in words, given tool_choice "required" or a named function, gets their words
    (finish_reason "stop") or a 400 instead of exactly that call: the engine no longer writes
    harmony's ``<|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json
    <|message|>`` or Qwen3.5's ``<tool_call>\\n<function=NAME>`` after the reasoning, whole
    or streamed."""
    pair = required.start(loopback_server, family)  # type: ignore[arg-type]
    small, target = required.FAMILIES[family].models
    served = serve(pair, backend="openai", small_model=small, target_model=target,
                   small_template="server", target_template="server")
    tool_choice, called = required.CHOICES[choice]
    tools = [required.WEATHER, required.TIME]
    sdk = client(served)
    completion = sdk.chat.completions.create(
        model="specthink", tools=tools, tool_choice=tool_choice,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    answer = completion.choices[0]
    assert answer.finish_reason == "tool_calls", answer.message
    assert [(c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
            for c in answer.message.tool_calls or []] == [called]
    assert not answer.message.content
    assert (answer.message.model_extra or {})["reasoning_content"] == required.REASONING
    names: list[str] = []
    arguments, finish = "", None
    for chunk in sdk.chat.completions.create(
            model="specthink", tools=tools, tool_choice=tool_choice,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "Weather in Paris?"}], stream=True):
        for delta in chunk.choices:
            finish = delta.finish_reason or finish
            for call in delta.delta.tool_calls or []:
                if call.function is not None:
                    names += [call.function.name] if call.function.name else []
                    arguments += call.function.arguments or ""
    assert (names, json.loads(arguments), finish) == ([called[0]], called[1], "tool_calls")


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
