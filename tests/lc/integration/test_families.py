"""LangChain on every family's pair over vLLM-protocol servers that render the family's REAL chat
template (tests/core/formats/family_pairs.py sets them up), named by model ids alone: the
family's response template splits what the adapter returns, invoked or streamed, with tools
bound, after a tool's result and with a required call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.runnables import Runnable

from specthink_lc import ChatSpeculativeThinking
from tests.core.formats.family_pairs import (
    ARGUMENTS,
    CALL_ID,
    FAMILIES,
    FINAL_ANSWER,
    FINAL_REASONING,
    PLAIN_ANSWER,
    PLAIN_REASONING,
    QUESTION,
    TOOL_RESULT,
    WEATHER,
    start_family_pair,
)
from tests.core.formats.test_pair_formats import (
    ANSWER,
    EARLIER_REASONING,
    FAMILY_PAIRS,
    HARMONY_TOOLS,
    REASONING,
    start_family,
    start_tool_loop,
)


@pytest.mark.parametrize("earlier", [
    AIMessage(content="", additional_kwargs={"reasoning_content": EARLIER_REASONING},
              tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}]),
    AIMessage(content=[{"type": "reasoning", "reasoning": EARLIER_REASONING}],
              tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}]),
], ids=["additional_kwargs", "reasoning-block"])
async def test_langchain_hands_a_tool_turns_reasoning_back(
        loopback_server: Callable[..., object], earlier: AIMessage) -> None:
    """If this fails, a LangChain tool loop on gpt-oss loses the reasoning of the turn that
    called the tool: its template shows it as that turn's analysis (``thinking``) on the next
    call, and the model continues a conversation it did not write."""
    pair = start_tool_loop(loopback_server)
    model = ChatSpeculativeThinking(
        small_url=pair.small.url, target_url=pair.target.url, backend="openai",
        small_model="openai/gpt-oss-20b", target_model="openai/gpt-oss-120b",
        small_template="server", target_template="server")
    history: list[BaseMessage] = [HumanMessage("Weather in Paris?"), earlier,
                                  ToolMessage("Sunny, 21 C", tool_call_id="c1")]
    try:
        message = await model.bind_tools(HARMONY_TOOLS).ainvoke(history)
    finally:
        await model.aclose()
    analysis = f"<|channel|>analysis<|message|>{EARLIER_REASONING}<|end|>"
    prompts = [r.model_input for s in (pair.small, pair.target) for r in s.records]
    assert prompts and all(analysis in prompt for prompt in prompts)
    assert message.content == ANSWER
    assert message.additional_kwargs["reasoning_content"] == REASONING


async def test_a_calls_template_kwargs_switch_gemma4s_thinking_off(
        loopback_server: Callable[..., object]) -> None:
    """If this fails, a LangChain caller cannot switch a Gemma 4 pair's thinking off for one
    call (``template_kwargs=`` as a call argument), or the switch outlives the call."""
    small, target = FAMILY_PAIRS["gemma-4"]
    pair = start_family(loopback_server, "gemma-4")
    model = ChatSpeculativeThinking(
        small_url=pair.small.url, target_url=pair.target.url, backend="openai",
        small_model=small, target_model=target, small_template="server",
        target_template="server")
    try:
        off = await model.ainvoke("What is 12 * 13?",
                                  template_kwargs={"enable_thinking": False})
        on = await model.ainvoke("What is 12 * 13?")
    finally:
        await model.aclose()
    assert (off.content, off.additional_kwargs.get("reasoning_content")) == (ANSWER, None)
    assert on.additional_kwargs["reasoning_content"] == REASONING


def parts(message: BaseMessage) -> tuple[object, str, list[tuple[str, object]]]:
    """``(content, reasoning, calls)`` of an AI message or its accumulated chunks."""
    assert isinstance(message, AIMessage)
    return (message.content, message.additional_kwargs.get("reasoning_content", ""),
            [(call["name"], call["args"]) for call in message.tool_calls])


async def whole_and_streamed(runnable: Runnable[Any, BaseMessage], question: Any
                             ) -> tuple[AIMessage, AIMessage]:
    """The runnable's answer invoked, then streamed and accumulated."""
    message = await runnable.ainvoke(question)
    streamed: Any = None
    async for chunk in runnable.astream(question):
        streamed = chunk if streamed is None else streamed + chunk
    assert isinstance(message, AIMessage) and isinstance(streamed, AIMessage)
    return message, streamed


