"""The reasoning split of ``SpeculativeThinkingLLM`` on every server and template, and tool
calls read from the answer only.

The servers, models and script are ``tests/reasoning_support.py``'s (its docstring says why
they look as they do); the LangChain side of the same matrix is
``tests/lc/integration/test_reasoning_matrix.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import (
    ChatMessage,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.tools import FunctionTool

from specthink_li import SpeculativeThinkingLLM
from tests.reasoning_support import (
    ANSWER,
    CASES,
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
    think,
)

from .li_support import ignore_memory_leak, workflow_agent

pytestmark = ignore_memory_leak


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[Server], Pair]]:
    yield from loopback_pairs(think)


Build = Callable[[Case], tuple[SpeculativeThinkingLLM, Pair]]


@pytest.fixture
async def llm(servers: Callable[[Server], Pair]) -> AsyncIterator[Build]:
    """``llm(case)``: an LLM over the case's pair, closed after the test."""
    made: list[SpeculativeThinkingLLM] = []

    def build(case: Case) -> tuple[SpeculativeThinkingLLM, Pair]:
        pair = servers(case.server)
        made.append(SpeculativeThinkingLLM(
            small_url=pair.small.url, target_url=pair.target.url, backend=case.server.backend,
            small_template=case.template, target_template=case.template, max_retries=0))
        return made[-1], pair

    yield build
    for model in made:
        await model.aclose()


def thinking(message: ChatMessage) -> str:
    return "".join(b.content or "" for b in message.blocks if isinstance(b, ThinkingBlock))


def calls_of(message: ChatMessage) -> list[dict[str, Any]]:
    return [b.tool_kwargs for b in message.blocks if isinstance(b, ToolCallBlock)]  # type: ignore[misc]


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


# ---- the reasoning split -----------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
async def test_achat_puts_the_reasoning_in_a_thinking_block(llm: Build, name: str) -> None:
    """Broken if ``message.content`` holds the reasoning or ``</think>``, or no ThinkingBlock
    holds it (the output was read as if it began outside the reasoning while the prompt had
    opened it, or the reverse), or if the prompt tokens LlamaIndex counts are not the small
    server's count."""
    case = CASES[name]
    model, pair = llm(case)
    response = await model.achat(user(QUESTION))
    assert response.message.content == ANSWER
    assert thinking(response.message) == REASONING
    assert isinstance(response.message.blocks[0], ThinkingBlock)
    assert_prompt(case, pair)
    assert response.additional_kwargs["prompt_tokens"] == pair.small.records[0].prompt_tokens


@pytest.mark.parametrize("name", CASES)
async def test_astream_chat_streams_the_reasoning_as_thinking_deltas(llm: Build,
                                                                     name: str) -> None:
    """Broken if a streamed ``delta`` holds reasoning or a tag, or the ``thinking_delta``
    pieces (what LlamaIndex agents show as thinking) do not add up to the ThinkingBlock."""
    case = CASES[name]
    model, pair = llm(case)
    items = [item async for item in await model.astream_chat(user(QUESTION))]
    assert "".join(item.delta or "" for item in items) == ANSWER
    assert "".join(item.additional_kwargs.get("thinking_delta", "") for item in items) \
        == REASONING
    assert all("think>" not in (item.delta or "") for item in items)
    assert items[-1].message.content == ANSWER
    assert thinking(items[-1].message) == REASONING
    assert_prompt(case, pair)


@pytest.mark.parametrize("name", CASES)
async def test_acomplete_returns_the_answer_only(llm: Build, name: str) -> None:
    """Broken if a completion's ``text`` or streamed deltas (what query engines show) hold the
    reasoning."""
    case = CASES[name]
    model, pair = llm(case)
    completion = await model.acomplete(QUESTION)
    assert completion.text == ANSWER
    assert_prompt(case, pair)
    pieces = [item.delta or "" async for item in await model.astream_complete(QUESTION)]
    assert "".join(pieces) == ANSWER


# ---- a decoy tool call in the reasoning --------------------------------------------------

