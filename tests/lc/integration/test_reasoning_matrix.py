"""The reasoning split of ``ChatSpeculativeThinking`` on every server and template, and tool
calls read from the answer only.

The servers, models and script are ``tests/reasoning_support.py``'s (its docstring says why
they look as they do); the LlamaIndex side of the same matrix is
``tests/li/test_reasoning_matrix.py``.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Callable, Iterator
from functools import reduce
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.structured_output import ProviderStrategy, ToolStrategy
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from specthink_lc import ChatSpeculativeThinking
from tests.reasoning_support import (
    ANSWER,
    CASES,
    PRICED,
    PRICED_ANSWER,
    PRICED_REASONING,
    QUESTION,
    REASONING,
    TICKETS,
    TICKETS_REASONING,
    TOOL_CASES,
    WALK,
    WALK_ANSWER,
    WALK_REASONING,
    Case,
    Pair,
    Server,
    assert_prompt,
    loopback_pairs,
)
from tests.reasoning_support import think as script

STRUCTURED = "Give the price of two train tickets to Bergen."
STRUCTURED_REASONING = ("It is 240 NOK.\n\nWait, first draft it with a wrong amount:\n"
                        '<tool_call>\n{"name": "TicketPrice", "arguments": {"amount": 999}}\n'
                        '</tool_call>\n{"amount": 999}\n\nNo, the amount is 240.')
"""A drafted call of the schema's tool and drafted JSON, both wrong: parsing either is the bug."""
STRUCTURED_CALL = ('<tool_call>\n{"name": "TicketPrice", "arguments": {"amount": 240}}\n'
                   "</tool_call>")


CITY = "Describe Bergen in numbers."
CITY_REASONING = "Bergen is a city of about 291,000 people.\n\nWait, is that right? Yes."
CITY_CALL = ('<tool_call>\n{"name": "CityFacts", "arguments": {"name": "Bergen", '
             '"population": 291000}}\n</tool_call>')
"""The schema's object dressed up as a call of the schema's name, which no tool has."""


def think(conversation: str) -> tuple[str, str]:
    """The whole output for a conversation: (reasoning, answer); the structured-output
    conversations here, the rest as the shared script writes them."""
    if CITY in conversation:
        return CITY_REASONING, CITY_CALL
    if STRUCTURED in conversation:
        if "<tools>" in conversation:  # a forced call of the schema's tool
            return STRUCTURED_REASONING, STRUCTURED_CALL
        return STRUCTURED_REASONING, '{"amount": 240}'
    if PRICED.search(conversation):
        if '"name": "TicketPrice"' in conversation:  # create_agent's ToolStrategy
            return STRUCTURED_REASONING, STRUCTURED_CALL
        if '"amount"' in conversation:  # ProviderStrategy: the schema is in the prompt
            return STRUCTURED_REASONING, '{"amount": 240}'
    return script(conversation)


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[Server], Pair]]:
    yield from loopback_pairs(think)


Chat = Callable[..., tuple[ChatSpeculativeThinking, Pair]]


@pytest.fixture
async def chat(servers: Callable[[Server], Pair]) -> AsyncIterator[Chat]:
    """``chat(case, **options)``: a model over the case's pair, closed after the test."""
    made: list[ChatSpeculativeThinking] = []

    def build(case: Case, **options: Any) -> tuple[ChatSpeculativeThinking, Pair]:
        pair = servers(case.server)
        model = ChatSpeculativeThinking(
            small_url=pair.small.url, target_url=pair.target.url, backend=case.server.backend,
            small_template=case.template, target_template=case.template, max_retries=0,
            **options)
        made.append(model)
        return model, pair

    yield build
    for model in made:
        await model.aclose()
        model.close()


def assert_split(message: AIMessage, reasoning: str, answer: str) -> None:
    assert message.content == answer
    assert message.additional_kwargs["reasoning_content"].strip() == reasoning