def takeovers(message: AIMessage) -> int:
    return sum(message.response_metadata["speculative_thinking"]["takeovers"].values())


@pytest.mark.parametrize("name", sorted(FAMILIES))
async def test_each_familys_answer(loopback_server: Callable[..., object], name: str) -> None:
    """If this fails, LangChain users of this family's pair get its reasoning in the content
    (or lose it) or no takeover, invoked or streamed."""
    pair = start_family_pair(loopback_server, name)
    model = ChatSpeculativeThinking(**pair.settings)
    try:
        message, streamed = await whole_and_streamed(model, "What is 12 * 13?")
    finally:
        await model.aclose()
    assert parts(message) == parts(streamed) == (PLAIN_ANSWER, PLAIN_REASONING, [])
    assert takeovers(message) >= 1


@pytest.mark.parametrize("name", sorted(FAMILIES))
async def test_each_familys_call_with_bind_tools(loopback_server: Callable[..., object],
                                                 name: str) -> None:
    """If this fails, a LangChain agent on this family's pair gets the family's call as text
    (or no call), executes the call drafted in the reasoning (the Oslo decoy), or loses the
    reasoning, whole or streamed."""
    pair = start_family_pair(loopback_server, name)
    model = ChatSpeculativeThinking(**pair.settings)
    try:
        message, streamed = await whole_and_streamed(model.bind_tools(WEATHER), QUESTION)
    finally:
        await model.aclose()
    family = pair.family
    expected = (family.call_answer, family.call_reasoning, [("get_weather", ARGUMENTS)])
    assert parts(message) == parts(streamed) == expected
    assert takeovers(message) >= 1


@pytest.mark.parametrize("name", sorted(FAMILIES))
async def test_each_family_answers_a_tools_result(loopback_server: Callable[..., object],
                                                  name: str) -> None:
    """If this fails, a LangChain tool loop on this family's pair cannot go on after the
    tool's result, or the reasoning of the turn that called the tool does not reach a template
    that shows it (gpt-oss, Gemma 4, Qwen3.5, Nemotron 3...)."""
    pair = start_family_pair(loopback_server, name)
    model = ChatSpeculativeThinking(**pair.settings)
    history: list[BaseMessage] = [
        HumanMessage(QUESTION),
        AIMessage(content=pair.family.call_answer,
                  additional_kwargs={"reasoning_content": EARLIER_REASONING},
                  tool_calls=[{"name": "get_weather", "args": ARGUMENTS, "id": CALL_ID}]),
        ToolMessage(TOOL_RESULT, tool_call_id=CALL_ID)]
    try:
        message = await model.bind_tools(WEATHER).ainvoke(history)
    finally:
        await model.aclose()
    assert parts(message) == (FINAL_ANSWER, FINAL_REASONING, [])
    assert takeovers(message) >= 1
    if pair.family.shows_earlier_reasoning(EARLIER_REASONING):
        answering = [prompt for prompt in pair.prompts if TOOL_RESULT in prompt]
        assert answering and all(EARLIER_REASONING in prompt for prompt in answering)


@pytest.mark.parametrize("choice", ["get_weather", "any"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
async def test_each_family_makes_a_required_call(loopback_server: Callable[..., object],
                                                 name: str, choice: str) -> None:
    """If this fails, ``bind_tools(tool_choice=...)`` on this family's pair opens the call
    otherwise than the family's model writes one, or the call is not read after it."""
    pair = start_family_pair(loopback_server, name)
    model = ChatSpeculativeThinking(**pair.settings)
    try:
        message = await model.bind_tools(WEATHER, tool_choice=choice).ainvoke(QUESTION)
    finally:
        await model.aclose()
    assert parts(message)[1:] == (pair.family.call_reasoning, [("get_weather", ARGUMENTS)])
