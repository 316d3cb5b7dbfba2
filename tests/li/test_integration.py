"""SpeculativeThinkingLLM inside LlamaIndex's query engines, chat engines and agents, against two
``specthink.testing`` servers on loopback."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent
from llama_index.core.base.response.schema import AsyncStreamingResponse
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool

from specthink import BackendConnectionError, BackendTimeoutError, SpecthinkError
from specthink.testing import LatencyModel, LoopbackServer, TextModel, last_user_message
from specthink_li import SpeculativeThinkingLLM

from .li_support import PromptReader, ignore_memory_leak, workflow_agent

pytestmark = ignore_memory_leak


class Pair:
    """Two loopback servers (small, target) running the same deterministic model."""

    def __init__(self, model: TextModel, **options: object) -> None:
        self.small = LoopbackServer(model, model_id="test/small-1.5b", **options)  # type: ignore[arg-type]
        self.target = LoopbackServer(model, model_id="test/target-32b", **options)  # type: ignore[arg-type]

    def __enter__(self) -> Pair:
        self.small.start()
        self.target.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.small.stop()
        self.target.stop()

    def llm(self, **kwargs: object) -> SpeculativeThinkingLLM:
        return SpeculativeThinkingLLM(small_url=self.small.url, target_url=self.target.url,
                                      **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def served() -> Iterator[list[SpeculativeThinkingLLM]]:
    """Collects the LLMs a test builds and closes their connections afterwards."""
    made: list[SpeculativeThinkingLLM] = []
    yield made
    for llm in made:
        llm.close()


# ---- a query engine answers from retrieved text ------------------------------------------

FACTS = [
    "Zembla is a small island nation in the northern sea. The capital of Zembla is Vrell.",
    "The national dish of Zembla is smoked herring with rye bread.",
    "Zembla's parliament meets twice a year in a wooden hall.",
]


def reading_model() -> PromptReader:
    """Answers a question about a capital from the context in its prompt, as a RAG model
    should, and admits when the context does not say."""
    def answer(conversation: str) -> str:
        found = re.search(r"The capital of (\w+) is (\w+)\.", conversation)
        thinking = ("<think>\nThe context should name the capital.\n\n"
                    "Wait, let me check the context again.\n</think>\n\n")
        if found is None:
            return thinking + "The context does not say."
        return thinking + f"The capital of {found[1]} is {found[2]}."
    return PromptReader(answer)


def test_a_query_engine_answers_from_retrieved_text(
        served: list[SpeculativeThinkingLLM]) -> None:
    with Pair(reading_model()) as pair:
        llm = pair.llm()
        served.append(llm)
        index = VectorStoreIndex.from_documents([Document(text=t) for t in FACTS],
                                                embed_model=MockEmbedding(embed_dim=8))
        engine = index.as_query_engine(llm=llm, similarity_top_k=len(FACTS))
        response = engine.query("What is the capital of Zembla?")
        assert str(response) == "The capital of Zembla is Vrell."
        assert any("Vrell" in node.get_content() for node in response.source_nodes)
        prompt = pair.small.records[0].prompt
        assert "The capital of Zembla is Vrell." in prompt  # it came from retrieval
        assert any(r.path == "/generate_stream" for r in pair.target.records)  # a takeover


async def test_a_streaming_query_engine_streams_the_answer() -> None:
    with Pair(reading_model()) as pair:
        llm = pair.llm()
        index = VectorStoreIndex.from_documents([Document(text=t) for t in FACTS],
                                                embed_model=MockEmbedding(embed_dim=8))
        engine = index.as_query_engine(llm=llm, streaming=True, similarity_top_k=len(FACTS))
        response = await engine.aquery("What is the capital of Zembla?")
        assert isinstance(response, AsyncStreamingResponse)
        pieces = [piece async for piece in response.async_response_gen()]
        await llm.aclose()
    assert "".join(pieces) == "The capital of Zembla is Vrell."


# ---- a chat engine keeps history ---------------------------------------------------------

def remembering_model() -> PromptReader:
    def answer(conversation: str) -> str:
        question = last_user_message(conversation + "<|im_start|>")
        if "What is my name?" in question:
            named = re.search(r"My name is (\w+)", conversation)
            return f"Your name is {named[1]}." if named else "You did not tell me."
        return "Nice to meet you."
    return PromptReader(answer)


def test_a_chat_engine_keeps_history(served: list[SpeculativeThinkingLLM]) -> None:
    with Pair(remembering_model()) as pair:
        llm = pair.llm()
        served.append(llm)
        engine = SimpleChatEngine.from_defaults(llm=llm)
        assert str(engine.chat("My name is Ada.")) == "Nice to meet you."
        assert str(engine.chat("What is my name?")) == "Your name is Ada."
        assert [m.role.value for m in engine.chat_history] == [
            "user", "assistant", "user", "assistant"]
        last_prompt = pair.small.records[-1].prompt
        assert "<|im_start|>assistant\nNice to meet you.<|im_end|>" in last_prompt


async def test_a_streaming_chat_engine_keeps_history() -> None:
    with Pair(remembering_model()) as pair:
        llm = pair.llm()
        engine = SimpleChatEngine.from_defaults(llm=llm)
        first = await engine.astream_chat("My name is Ada.")
        assert "".join([t async for t in first.async_response_gen()]) == "Nice to meet you."
        second = await engine.astream_chat("What is my name?")
        assert "".join([t async for t in second.async_response_gen()]) == "Your name is Ada."
        await llm.aclose()


# ---- agents call a Python tool -----------------------------------------------------------

def multiplier(calls: list[tuple[int, int]]) -> FunctionTool:
    def multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        calls.append((a, b))
        return a * b
    return FunctionTool.from_defaults(multiply)


def react_model() -> PromptReader:
    """Follows LlamaIndex's ReAct format: an action first, the answer once it has observed."""
    def answer(conversation: str) -> str:
        observed = re.search(r"Observation: (\d+)", conversation)
        thinking = "<think>\nI should multiply.\n\nYes, the tool does that.\n</think>\n\n"
        if observed:
            return (thinking + "Thought: I can answer without using any more tools.\n"
                    f"Answer: 12 times 13 is {observed[1]}.")
        return (thinking + "Thought: I need to use a tool to help me answer the question.\n"
                'Action: multiply\nAction Input: {"a": 12, "b": 13}')
    return PromptReader(answer)