# ---- the reasoning split -----------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_invoke_puts_the_reasoning_in_reasoning_content(chat: Chat, name: str) -> None:
    """Broken if ``content`` holds the reasoning or ``</think>`` (the adapter read the output as
    if it began outside the reasoning while the prompt had opened it, or the reverse), or if
    ``input_tokens`` is not the prompt as the small server counted it."""
    case = CASES[name]
    model, pair = chat(case)
    message = model.invoke(QUESTION)
    assert_split(message, REASONING, ANSWER)
    assert_prompt(case, pair)
    assert message.usage_metadata is not None
    assert message.usage_metadata["input_tokens"] == pair.small.records[0].prompt_tokens


@pytest.mark.parametrize("name", CASES)
async def test_ainvoke_puts_the_reasoning_in_reasoning_content(chat: Chat, name: str) -> None:
    """Broken if the async path splits differently from ``invoke``."""
    case = CASES[name]
    model, pair = chat(case)
    message = await model.ainvoke(QUESTION)
    assert_split(message, REASONING, ANSWER)
    assert_prompt(case, pair)


@pytest.mark.parametrize("name", CASES)
def test_stream_sends_reasoning_and_answer_in_separate_chunks(chat: Chat, name: str) -> None:
    """Broken if a streamed chunk's text holds reasoning or a tag, if a chunk mixes both kinds,
    or if the chunks add up to a different message than ``invoke`` gives."""
    case = CASES[name]
    model, pair = chat(case)
    chunks = list(model.stream(QUESTION))
    for chunk in chunks:
        assert not (chunk.content and chunk.additional_kwargs.get("reasoning_content"))
        assert "think>" not in chunk.text
    assert "".join(chunk.text for chunk in chunks) == ANSWER
    message = reduce(operator.add, chunks)
    assert_split(message, REASONING, ANSWER)
    assert_prompt(case, pair)
    assert message.usage_metadata is not None
    assert message.usage_metadata["input_tokens"] == pair.small.records[0].prompt_tokens


@pytest.mark.parametrize("name", CASES)
async def test_astream_sends_reasoning_and_answer_in_separate_chunks(chat: Chat,
                                                                     name: str) -> None:
    """Broken if the async stream splits differently from the sync one."""
    case = CASES[name]
    model, pair = chat(case)
    chunks = [chunk async for chunk in model.astream(QUESTION)]
    assert all(not (c.content and c.additional_kwargs.get("reasoning_content")) for c in chunks)
    assert_split(reduce(operator.add, chunks), REASONING, ANSWER)
    assert_prompt(case, pair)


@pytest.mark.parametrize("name", CASES)
def test_output_version_v1_gives_a_reasoning_block(chat: Chat, name: str) -> None:
    """Broken if LangChain's standard content blocks lose the reasoning or show it as text."""
    case = CASES[name]
    model, pair = chat(case, output_version="v1")
    message = model.invoke(QUESTION)
    blocks = message.content_blocks
    assert [block["type"] for block in blocks] == ["reasoning", "text"]
    assert str(blocks[0].get("reasoning")).strip() == REASONING
    assert blocks[1].get("text") == ANSWER
    assert_prompt(case, pair)


# ---- a decoy tool call in the reasoning --------------------------------------------------

def ticket_tool(calls: list[tuple[str, int]]) -> Any:
    @tool
    def get_ticket_price(city: str, travellers: int) -> str:
        """The price of train tickets to a city for a number of travellers."""
        calls.append((city, travellers))
        return "240 NOK" if (city, travellers) == ("Bergen", 2) else "unknown"
    return get_ticket_price


