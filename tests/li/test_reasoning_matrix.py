"""The reasoning split of ``SpeculativeThinkingLLM`` on every server and template, and tool
calls read from the answer only.

Each server pair reports real model ids (the paper's DeepSeek-R1-Distill-Qwen 1.5B + 32B, a
Qwen3 thinking pair, a Qwen2.5 ChatML pair) and renders with that family's template, as TGI,
vLLM and llama.cpp do. The model is one reasoning script, written as each family writes it:
the R1 distills and Qwen3 thinking models were trained under templates that open ``<think>``
and never write the tag themselves (under any other template their reasoning arrives untagged);
the ChatML model writes it. Its reasoning says "Wait" after a blank line, so the target takes over
mid-reasoning and the split holds across authors; where tools are offered it drafts a decoy
``<tool_call>`` while thinking, which must never be executed. (The LangChain side of the same
matrix is ``tests/lc/integration/test_reasoning_matrix.py``.)
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal, NamedTuple

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import (
    ChatMessage,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.tools import FunctionTool

from specthink.testing import LoopbackServer, ThinkingModel
from specthink_li import SpeculativeThinkingLLM

from .li_support import ignore_memory_leak, workflow_agent

pytestmark = ignore_memory_leak

R1 = ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")
QWEN3 = ("Qwen/Qwen3-4B-Thinking-2507", "Qwen/QwQ-32B")
CHATML = ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-32B-Instruct")
R1_BOS = "<｜begin▁of▁sentence｜>"

QWEN3_THINKING = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
"""A Qwen3-thinking-style Jinja template the user passes: its generation prompt opens the
reasoning."""


# ---- the model's script ------------------------------------------------------------------

QUESTION = "What is 12 * 13?"
REASONING = "12 * 13 = 120 + 36.\n\nWait, let me check: 120 + 36 = 156."
ANSWER = "12 * 13 = 156."


def call(city: str, travellers: int) -> str:
    arguments = {"city": city, "travellers": travellers}
    return ("<tool_call>\n" + json.dumps({"name": "get_ticket_price", "arguments": arguments})
            + "\n</tool_call>")


DECOY = call("Oslo", 4)
"""Drafted inside the reasoning only: executing it is the bug."""
TICKETS = "How much are train tickets to Bergen for two?"
WALK = "Do I need a ticket to walk around Bergen?"
TICKETS_REASONING = ("The user wants a price.\n\nWait, maybe Oslo first:\n" + DECOY
                     + "\n\nNo, the question is about Bergen, for two travellers.")
WALK_REASONING = ("Walking is free.\n\nWait, should I look up a price anyway?\n" + DECOY
                  + "\n\nNo, there is nothing to buy.")
WALK_ANSWER = "No, walking around Bergen needs no ticket."
PRICED_REASONING = ("The tool answered 240 NOK.\n\nWait, call it again to be sure?\n" + DECOY
                    + "\n\nNo, one answer is enough.")
PRICED_ANSWER = "Two train tickets to Bergen cost 240 NOK."


def think(conversation: str) -> tuple[str, str]:
    """The whole output for a conversation: (reasoning, answer)."""
    if re.search(r"<tool_response>\s*240 NOK", conversation):
        return PRICED_REASONING, PRICED_ANSWER
    if WALK in conversation:
        return WALK_REASONING, WALK_ANSWER
    if TICKETS in conversation:
        return TICKETS_REASONING, call("Bergen", 2)
    if QUESTION in conversation:
        return REASONING, ANSWER
    return "", "I have no script for this."


# ---- the servers -------------------------------------------------------------------------

class Server(NamedTuple):
    flavor: Literal["tgi", "vllm", "llamacpp", "llama-cpp-python"]
    """Whose endpoints the loopback pair speaks."""
    models: tuple[str, str]
    """The small and target model ids; each server renders with its family's template."""

    @property
    def backend(self) -> Literal["tgi", "openai"]:
        return "tgi" if self.flavor == "tgi" else "openai"


class Case(NamedTuple):
    server: Server
    template: str
    """``small_template`` / ``target_template``: "auto" is the server's own rendering."""
    opens_reasoning: bool
    """The prompt sent ends inside ``<think>``, so the output starts in the reasoning."""


CASES = {
    # the server's own template (or, where the server renders none, the family's by model id)
    "tgi-r1-server": Case(Server("tgi", R1), "auto", True),
    "vllm-r1-server": Case(Server("vllm", R1), "auto", True),
    "llamacpp-r1-server": Case(Server("llamacpp", R1), "auto", True),
    "llama-cpp-python-r1-family": Case(Server("llama-cpp-python", R1), "auto", True),
    "llama-cpp-python-qwen3-family": Case(Server("llama-cpp-python", QWEN3), "auto", True),
    "tgi-qwen3-server": Case(Server("tgi", QWEN3), "auto", True),
    "vllm-qwen3-server": Case(Server("vllm", QWEN3), "auto", True),
    # a template the user names, rendered client-side
    "tgi-r1-builtin": Case(Server("tgi", R1), "deepseek-r1", True),
    "vllm-r1-builtin": Case(Server("vllm", R1), "deepseek-r1", True),
    "tgi-chatml": Case(Server("tgi", CHATML), "chatml", False),
    "vllm-chatml": Case(Server("vllm", CHATML), "chatml", False),
    "tgi-qwen3-jinja": Case(Server("tgi", QWEN3), QWEN3_THINKING, True),
    "vllm-qwen3-jinja": Case(Server("vllm", QWEN3), QWEN3_THINKING, True),
}
TOOL_CASES = ["tgi-r1-server", "vllm-r1-server", "llamacpp-r1-server",
              "llama-cpp-python-r1-family", "llama-cpp-python-qwen3-family",
              "tgi-qwen3-server", "vllm-qwen3-server",
              "tgi-chatml", "vllm-chatml"]
"""Cases whose templates render tools (a user's plain Jinja template may not)."""


class Pair(NamedTuple):
    small: LoopbackServer
    target: LoopbackServer


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[Server], Pair]]:
    """One loopback pair per flavour and model family, started on first use."""
    started: dict[Server, Pair] = {}

    def pair(server: Server) -> Pair:
        if server not in started:
            model = ThinkingModel(think, writes_start=server.models == CHATML)
            small, target = (LoopbackServer(model, model_id=model_id, flavor=server.flavor)
                             for model_id in server.models)
            started[server] = Pair(small.start(), target.start())
        found = started[server]
        found.small.reset()
        found.target.reset()
        return found

    yield pair
    for found in started.values():
        found.small.stop()
        found.target.stop()


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


def assert_prompt(case: Case, pair: Pair) -> None:
    """The small model saw the template the case names, once-BOS, and the target took over."""
    first = pair.small.records[0]
    assert first.prompt.endswith("<think>\n") is case.opens_reasoning, first.prompt
    assert not first.model_input.startswith(R1_BOS * 2)
    assert pair.target.records, "no takeover: the split was not tested across authors"


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
