"""LlamaIndex on every family's scripted pair (tests/core/formats/family_pairs.py: vLLM-protocol
servers rendering the family's REAL chat template, named by model ids alone): ``achat``,
``astream_chat`` and ``achat_with_tools`` return exactly the answer as content, exactly the
reasoning as a ``ThinkingBlock``, the call exactly (the decoy drafted in the reasoning never
one), after a takeover; a tool's result is answered with the earlier turn's ``ThinkingBlock``
handed back to the template; a required call is made."""

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
from tests.core.formats.family_pairs import (
    ARGUMENTS,
    CALL_ID,
    FAMILIES,
    FINAL_ANSWER,
    FINAL_REASONING,
    PLAIN_ANSWER,
    PLAIN_REASONING,
    QUESTION,
    TOOL_DESCRIPTION,
    TOOL_RESULT,
    FamilyPair,
    start_family_pair,
)
from tests.core.formats.test_pair_formats import (
    ANSWER,
    FAMILY_PAIRS,
    REASONING,
    start_family,
)
from tests.support import ServerPair

EARLIER = "The user wants the weather in Paris; the tool knows it."
PLAIN_QUESTION = [ChatMessage(role="user", content="What is 12 * 13?")]


def get_weather(city: str, days: int = 1) -> str:
    """The weather of a city."""
    return f"Sunny in {city} for {days} day(s)."


WEATHER = FunctionTool.from_defaults(get_weather, description=TOOL_DESCRIPTION)


def llm(pair: FamilyPair) -> SpeculativeThinkingLLM:
    """The LlamaIndex LLM over ``pair``, named by its URLs and model ids only."""
    return SpeculativeThinkingLLM(**pair.settings)


def parts(response: ChatResponse) -> tuple[str, str, list[tuple[str, Any]]]:
    """``(reasoning, content, calls)`` of a response."""
    blocks = response.message.blocks
    reasoning = "".join(b.content or "" for b in blocks if isinstance(b, ThinkingBlock))
    calls = [(b.tool_name, b.tool_kwargs) for b in blocks if isinstance(b, ToolCallBlock)]
    return reasoning, response.message.content or "", calls


def takeovers(response: ChatResponse) -> int:
    return sum(response.message.additional_kwargs["speculative_thinking"]["takeovers"].values())


FAMILY = pytest.mark.parametrize("name", sorted(FAMILIES))


def test_the_weather_tool_has_the_families_schema() -> None:
    """If this fails, the LlamaIndex tool no longer offers what the families' scripted models
    call (``get_weather`` with a string ``city`` and an integer ``days``), and the family tests
    below test nothing."""
    spec = WEATHER.metadata.to_openai_tool()["function"]
    properties = spec["parameters"]["properties"]
    assert spec["name"] == "get_weather"
    assert (properties["city"]["type"], properties["days"]["type"]) == ("string", "integer")


@FAMILY
async def test_achat_and_astream_chat(loopback_server: Callable[..., object],
                                      name: str) -> None:
    """If this fails, LlamaIndex users of this family's pair get its reasoning in the content
    (or lose it), a streamed answer that differs from the whole one, or no takeover."""
    model = llm(start_family_pair(loopback_server, name))
    try:
        response = await model.achat(PLAIN_QUESTION)
        chunks = [chunk async for chunk in await model.astream_chat(PLAIN_QUESTION)]
    finally:
        await model.aclose()
    assert parts(response) == (PLAIN_REASONING, PLAIN_ANSWER, [])
    assert takeovers(response) >= 1
    streamed = "".join(chunk.delta or "" for chunk in chunks)
    thinking = "".join(chunk.additional_kwargs.get("thinking_delta", "") for chunk in chunks)
    assert (thinking, streamed) == (PLAIN_REASONING, PLAIN_ANSWER)
    assert parts(chunks[-1]) == (PLAIN_REASONING, PLAIN_ANSWER, [])
    assert takeovers(chunks[-1]) >= 1