def ticket_tool(calls: list[tuple[str, int]]) -> FunctionTool:
    def get_ticket_price(city: str, travellers: int) -> str:
        """The price of train tickets to a city for a number of travellers."""
        calls.append((city, travellers))
        return "240 NOK" if (city, travellers) == ("Bergen", 2) else "unknown"
    return FunctionTool.from_defaults(get_ticket_price)


@pytest.mark.parametrize("streaming", [False, True], ids=["achat", "astream"])
@pytest.mark.parametrize("name", TOOL_CASES)
async def test_chat_with_tools_reads_calls_from_the_answer_only(llm: Build, name: str,
                                                                streaming: bool) -> None:
    """Broken if a ``<tool_call>`` drafted inside the reasoning becomes a ToolCallBlock (an
    agent would run ``get_ticket_price('Oslo', 4)``), or if the answer's own call is lost."""
    model, _ = llm(CASES[name])
    tools = [ticket_tool([])]
    for question, reasoning, calls in [
            (TICKETS, TICKETS_REASONING, [{"city": "Bergen", "travellers": 2}]),
            (WALK, WALK_REASONING, [])]:
        if streaming:
            stream = await model.astream_chat_with_tools(tools, user_msg=question)
            response = [item async for item in stream][-1]
        else:
            response = await model.achat_with_tools(tools, user_msg=question)
        assert calls_of(response.message) == calls
        selected = model.get_tool_calls_from_response(response, error_on_no_tool_call=False)
        assert [s.tool_kwargs for s in selected] == calls
        assert response.message.content == ("" if calls else WALK_ANSWER)
        assert thinking(response.message) == reasoning


@workflow_agent
@pytest.mark.parametrize("streaming", [False, True], ids=["not-streaming", "streaming"])
@pytest.mark.parametrize("question", [TICKETS, WALK], ids=["answer-calls", "answer-only"])
@pytest.mark.parametrize("name", TOOL_CASES)
async def test_a_function_agent_runs_only_the_answers_tool_call(
        llm: Build, name: str, question: str, streaming: bool) -> None:
    """Broken if a FunctionAgent executes a call the model only drafted while thinking: the
    tool must run exactly once with the answer's arguments, or not at all. On TGI the tool turn
    is rendered client-side (TGI flattens tool calls), so this also breaks if the two renderings
    disagree about where the reasoning starts."""
    calls: list[tuple[str, int]] = []
    model, _ = llm(CASES[name])
    agent = FunctionAgent(tools=[ticket_tool(calls)], llm=model, streaming=streaming)
    response = await agent.run(user_msg=question)
    if question == TICKETS:
        assert calls == [("Bergen", 2)]
        assert str(response) == PRICED_ANSWER
    else:
        assert calls == []
        assert str(response) == WALK_ANSWER


# ---- tool turns: the prompt is rendered client-side on TGI --------------------------------

TOOL_TURNS = [
    ChatMessage(role="user", content=TICKETS),
    ChatMessage(role="assistant", blocks=[
        TextBlock(text=""),
        ToolCallBlock(tool_call_id="call_1", tool_name="get_ticket_price",
                      tool_kwargs={"city": "Bergen", "travellers": 2})]),
    ChatMessage(role="tool", content="240 NOK", additional_kwargs={"tool_call_id": "call_1"}),
]


@pytest.mark.parametrize("name", TOOL_CASES)
async def test_after_a_tool_turn_achat_and_astream_split_alike(llm: Build, name: str) -> None:
    """After a tool result, ``achat`` and ``astream_chat`` must make the same decision about
    where the reasoning starts (they once decided separately and disagreed on TGI, whose tool
    turns are rendered with the family template rather than by the server). Broken if the
    answer holds the reasoning, or the decoy in it becomes a call."""
    model, pair = llm(CASES[name])
    tools = [ticket_tool([])]
    chatted = await model.achat_with_tools(tools, chat_history=TOOL_TURNS)
    stream = await model.astream_chat_with_tools(tools, chat_history=TOOL_TURNS)
    streamed = [item async for item in stream][-1]
    for response in (chatted, streamed):
        assert response.message.content == PRICED_ANSWER
        assert calls_of(response.message) == []
        assert thinking(response.message) == PRICED_REASONING
    assert "<tool_response>\n240 NOK\n</tool_response>" in pair.small.records[0].prompt
