"""LangChain on a gpt-oss pair over vLLM-protocol servers that render the real gpt-oss chat
template (tests/core/formats/test_pair_formats.py sets it up): the family's response template
splits what the adapter returns."""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("langchain_core")

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from specthink_lc import ChatSpeculativeThinking
from tests.core.formats.test_pair_formats import (
    ANSWER,
    CALL_REASONING,
    CALL_TURN,
    EARLIER_REASONING,
    FAMILY_PAIRS,
    HARMONY_TOOLS,
    REASONING,
    WEATHER,
    XML_REASONING,
    start,
    start_family,
    start_qwen35,
    start_tool_loop,
)


async def test_langchain_on_the_gpt_oss_pair(loopback_server: Callable[..., object]) -> None:
    """If this fails, LangChain users of a gpt-oss pair get harmony's reasoning in the content
    (or lose it): named by its model ids alone, the content is exactly the answer and
    ``reasoning_content`` exactly the reasoning, invoked or streamed."""
    pair = start(loopback_server)
    model = ChatSpeculativeThinking(
        small_url=pair.small.url, target_url=pair.target.url, backend="openai",
        small_model="openai/gpt-oss-20b", target_model="openai/gpt-oss-120b",
        small_template="server", target_template="server")
    try:
        message = await model.ainvoke("What is 12 * 13?")
        assert message.content == ANSWER
        assert message.additional_kwargs["reasoning_content"] == REASONING
        assert sum(message.response_metadata["speculative_thinking"]["takeovers"].values()) >= 1
        content, reasoning = "", ""
        async for chunk in model.astream("What is 12 * 13?"):
            content += str(chunk.content)
            reasoning += chunk.additional_kwargs.get("reasoning_content", "")
        assert (content, reasoning) == (ANSWER, REASONING)
    finally:
        await model.aclose()


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


@pytest.mark.parametrize("family", sorted(FAMILY_PAIRS))
async def test_langchain_on_gemma4_and_ministral(loopback_server: Callable[..., object],
                                                 family: str) -> None:
    """If this fails, LangChain users of a Gemma 4 pair get no reasoning (its thinking switch
    is not on by default) or of a Ministral 3 Reasoning pair get ``[THINK]`` reasoning as the
    answer: named by their model ids alone, content and reasoning are exact, invoked or
    streamed, after a takeover."""
    pair = start_family(loopback_server, family)
    small, target = FAMILY_PAIRS[family]
    model = ChatSpeculativeThinking(
        small_url=pair.small.url, target_url=pair.target.url, backend="openai",
        small_model=small, target_model=target, small_template="server",
        target_template="server")
    try:
        message = await model.ainvoke("What is 12 * 13?")
        assert message.content == ANSWER
        assert message.additional_kwargs["reasoning_content"] == REASONING
        assert sum(message.response_metadata["speculative_thinking"]["takeovers"].values()) >= 1
        content, reasoning = "", ""
        async for chunk in model.astream("What is 12 * 13?"):
            content += str(chunk.content)
            reasoning += chunk.additional_kwargs.get("reasoning_content", "")
        assert (content, reasoning) == (ANSWER, REASONING)
    finally:
        await model.aclose()


@pytest.mark.parametrize("family", ["gpt-oss", "qwen3.5"])
async def test_bind_tools_per_family(loopback_server: Callable[..., object],
                                     family: str) -> None:
    """If this fails, a LangChain agent on a gpt-oss or Qwen3.5 pair gets its family's call
    as text (or no call), executes the call drafted in the reasoning (the Oslo decoy), or
    loses the reasoning, whole or streamed."""
    if family == "gpt-oss":
        pair = start_tool_loop(loopback_server, CALL_TURN)
        models = {"small_model": "openai/gpt-oss-20b", "target_model": "openai/gpt-oss-120b"}
        expected = ("", CALL_REASONING, [("get_weather", {"city": "Paris"})])
    else:
        pair = start_qwen35(loopback_server)
        models = {"small_model": "Qwen/Qwen3.5-4B", "target_model": "Qwen/Qwen3.5-27B"}
        expected = ("Let me check.", XML_REASONING,
                    [("get_weather", {"city": "Paris", "days": 2})])
    model = ChatSpeculativeThinking(
        small_url=pair.small.url, target_url=pair.target.url, backend="openai",
        small_template="server", target_template="server",
        **models)
    bound = model.bind_tools(WEATHER)
    try:
        message = await bound.ainvoke("Weather in Paris?")
        assert (message.content, message.additional_kwargs["reasoning_content"],
                [(c["name"], c["args"]) for c in message.tool_calls]) == expected
        assert sum(message.response_metadata["speculative_thinking"]["takeovers"].values()) >= 1
        streamed = None
        async for chunk in bound.astream("Weather in Paris?"):
            streamed = chunk if streamed is None else streamed + chunk
        assert streamed is not None
        assert (streamed.content, streamed.additional_kwargs["reasoning_content"],
                [(c["name"], c["args"]) for c in streamed.tool_calls]) == expected
    finally:
        await model.aclose()


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