@pytest.mark.parametrize("streaming", [False, True], ids=["invoke", "stream"])
@pytest.mark.parametrize("name", TOOL_CASES)
def test_bind_tools_reads_calls_from_the_answer_only(chat: Chat, name: str,
                                                     streaming: bool) -> None:
    """Broken if a ``<tool_call>`` drafted inside the reasoning becomes a tool call (the agent
    would run ``get_ticket_price('Oslo', 4)``), or if the answer's own call is lost."""
    model, _ = chat(CASES[name])
    bound = model.bind_tools([ticket_tool([])])
    for question, reasoning, calls in [
            (TICKETS, TICKETS_REASONING, [{"city": "Bergen", "travellers": 2}]),
            (WALK, WALK_REASONING, [])]:
        if streaming:
            message: AIMessage = reduce(operator.add, bound.stream(question))
        else:
            message = bound.invoke(question)
        assert [call["args"] for call in message.tool_calls] == calls
        assert message.content == ("" if calls else WALK_ANSWER)
        assert message.additional_kwargs["reasoning_content"].strip() == reasoning


@pytest.mark.parametrize("name", TOOL_CASES)
@pytest.mark.parametrize("question", [TICKETS, WALK], ids=["answer-calls", "answer-only"])
async def test_create_agent_runs_only_the_answers_tool_call(chat: Chat, name: str,
                                                            question: str) -> None:
    """Broken if a LangChain agent executes a call the model only drafted while thinking: the
    tool must run exactly once with the answer's arguments, or not at all. On TGI the tool turn
    is rendered client-side (TGI flattens tool calls), so this also breaks if the two renderings
    disagree about where the reasoning starts."""
    calls: list[tuple[str, int]] = []
    model, _ = chat(CASES[name])
    agent = create_agent(model, tools=[ticket_tool(calls)])
    state = await agent.ainvoke({"messages": [HumanMessage(question)]})
    final = state["messages"][-1]
    if question == TICKETS:
        assert calls == [("Bergen", 2)]
        assert final.content == PRICED_ANSWER
        assert final.additional_kwargs["reasoning_content"].strip() == PRICED_REASONING
    else:
        assert calls == []
        assert final.content == WALK_ANSWER
    assert all("</think>" not in str(m.content) for m in state["messages"])


@pytest.mark.parametrize("name", TOOL_CASES)
async def test_create_agent_streaming_runs_only_the_answers_tool_call(chat: Chat,
                                                                      name: str) -> None:
    """Broken if the streamed path (``stream_mode="messages"`` streams the model's chunks)
    turns the decoy into a call, or shows reasoning as message text."""
    calls: list[tuple[str, int]] = []
    model, _ = chat(CASES[name])
    agent = create_agent(model, tools=[ticket_tool(calls)])
    shown = []
    async for chunk, _meta in agent.astream({"messages": [HumanMessage(TICKETS)]},
                                            stream_mode="messages"):
        if isinstance(chunk, AIMessageChunk):
            shown.append(chunk.text)
    assert calls == [("Bergen", 2)]
    assert "".join(shown) == PRICED_ANSWER


class TicketPrice(BaseModel):
    """The price of the tickets."""

    amount: int


@pytest.mark.parametrize(("name", "method"), [
    ("tgi-r1-server", "function_calling"), ("vllm-r1-server", "function_calling"),
    ("vllm-qwen3-server", "function_calling"), ("tgi-chatml", "function_calling"),
    # TGI constrains json_schema output with a grammar (the model writes JSON at once, which a
    # scripted model cannot show); vLLM's answer is parsed.
    ("vllm-r1-server", "json_schema"), ("vllm-qwen3-server", "json_schema"),
    ("vllm-chatml", "json_schema"),
])
def test_structured_output_is_read_from_the_answer_only(chat: Chat, name: str,
                                                        method: str) -> None:
    """Broken if ``with_structured_output`` parses a call or JSON the model drafted while
    thinking (999) instead of the answer's (240), or fails on reasoning text."""
    model, _ = chat(CASES[name])
    structured = model.with_structured_output(TicketPrice, method=method,  # type: ignore[arg-type]
                                              include_raw=True)
    out = structured.invoke(STRUCTURED)
    assert isinstance(out, dict)
    assert out["parsed"] == TicketPrice(amount=240), out["parsing_error"]
    assert out["raw"].additional_kwargs["reasoning_content"].strip() == STRUCTURED_REASONING