def function_model() -> PromptReader:
    """Calls the offered tool in the Hermes format, then answers from its response."""
    def answer(conversation: str) -> str:
        result = re.search(r"<tool_response>\n(\d+)\n</tool_response>", conversation)
        if result:
            return f"12 times 13 is {result[1]}."
        if "<tools>" not in conversation:
            return "I have no tool for that."
        return ("<think>\nThe multiply tool fits.\n\nWait, check the arguments: 12 and 13.\n"
                "</think>\n\n"
                '<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 13}}\n</tool_call>')
    return PromptReader(answer)


@workflow_agent
@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "not-streaming"])
async def test_a_react_agent_calls_a_tool_and_returns_its_result(streaming: bool) -> None:
    calls: list[tuple[int, int]] = []
    with Pair(react_model()) as pair:
        llm = pair.llm()
        agent = ReActAgent(tools=[multiplier(calls)], llm=llm, streaming=streaming)
        response = await agent.run(user_msg="What is 12 * 13?")
        await llm.aclose()
    assert calls == [(12, 13)]
    assert str(response) == "12 times 13 is 156."


@workflow_agent
@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "not-streaming"])
async def test_a_function_agent_calls_a_tool_and_returns_its_result(streaming: bool) -> None:
    calls: list[tuple[int, int]] = []
    with Pair(function_model()) as pair:
        # A ChatML model whose id names no family: TGI would flatten the tool turns, so the
        # conversation is rendered client-side, as the caller says.
        llm = pair.llm(small_template="chatml", target_template="chatml")
        agent = FunctionAgent(tools=[multiplier(calls)], llm=llm, streaming=streaming)
        response = await agent.run(user_msg="What is 12 * 13?")
        await llm.aclose()
    assert calls == [(12, 13)]
    assert str(response) == "12 times 13 is 156."
    # The tool result went back as a Hermes <tool_response> after the rendered call.
    second = pair.small.records[-1].prompt
    assert '"name": "multiply"' in second and "<tool_response>\n156\n</tool_response>" in second


# ---- concurrency, metadata, failures -----------------------------------------------------

