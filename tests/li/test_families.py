"""LlamaIndex on family pairs over vLLM-protocol servers that render each family's REAL chat
template (tests/core/formats/test_pair_formats.py sets them up): ``achat`` and
``achat_with_tools`` return exactly the answer as content, exactly the reasoning as a
``ThinkingBlock``, the call exactly (a call drafted in the reasoning never one), after a
takeover; an earlier turn's ``ThinkingBlock`` goes back to the template."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.tools import FunctionTool

from specthink_li import SpeculativeThinkingLLM
from tests.core.formats.test_pair_formats import (
    ANSWER,
    CALL_REASONING,
    CALL_TURN,
    EARLIER_REASONING,
    FAMILY_PAIRS,
    REASONING,
    XML_REASONING,
    start_family,
    start_qwen35,
    start_tool_loop,
)
from tests.support import ServerPair

GPT_OSS = {"small_model": "openai/gpt-oss-20b", "target_model": "openai/gpt-oss-120b"}
QWEN35_MODELS = {"small_model": "Qwen/Qwen3.5-4B", "target_model": "Qwen/Qwen3.5-27B"}


def get_weather(city: str, days: int = 1) -> str:
    """The weather of a city."""
    return f"Sunny in {city} for {days} day(s)."


WEATHER = FunctionTool.from_defaults(get_weather)


def llm(pair: ServerPair, models: dict[str, str]) -> SpeculativeThinkingLLM:
    return SpeculativeThinkingLLM(small_url=pair.small.url, target_url=pair.target.url,
                                  backend="openai", small_template="server",
                                  target_template="server", **models)


def parts(response: ChatResponse) -> tuple[str, str, list[tuple[str, Any]]]:
    """``(reasoning, content, calls)`` of a response."""
    blocks = response.message.blocks
    reasoning = "".join(b.content or "" for b in blocks if isinstance(b, ThinkingBlock))
    calls = [(b.tool_name, b.tool_kwargs) for b in blocks if isinstance(b, ToolCallBlock)]
    return reasoning, response.message.content or "", calls


def takeovers(response: ChatResponse) -> int:
    return sum(response.message.additional_kwargs["speculative_thinking"]["takeovers"].values())


async def test_achat_on_gpt_oss(loopback_server: Callable[..., object]) -> None:
    """If this fails, LlamaIndex users of a gpt-oss pair get harmony's reasoning in the
    content, lose it, or get no takeover."""
    model = llm(start_tool_loop(loopback_server), GPT_OSS)
    try:
        response = await model.achat([ChatMessage(role="user", content="What is 12 * 13?")])
    finally:
        await model.aclose()
    assert parts(response) == (REASONING, ANSWER, [])
    assert takeovers(response) >= 1


async def test_achat_with_tools_on_gpt_oss(loopback_server: Callable[..., object]) -> None:
    """If this fails, a gpt-oss call (``to=functions.NAME``) is not a LlamaIndex tool call, a
    call drafted in the reasoning is executed, or the reasoning is not exactly the analysis."""
    model = llm(start_tool_loop(loopback_server, CALL_TURN), GPT_OSS)
    try:
        response = await model.achat_with_tools([WEATHER], user_msg="Weather in Paris?")
        selections = model.get_tool_calls_from_response(response)
    finally:
        await model.aclose()
    assert parts(response) == (CALL_REASONING, "", [("get_weather", {"city": "Paris"})])
    assert [(s.tool_name, s.tool_kwargs) for s in selections] == [
        ("get_weather", {"city": "Paris"})]
    assert takeovers(response) >= 1


async def test_achat_with_tools_on_qwen35(loopback_server: Callable[..., object]) -> None:
    """If this fails, a Qwen3.5 / Nemotron 3 XML call is left as text or executed from the
    reasoning (the Oslo decoy), or an integer argument arrives as a string."""
    model = llm(start_qwen35(loopback_server), QWEN35_MODELS)
    try:
        response = await model.achat_with_tools([WEATHER], user_msg="Weather in Paris?")
    finally:
        await model.aclose()
    assert parts(response) == (XML_REASONING, "Let me check.",
                               [("get_weather", {"city": "Paris", "days": 2})])
    assert takeovers(response) >= 1


async def test_a_thinking_block_goes_back_to_the_template(
        loopback_server: Callable[..., object]) -> None:
    """If this fails, a LlamaIndex agent's tool loop on gpt-oss drops the reasoning of the
    turn that called the tool, which gpt-oss's template shows on the next call."""
    pair = start_tool_loop(loopback_server)
    model = llm(pair, GPT_OSS)
    history = [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(role="assistant", blocks=[
            ThinkingBlock(content=EARLIER_REASONING), TextBlock(text=""),
            ToolCallBlock(tool_call_id="c1", tool_name="get_weather",
                          tool_kwargs={"city": "Paris"})]),
        ChatMessage(role="tool", content="Sunny, 21 C",
                    additional_kwargs={"tool_call_id": "c1", "name": "get_weather"}),
    ]
    try:
        response = await model.achat_with_tools([WEATHER], chat_history=history)
    finally:
        await model.aclose()
    analysis = f"<|channel|>analysis<|message|>{EARLIER_REASONING}<|end|>"
    prompts = [r.model_input for s in (pair.small, pair.target) for r in s.records]
    assert prompts and all(analysis in prompt for prompt in prompts)
    assert parts(response) == (REASONING, ANSWER, [])


@pytest.mark.parametrize("family", sorted(FAMILY_PAIRS))
async def test_achat_on_gemma4_and_ministral(loopback_server: Callable[..., object],
                                             family: str) -> None:
    """If this fails, LlamaIndex users of a Gemma 4 pair get no reasoning (its thinking switch
    not on by default) or of a Ministral 3 Reasoning pair get ``[THINK]`` reasoning as the
    answer, or no takeover happens."""
    small, target = FAMILY_PAIRS[family]
    model = llm(start_family(loopback_server, family),
                {"small_model": small, "target_model": target})
    try:
        response = await model.achat([ChatMessage(role="user", content="What is 12 * 13?")])
    finally:
        await model.aclose()
    assert parts(response) == (REASONING, ANSWER, [])
    assert takeovers(response) >= 1


async def test_a_calls_template_kwargs_switch_gemma4s_thinking_off(
        loopback_server: Callable[..., object]) -> None:
    """If this fails, a LlamaIndex caller cannot switch a Gemma 4 pair's thinking off for one
    call (``template_kwargs=``), or the switch outlives the call."""
    small, target = FAMILY_PAIRS["gemma-4"]
    model = llm(start_family(loopback_server, "gemma-4"),
                {"small_model": small, "target_model": target})
    question = [ChatMessage(role="user", content="What is 12 * 13?")]
    try:
        off = await model.achat(question, template_kwargs={"enable_thinking": False})
        on = await model.achat(question)
    finally:
        await model.aclose()
    assert parts(off) == ("", ANSWER, []) and takeovers(off) == 0
    assert parts(on) == (REASONING, ANSWER, [])