@pytest.mark.parametrize("strategy", [ToolStrategy, ProviderStrategy])
@pytest.mark.parametrize("name", ["tgi-r1-server", "vllm-r1-server", "tgi-qwen3-server",
                                  "vllm-chatml"])
async def test_create_agent_structured_response_comes_from_the_answer(
        chat: Chat, name: str, strategy: type[ToolStrategy[Any] | ProviderStrategy[Any]]) -> None:
    """Broken if an agent's ``response_format`` is filled from a call or JSON drafted in the
    reasoning (999), if the drafted ticket call runs, or if ProviderStrategy's schema together
    with the tools forced a grammar that left the tools uncallable."""
    calls: list[tuple[str, int]] = []
    model, pair = chat(CASES[name])
    agent = create_agent(model, tools=[ticket_tool(calls)], response_format=strategy(TicketPrice))
    state = await agent.ainvoke({"messages": [HumanMessage(TICKETS)]})
    assert calls == [("Bergen", 2)]
    assert state["structured_response"] == TicketPrice(amount=240)
    assert all("grammar" not in record.parameters for record in pair.small.records)


class CityFacts(BaseModel):
    """Facts about a city."""

    name: str
    population: int


@pytest.mark.parametrize("name", ["tgi-r1-server", "vllm-chatml"])
async def test_provider_strategy_with_tools_takes_a_call_of_no_tool_as_the_answer(
        chat: Chat, name: str) -> None:
    """Broken if a call naming a function that was not offered (the schema's ``CityFacts``)
    becomes a tool call: the agent answers it with "not a valid tool" and loops until
    ``GraphRecursionError``. It must be the answer, the schema's JSON."""
    calls: list[tuple[str, int]] = []
    model, _ = chat(CASES[name])
    agent = create_agent(model, tools=[ticket_tool(calls)],
                         response_format=ProviderStrategy(CityFacts))
    state = await agent.ainvoke({"messages": [HumanMessage(CITY)]}, {"recursion_limit": 6})
    assert state["structured_response"] == CityFacts(name="Bergen", population=291000)
    assert calls == []
    final = state["messages"][-1]
    assert not final.tool_calls
    assert final.additional_kwargs["reasoning_content"].strip() == CITY_REASONING


# ---- tool turns: the prompt is rendered client-side on TGI --------------------------------

TOOL_TURNS = [
    HumanMessage(TICKETS),
    AIMessage("", tool_calls=[{"name": "get_ticket_price", "id": "call_1",
                               "args": {"city": "Bergen", "travellers": 2}}]),
    ToolMessage("240 NOK", tool_call_id="call_1"),
]


@pytest.mark.parametrize("name", TOOL_CASES)
def test_after_a_tool_turn_invoke_and_stream_split_alike(chat: Chat, name: str) -> None:
    """After a tool result, ``invoke`` and ``stream`` must make the same decision about where
    the reasoning starts (they once decided separately and disagreed on TGI, whose tool turns
    are rendered with the family template rather than by the server). Broken if the answer
    holds the reasoning, or the decoy in it becomes a call."""
    model, pair = chat(CASES[name])
    bound = model.bind_tools([ticket_tool([])])
    invoked = bound.invoke(TOOL_TURNS)
    streamed: AIMessage = reduce(operator.add, bound.stream(TOOL_TURNS))
    for message in (invoked, streamed):
        assert message.content == PRICED_ANSWER
        assert message.tool_calls == []
        assert message.additional_kwargs["reasoning_content"].strip() == PRICED_REASONING
    prompt = pair.small.records[0].prompt
    assert "<tool_response>\n240 NOK\n</tool_response>" in prompt
