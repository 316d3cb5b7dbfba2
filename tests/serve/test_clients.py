"""Framework clients that only take a base URL: LangChain's ``ChatOpenAI`` and LlamaIndex's
``OpenAILike`` talk to ``specthink serve`` as to any OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, ToolMessage
from langchain_openai import ChatOpenAI
from llama_index.core.base.llms.types import ChatMessage, ThinkingBlock
from llama_index.llms.openai_like import OpenAILike

from .conftest import Served
from .test_tools import WEATHER


@pytest.fixture
async def http() -> AsyncIterator[tuple[httpx.Client, httpx.AsyncClient]]:
    """HTTP clients the framework clients use, closed when the test ends (theirs would be
    left to the garbage collector)."""
    with httpx.Client(timeout=30) as sync_client:
        async with httpx.AsyncClient(timeout=30) as async_client:
            yield sync_client, async_client


Http = tuple[httpx.Client, httpx.AsyncClient]


def chat_openai(served: Served, http: Http, **options: object) -> ChatOpenAI:
    return ChatOpenAI(model="specthink", base_url=served.base_url, api_key="unused",
                      max_retries=0, http_client=http[0], http_async_client=http[1],
                      **options)  # type: ignore[arg-type]


def test_langchain_chat_openai_invoke_and_stream(fresh: Served, http: Http) -> None:
    """ChatOpenAI gets the answer (it drops the reasoning fields, as it does from vLLM) and the
    usage with reasoning tokens, streamed or not. Failing: a field ChatOpenAI sends is refused,
    or the stream does not join to the answer."""
    model = chat_openai(fresh, http)
    message = model.invoke("hello there")
    assert message.content == "You said: hello there"
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_token_details"]["reasoning"] > 0
    chunks = list(chat_openai(fresh, http, stream_usage=True).stream("hello there"))
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined = joined + chunk
    assert isinstance(joined, AIMessageChunk)
    assert joined.content == "You said: hello there"
    assert joined.usage_metadata is not None and joined.usage_metadata["output_tokens"] > 0


async def test_langchain_tool_calling_round_trip(fresh: Served, http: Http) -> None:
    """bind_tools, the tool call, the ToolMessage turn and the final answer, async."""
    model = chat_openai(fresh, http).bind_tools([WEATHER])
    question = "What is the weather in Paris?"
    first = await model.ainvoke(question)
    assert isinstance(first, AIMessage)
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    streamed = [chunk async for chunk in model.astream(question)]
    joined = streamed[0]
    for chunk in streamed[1:]:
        joined = joined + chunk
    assert isinstance(joined, AIMessageChunk)
    assert [c["name"] for c in joined.tool_calls] == ["get_weather"]
    answer = await model.ainvoke([("user", question), first, ToolMessage(
        "Rain, 12 C", tool_call_id=first.tool_calls[0]["id"])])
    assert answer.content == "The tool says: Rain, 12 C"


def test_langchain_structured_output_by_json_schema(fresh: Served, http: Http) -> None:
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    structured = chat_openai(fresh, http).with_structured_output(Person, method="json_schema")
    person = structured.invoke("Who is Ada?")
    assert person == Person(name="Ada", age=36)


def llama_index(served: Served, http: Http) -> OpenAILike:
    return OpenAILike(model="specthink", api_base=served.base_url, api_key="unused",
                      is_chat_model=True, is_function_calling_model=True, max_retries=0,
                      context_window=8192, http_client=http[0], async_http_client=http[1])


def test_llama_index_openai_like_chat_reads_the_reasoning(fresh: Served, http: Http) -> None:
    """OpenAILike reads reasoning_content into a ThinkingBlock and the answer into content.
    Failing: the reasoning field it reads is missing or holds answer text."""
    llm = llama_index(fresh, http)
    response = llm.chat([ChatMessage(role="user", content="hello there")])
    assert response.message.content == "You said: hello there"
    thinking = [b for b in response.message.blocks if isinstance(b, ThinkingBlock)]
    assert len(thinking) == 1 and "Wait, let me think" in (thinking[0].content or "")


def test_llama_index_openai_like_stream(fresh: Served, http: Http) -> None:
    """OpenAILike skips a first stream chunk without content; ours has content "" and every
    piece arrives. Failing: the stream's first text is lost."""
    pieces = [r.delta or "" for r in llama_index(fresh, http).stream_chat(
        [ChatMessage(role="user", content="hello there")])]
    assert "".join(pieces) == "You said: hello there"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_llama_index_tool_call(fresh: Served, http: Http) -> None:
    from llama_index.core.tools import FunctionTool

    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "Sunny"

    llm = llama_index(fresh, http)
    response = await llm.achat_with_tools([FunctionTool.from_defaults(get_weather)],
                                          user_msg="What is the weather in Paris?")
    calls = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("get_weather", {"city": "Paris"})]