async def test_async_calls_run_concurrently() -> None:
    """Broken if ``achat`` serialised requests (a blocking call, a lock, a thread hop with one
    worker): then no two server requests would ever be in flight at once. Each answer waits
    0.6 s on the server's latency model, far longer than the client needs to start one."""
    model = PromptReader(lambda c: f"Answer to {last_user_message(c)}: " + "tick " * 5)
    with Pair(model, latency=LatencyModel(per_token=0.05)) as pair:
        llm = pair.llm()
        questions = [f"question {n}" for n in range(16)]
        responses = await asyncio.gather(*(
            llm.achat([ChatMessage(role="user", content=q)]) for q in questions))
        await llm.aclose()
        records = pair.small.records
    assert [r.message.content for r in responses] == [
        f"Answer to {q}: " + "tick " * 5 for q in questions]
    assert len(records) == 16 and all(r.finished is not None for r in records)
    in_flight = max(sum(1 for r in records if r.started <= at < (r.finished or 0))
                    for at in (r.started for r in records))
    assert in_flight >= 8, in_flight


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_leaving_a_stream_early_closes_the_server_stream(kind: str) -> None:
    """Broken if an abandoned stream kept generating: the server must see the client leave."""
    model = PromptReader(lambda c: "word " * 200)
    with Pair(model, latency=LatencyModel(per_token=0.01)) as pair:
        llm = pair.llm()
        question = [ChatMessage(role="user", content="Talk.")]
        if kind == "sync":
            stream = llm.stream_chat(question)
            for chunk in stream:
                if chunk.delta:
                    break
            stream.close()
        else:
            astream = await llm.astream_chat(question)
            async for chunk in astream:
                if chunk.delta:
                    break
            await astream.aclose()
        for _ in range(500):  # the server notices the hang-up on its own schedule
            record = pair.small.records[-1]
            if record.disconnected:
                break
            await asyncio.sleep(0.01)
        if kind == "sync":
            llm.close()
        else:
            await llm.aclose()
    assert record.disconnected
    assert record.tokens_sent < 200


async def test_metadata_comes_from_the_servers_info() -> None:
    with Pair(reading_model()) as pair:
        pair.target.max_input_tokens = 3000
        llm = pair.llm(max_tokens=256)
        meta = await llm.afetch_metadata()
        await llm.aclose()
    assert meta.context_window == 3000
    assert meta.num_output == 256
    assert meta.model_name == "test/small-1.5b + test/target-32b"


def test_metadata_after_a_call_is_what_the_call_learnt() -> None:
    """If this fails, ``metadata`` stays at LlamaIndex's 3,900-token default and names the
    URLs after calls (which fetch the servers' limits for the engine, not for the adapter), so
    query engines plan prompts for 3,900 tokens against 32k servers."""
    with Pair(reading_model(), max_input_tokens=32767, max_total_tokens=32768) as pair:
        llm = pair.llm()
        before = llm.metadata
        llm.chat([ChatMessage(role="user", content="Hello")])
        after = llm.metadata
        llm.close()
    assert before.context_window == 3900
    assert after.context_window == 32767
    assert after.model_name == "test/small-1.5b + test/target-32b"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_an_unreachable_server_raises_a_specthink_error() -> None:
    port = free_port()  # nothing listens there: connections are refused at once
    llm = SpeculativeThinkingLLM(small_url=f"http://127.0.0.1:{port}",
                                 target_url=f"http://127.0.0.1:{port}", max_retries=0)
    with pytest.raises(BackendConnectionError) as caught:
        await asyncio.wait_for(llm.achat([ChatMessage(role="user", content="Hi")]), 30)
    await llm.aclose()
    assert isinstance(caught.value, SpecthinkError)
    assert f"127.0.0.1:{port}" in str(caught.value)


def test_an_unreachable_server_raises_from_sync_calls_too() -> None:
    port = free_port()
    llm = SpeculativeThinkingLLM(small_url=f"http://127.0.0.1:{port}",
                                 target_url=f"http://127.0.0.1:{port}", max_retries=0)
    with pytest.raises(BackendConnectionError, match=str(port)):
        llm.chat([ChatMessage(role="user", content="Hi")])
    llm.close()


async def test_a_server_that_never_answers_times_out(silent_server: str) -> None:
    llm = SpeculativeThinkingLLM(small_url=silent_server, target_url=silent_server,
                                 timeout=0.3, max_retries=0)
    with pytest.raises(BackendTimeoutError):
        await asyncio.wait_for(llm.achat([ChatMessage(role="user", content="Hi")]), 30)
    await llm.aclose()