@FAMILY
async def test_achat_with_tools(loopback_server: Callable[..., object], name: str) -> None:
    """If this fails, this family's call is left as text, the decoy drafted in its reasoning
    is taken for a call, an integer argument arrives as a string, or the reasoning or the
    content is not exactly the model's."""
    pair = start_family_pair(loopback_server, name)
    model = llm(pair)
    try:
        response = await model.achat_with_tools([WEATHER], user_msg=QUESTION)
        selections = model.get_tool_calls_from_response(response)
    finally:
        await model.aclose()
    family = pair.family
    assert parts(response) == (family.call_reasoning, family.call_answer,
                               [("get_weather", ARGUMENTS)])
    assert [(s.tool_name, s.tool_kwargs) for s in selections] == [("get_weather", ARGUMENTS)]
    assert takeovers(response) >= 1


@FAMILY
async def test_a_tools_result_is_answered_with_the_earlier_thinking(
        loopback_server: Callable[..., object], name: str) -> None:
    """If this fails, a LlamaIndex agent's tool loop on this family cannot go on after the
    tool's result, or drops the ``ThinkingBlock`` of the turn that called the tool where the
    family's template shows it on the next call."""
    pair = start_family_pair(loopback_server, name)
    family = pair.family
    model = llm(pair)
    history = [
        ChatMessage(role="user", content=QUESTION),
        ChatMessage(role="assistant", blocks=[
            ThinkingBlock(content=EARLIER), TextBlock(text=family.call_answer),
            ToolCallBlock(tool_call_id=CALL_ID, tool_name="get_weather",
                          tool_kwargs=ARGUMENTS)]),
        ChatMessage(role="tool", content=TOOL_RESULT,
                    additional_kwargs={"tool_call_id": CALL_ID, "name": "get_weather"}),
    ]
    try:
        response = await model.achat_with_tools([WEATHER], chat_history=history)
    finally:
        await model.aclose()
    assert parts(response) == (FINAL_REASONING, FINAL_ANSWER, [])
    assert takeovers(response) >= 1
    if family.shows_earlier_reasoning(EARLIER):
        answering = [prompt for prompt in pair.prompts if TOOL_RESULT in prompt]
        assert answering and all(EARLIER in prompt for prompt in answering)


@pytest.mark.parametrize("choice", [{"tool_required": True}, {"tool_choice": "get_weather"}],
                         ids=["required", "named"])
@FAMILY
async def test_a_required_call(loopback_server: Callable[..., object], name: str,
                               choice: dict[str, Any]) -> None:
    """If this fails, ``tool_required=True`` or a tool named by ``tool_choice`` on this family
    opens the call otherwise than its model writes one (the model breaks off) or the call is
    not read after the opener."""
    pair = start_family_pair(loopback_server, name)
    model = llm(pair)
    try:
        response = await model.achat_with_tools([WEATHER], user_msg=QUESTION, **choice)
    finally:
        await model.aclose()
    reasoning = pair.family.call_reasoning
    assert parts(response) == (reasoning, "", [("get_weather", ARGUMENTS)])
    # The call was opened for the model right after its reasoning: some prompt holds the
    # reasoning and then the call's name. (Left to choose, the model writes it itself, which a
    # prompt shows only where a takeover runs past the reasoning, as on Gemma 4; elsewhere the
    # empty content tells a required call from a chosen one.)
    assert any("get_weather" in prompt.rsplit(reasoning, 1)[1]
               for prompt in pair.prompts if reasoning in prompt)


async def test_a_calls_template_kwargs_switch_gemma4s_thinking_off(
        loopback_server: Callable[..., object]) -> None:
    """If this fails, a LlamaIndex caller cannot switch a Gemma 4 pair's thinking off for one
    call (``template_kwargs=``), or the switch outlives the call."""
    small, target = FAMILY_PAIRS["gemma-4"]
    pair: ServerPair = start_family(loopback_server, "gemma-4")
    model = SpeculativeThinkingLLM(small_url=pair.small.url, target_url=pair.target.url,
                                   backend="openai", small_template="server",
                                   target_template="server", small_model=small,
                                   target_model=target)
    try:
        off = await model.achat(PLAIN_QUESTION, template_kwargs={"enable_thinking": False})
        on = await model.achat(PLAIN_QUESTION)
    finally:
        await model.aclose()
    assert parts(off) == ("", ANSWER, []) and takeovers(off) == 0
    assert parts(on) == (REASONING, ANSWER, [])
