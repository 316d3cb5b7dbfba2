"""The agent clients that default to the Responses API, pointed at ``specthink serve`` with a base
URL only: LangChain ``ChatOpenAI(use_responses_api=True)``, the OpenAI Agents SDK (``Agent`` +
``Runner.run`` on its default Responses model, tracing off: no network), and LlamaIndex's
``OpenAILikeResponses``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from agents import Agent, RunConfig, Runner, function_tool
from agents.models.openai_provider import OpenAIProvider
from agents.models.openai_responses import OpenAIResponsesModel
from langchain_core.messages import AIMessage, AIMessageChunk, ToolMessage
from langchain_openai import ChatOpenAI
from llama_index.core.base.llms.types import ChatMessage
from llama_index.llms.openai_like import OpenAILikeResponses

from .conftest import Served
from .test_chat import HELLO_REASONING
from .test_responses import WEATHER

Http = tuple[httpx.Client, httpx.AsyncClient]


@pytest.fixture
async def http() -> AsyncIterator[Http]:
    """HTTP clients the framework clients use, closed when the test ends."""
    with httpx.Client(timeout=30) as sync_client:
        async with httpx.AsyncClient(timeout=30) as async_client:
            yield sync_client, async_client


def chat_openai(served: Served, http: Http, **options: object) -> ChatOpenAI:
    return ChatOpenAI(model="specthink", base_url=served.base_url, api_key="unused",
                      max_retries=0, http_client=http[0], http_async_client=http[1],
                      use_responses_api=True, **options)  # type: ignore[arg-type]


def responses_answered(served: Served) -> float:
    return served.metrics.responses.labels("200")._value.get()


def responses_answered_reach(served: Served, count: float) -> float:
    """The count once it reaches ``count`` (a response is counted just after its last byte,
    so the client can be done first), or as it stands after 5 s."""
    for _ in range(100):
        if responses_answered(served) >= count:
            break
        time.sleep(0.05)
    return responses_answered(served)


def test_langchain_use_responses_api_invoke_and_stream(fresh: Served, http: Http) -> None:
    """ChatOpenAI on the Responses API: the answer as text, the reasoning as a reasoning block
    (which it reads from Responses, unlike from chat), usage with reasoning tokens, streamed or
    not. Failing: a field it sends is refused, or the events do not rebuild the answer."""
    before = responses_answered(fresh)
    model = chat_openai(fresh, http)
    message = model.invoke("hello there")
    assert isinstance(message, AIMessage)
    assert message.text == "You said: hello there"
    reasoning = message.content[0]
    assert isinstance(reasoning, dict) and reasoning["type"] == "reasoning"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": HELLO_REASONING}]
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_token_details"]["reasoning"] > 0
    assert message.response_metadata["id"].startswith("resp_")
    chunks = list(model.stream("hello there"))
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined = joined + chunk
    assert isinstance(joined, AIMessageChunk)
    assert joined.text == "You said: hello there"
    assert joined.usage_metadata is not None and joined.usage_metadata["output_tokens"] > 0
    assert responses_answered_reach(fresh, before + 2) == before + 2


async def test_langchain_use_responses_api_bind_tools_round_trip(fresh: Served,
                                                                 http: Http) -> None:
    """bind_tools, the call, the ToolMessage turn and the answer, async and streamed: the
    function_call and function_call_output items LangChain sends back are understood."""
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
    assert answer.text == "The tool says: Rain, 12 C"


async def test_openai_agents_sdk_runs_a_tool_loop(fresh: Served) -> None:
    """The Agents SDK's Runner.run with a function tool on its default (Responses) model: the
    model calls the tool, the SDK runs it and sends the output back, the model answers.
    Failing: the SDK cannot parse our response or never leaves its tool loop."""
    ran: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        ran.append(city)
        return "Sunny, 24 C"

    before = responses_answered(fresh)
    async with openai.AsyncOpenAI(base_url=fresh.base_url, api_key="unused",
                                  max_retries=0) as sdk:
        provider = OpenAIProvider(openai_client=sdk)
        agent = Agent(name="weather", instructions="Use the tools.", model="specthink",
                      tools=[get_weather])
        result = await Runner.run(agent, "What is the weather in Paris?", run_config=RunConfig(
            model_provider=provider, tracing_disabled=True))
        assert isinstance(provider.get_model("specthink"), OpenAIResponsesModel)
    assert ran == ["Paris"]
    assert result.final_output == "The tool says: Sunny, 24 C"
    assert responses_answered_reach(fresh, before + 2) == before + 2
    assert "Use the tools." in fresh.pair.small.records[-1].prompt


async def test_openai_agents_sdk_streamed_run(fresh: Served) -> None:
    """Runner.run_streamed consumes our event stream to the final output."""
    async with openai.AsyncOpenAI(base_url=fresh.base_url, api_key="unused",
                                  max_retries=0) as sdk:
        agent = Agent(name="echo", model="specthink")
        run = Runner.run_streamed(agent, "hello there", run_config=RunConfig(
            model_provider=OpenAIProvider(openai_client=sdk), tracing_disabled=True))
        kinds = [event.type async for event in run.stream_events()]
    assert run.final_output == "You said: hello there"
    assert "raw_response_event" in kinds


def llama_index(served: Served, http: Http) -> OpenAILikeResponses:
    return OpenAILikeResponses(model="specthink", api_base=served.base_url, api_key="unused",
                               is_function_calling_model=True, max_retries=0,
                               context_window=8192, http_client=http[0],
                               async_http_client=http[1])


def test_llama_index_openai_like_responses_chat_and_stream(fresh: Served, http: Http) -> None:
    """LlamaIndex's Responses-API LLM chats and streams; the answer is the message text."""
    llm = llama_index(fresh, http)
    response = llm.chat([ChatMessage(role="user", content="hello there")])
    assert response.message.content == "You said: hello there"
    pieces = [r.delta or "" for r in llm.stream_chat(
        [ChatMessage(role="user", content="hello there")])]
    assert "".join(pieces) == "You said: hello there"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_llama_index_openai_like_responses_tool_call(fresh: Served, http: Http) -> None:
    from llama_index.core.tools import FunctionTool

    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "Sunny"

    llm = llama_index(fresh, http)
    response = await llm.achat_with_tools([FunctionTool.from_defaults(get_weather)],
                                          user_msg="What is the weather in Paris?")
    calls = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_langchain_use_previous_response_id(fresh: Served, http: Http) -> None:
    """ChatOpenAI(use_previous_response_id=True) sends only the new turn and the id of its
    last answer: the server starts from the stored conversation. Failing: LangChain's
    stateful mode gets a 404, or the model sees only the last message."""
    sent: list[dict[str, Any]] = []

    def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    with httpx.Client(timeout=30, event_hooks={"request": [record]}) as recording:
        model = chat_openai(fresh, (recording, http[1]), use_previous_response_id=True)
        first = model.invoke("hello there")
        second = model.invoke([("user", "hello there"), first, ("user", "how are you")])
    assert second.text == "You said: how are you"
    assert sent[1]["previous_response_id"] == first.response_metadata["id"]
    assert [item.get("content") for item in sent[1]["input"]] == ["how are you"]
    prompt = fresh.pair.small.records[-1].prompt
    assert "<|im_start|>user\nhello there<|im_end|>" in prompt
    assert "You said: hello there" in prompt
