"""ChatSpeculativeThinking over in-process scripted models (no sockets).

The models are deterministic functions of the prompt (``specthink.testing.models``); small and
target usually share one script, so a takeover changes who wrote a piece of text but not the text.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast
from uuid import UUID

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.language_models import LanguageModelInput
from langchain_core.load import dumpd, dumps, load
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk, LLMResult
from langchain_core.tools import tool
from pydantic import BaseModel, Field, ValidationError

from specthink.backends.base import SamplingParams, StreamToken
from specthink.errors import ConfigError, TargetFallbackWarning
from specthink.testing.inprocess import ScriptedBackend
from specthink.testing.models import (
    EchoModel,
    RoutedModel,
    Script,
    ScriptedModel,
    TextModel,
    Tokenizer,
)
from specthink_lc import ChatSpeculativeThinking

ANSWER_2_PLUS_2 = "<think>\nTwo plus two makes four.\n</think>\n\nThe answer is 4."


def chat(small: TextModel, target: TextModel | None = None, **options: Any,
         ) -> ChatSpeculativeThinking:
    """A chat model over in-process backends; ChatML unless a template is given."""
    options = {"small_template": "chatml", "target_template": "chatml", **options}
    return ChatSpeculativeThinking.from_backends(
        ScriptedBackend(small, url="http://small.test", model_id="test/small"),
        ScriptedBackend(target or small, url="http://target.test", model_id="test/target"),
        **options)


def backends(model: ChatSpeculativeThinking) -> tuple[ScriptedBackend, ScriptedBackend]:
    thinker = model._get_thinker()
    assert isinstance(thinker.small, ScriptedBackend)
    assert isinstance(thinker.target, ScriptedBackend)
    return thinker.small, thinker.target


def concatenate(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full


@tool
def magic_function(input: int) -> int:
    """Apply a magic function to an input."""
    return input + 2


class Joke(BaseModel):
    """Joke to tell user."""

    setup: str = Field(description="question to set up a joke")
    punchline: str = Field(description="answer to resolve the joke")


JOKE = {"setup": "Why do cats sit on laptops?", "punchline": "To keep an eye on the mouse."}


# ---- reasoning and answer ------------------------------------------------------------------

def test_reasoning_goes_to_reasoning_content_and_the_answer_to_content() -> None:
    """If this fails, the <think> block leaks into content or the reasoning is lost."""
    model = chat(ScriptedModel.single(ANSWER_2_PLUS_2))

    message = model.invoke("What is 2 + 2?")

    assert message.content == "The answer is 4."
    assert message.additional_kwargs["reasoning_content"] == "\nTwo plus two makes four.\n"
    assert [block["type"] for block in message.content_blocks] == ["reasoning", "text"]


def test_a_template_that_opens_think_makes_the_output_start_as_reasoning() -> None:
    """DeepSeek-R1 prompts end with ``<think>\\n``: the model writes no opening tag. If this
    fails, the reasoning of R1 distills shows up as the answer."""
    model = chat(ScriptedModel.single("Two plus two makes four.\n</think>\n\nThe answer is 4."),
                 small_template="deepseek-r1", target_template="deepseek-r1")

    message = model.invoke("What is 2 + 2?")
    streamed = concatenate(list(model.stream("What is 2 + 2?")))

    assert message.content == streamed.content == "The answer is 4."
    assert message.additional_kwargs["reasoning_content"] == "Two plus two makes four.\n"
    assert streamed.additional_kwargs["reasoning_content"] == "Two plus two makes four.\n"


def test_output_version_v1_gives_one_reasoning_block_and_one_text_block() -> None:
    """If this fails, streamed v1 blocks do not merge into the invoke shape."""
    model = chat(ScriptedModel.single(ANSWER_2_PLUS_2), output_version="v1")

    message = model.invoke("What is 2 + 2?")
    streamed = concatenate(list(model.stream("What is 2 + 2?")))

    for result in (message, streamed):
        blocks = [{k: v for k, v in b.items() if k in ("type", "text", "reasoning")}
                  for b in result.content_blocks]
        assert blocks == [{"type": "reasoning", "reasoning": "\nTwo plus two makes four.\n"},
                          {"type": "text", "text": "The answer is 4."}]


def test_a_model_that_does_not_think_answers_in_content_only() -> None:
    model = chat(ScriptedModel.single("Paris is the capital of France."))

    message = model.invoke("Capital of France?")

    assert message.content == "Paris is the capital of France."
    assert "reasoning_content" not in message.additional_kwargs


def test_reasoning_tokens_are_reported_in_output_token_details() -> None:
    """If this fails, callers cannot tell how much of the output was thinking."""
    model = chat(ScriptedModel.single(ANSWER_2_PLUS_2))

    invoked = model.invoke("What is 2 + 2?")
    streamed = concatenate(list(model.stream("What is 2 + 2?")))

    # <think> \n Two plus two makes four . \n </think>: ten tokens, then six of answer.
    for message in (invoked, streamed):
        assert message.usage_metadata is not None
        assert message.usage_metadata["output_tokens"] == 16
        assert message.usage_metadata.get("output_token_details") == {"reasoning": 10}


# ---- streaming: usage, metadata, callbacks ---------------------------------------------------

def test_stream_puts_usage_and_metadata_on_the_last_chunk_only() -> None:
    """If this fails, summing chunks double-counts tokens (LangChain adds usage_metadata)."""
    model = chat(ScriptedModel.single(ANSWER_2_PLUS_2))

    chunks = list(model.stream("What is 2 + 2?"))
    invoked = model.invoke("What is 2 + 2?")

    with_usage = [i for i, c in enumerate(chunks) if c.usage_metadata]
    with_metadata = [i for i, c in enumerate(chunks) if c.response_metadata]
    assert with_usage == with_metadata == [len(chunks) - 1]
    assert chunks[-1].chunk_position == "last"
    assert all(c.chunk_position is None for c in chunks[:-1])
    full = concatenate(chunks)
    assert full.usage_metadata == invoked.usage_metadata
    assert full.usage_metadata is not None
    assert full.usage_metadata["output_tokens"] == (
        full.response_metadata["speculative_thinking"]["output_tokens"])
    assert full.usage_metadata["input_tokens"] > 0
    assert full.response_metadata["model_name"] == "test/small+test/target"
    assert full.response_metadata["model_provider"] == "specthink"
    assert full.response_metadata["finish_reason"] == "stop"


class RecordingHandler(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def on_chat_model_start(self, serialized: dict[str, Any], messages: Any, **kwargs: Any,
                            ) -> None:
        self.events.append(("start", ""))

    def on_llm_new_token(self, token: str | list[str | dict[str, Any]], *,
                         chunk: GenerationChunk | ChatGenerationChunk | None = None,
                         **kwargs: Any) -> None:
        self.events.append(("token", _token_text(token, chunk)))

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.events.append(("end", response.generations[0][0].text))


class AsyncRecordingHandler(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    async def on_chat_model_start(self, serialized: dict[str, Any], messages: Any,
                                  *, run_id: UUID, **kwargs: Any) -> None:
        self.events.append(("start", ""))

    async def on_llm_new_token(self, token: str | list[str | dict[str, Any]], *,
                               chunk: GenerationChunk | ChatGenerationChunk | None = None,
                               **kwargs: Any) -> None:
        self.events.append(("token", _token_text(token, chunk)))

    async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.events.append(("end", response.generations[0][0].text))


def _token_text(token: str | list[str | dict[str, Any]],
                chunk: GenerationChunk | ChatGenerationChunk | None) -> str:
    """The token's text, or for a reasoning chunk its reasoning."""
    assert isinstance(token, str) and isinstance(chunk, ChatGenerationChunk)
    return token or str(chunk.message.additional_kwargs.get("reasoning_content", ""))


def assert_in_order(events: list[tuple[str, str]]) -> None:
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert set(kinds[1:-1]) == {"token"} and len(kinds) > 3
    streamed = "".join(text for kind, text in events if kind == "token")
    assert streamed == "\nTwo plus two makes four.\nThe answer is 4."
    assert events[-1] == ("end", "The answer is 4.")


def test_callbacks_see_start_then_every_token_then_end() -> None:
    """If this fails, a handler (e.g. a UI streaming tokens) misses or reorders tokens."""
    model = chat(ScriptedModel.single(ANSWER_2_PLUS_2))
    handler = RecordingHandler()

    for _ in model.stream("What is 2 + 2?", config={"callbacks": [handler]}):
        pass

    assert_in_order(handler.events)


async def test_async_callbacks_see_start_then_every_token_then_end() -> None:
    model = chat(ScriptedModel.single(ANSWER_2_PLUS_2))
    handler = AsyncRecordingHandler()

    async for _ in model.astream("What is 2 + 2?", config={"callbacks": [handler]}):
        pass

    assert_in_order(handler.events)


async def test_streaming_invoke_sends_tokens_to_callbacks() -> None:
    model = chat(ScriptedModel.single(ANSWER_2_PLUS_2), streaming=True)
    handler = AsyncRecordingHandler()

    message = await model.ainvoke("What is 2 + 2?", config={"callbacks": [handler]})

    assert message.content == "The answer is 4."
    assert_in_order(handler.events)


# ---- speculative-thinking statistics ---------------------------------------------------------

FIX = ("Actually x is two because both terms are equal and their sum doubles one of them so "
       "we keep going")


def takeover_pair() -> tuple[ScriptedModel, ScriptedModel]:
    """The small model reflects ("Wait") after a blank line; the target fixes it (rule 1)."""
    fix20 = "".join(Tokenizer().tokenize(FIX)[:20])
    small = ScriptedModel([Script("", "Let x be 2.\n\nWait, x is 3.\n\nSo x is 3."),
                           Script(fix20, "\n\nSo the answer is 2.")])
    target = ScriptedModel([Script("Let x be 2.\n\n", FIX)])
    return small, target


def test_statistics_and_trace_are_in_response_metadata() -> None:
    """If this fails, users cannot see who wrote what (DESIGN: speculative_thinking)."""
    model = chat(*takeover_pair())

    message = model.invoke("What is x?")

    stats = message.response_metadata["speculative_thinking"]
    assert stats["takeovers"]["rule1"] == 1
    assert stats["target_tokens"] == 20
    assert stats["discarded_tokens"] == 1
    assert stats["requests"] == {"small": 2, "target": 1}
    assert 0 < stats["target_share"] < 1
    trace = message.response_metadata["speculative_trace"]
    assert [s["source"] for s in trace["segments"]] == ["small", "target", "small"]
    assert trace["segments"][1]["rule"] == "rule1"
    assert trace["takeovers"] == [{"rule": "rule1", "offset": len("Let x be 2.\n\n"),
                                   "discarded_tokens": 1}]
    assert "Wait" not in message.text
    assert message.text.endswith("So the answer is 2.")


async def test_a_discarded_probe_is_never_streamed() -> None:
    model = chat(*takeover_pair())

    chunks = [chunk async for chunk in model.astream("What is x?")]

    assert "Wait" not in "".join(c.text for c in chunks)
    assert concatenate(chunks).response_metadata["speculative_thinking"]["takeovers"]["rule1"] == 1


def test_a_failing_target_is_marked_and_the_small_model_finishes() -> None:
    model = chat(*takeover_pair())
    _, target = backends(model)
    target.fail_connections()

    with pytest.warns(TargetFallbackWarning):
        message = model.invoke("What is x?")

    stats = message.response_metadata["speculative_thinking"]
    assert stats["fallback"] is True
    assert "connection refused" in stats["fallback_error"]
    assert message.text == "Let x be 2.\n\nWait, x is 3.\n\nSo x is 3."
    assert message.response_metadata["model_name"] == "test/small+test/target"


def test_on_target_error_raise_raises() -> None:
    model = chat(*takeover_pair(), on_target_error="raise")
    backends(model)[1].fail_connections()

    with pytest.raises(Exception, match="connection refused"):
        model.invoke("What is x?")


# ---- the API key -------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::langchain_core._api.beta_decorator.LangChainBetaWarning")
def test_the_api_key_never_appears_in_repr_dumps_or_params(monkeypatch: pytest.MonkeyPatch,
                                                            ) -> None:
    """If this fails, a trace, a log line or a saved chain leaks the servers' key."""
    model = ChatSpeculativeThinking(small_url="http://s:1", target_url="http://t:2",
                                    api_key="sk-very-secret")

    shown = [repr(model), str(model), dumps(model), json.dumps(model.asdict()),
             json.dumps(model._get_ls_params()), repr(model._get_thinker())]

    assert all("sk-very-secret" not in text for text in shown)
    assert dumpd(model)["kwargs"]["api_key"] == {"lc": 1, "type": "secret",
                                                 "id": ["SPECTHINK_API_KEY"]}
    monkeypatch.setenv("SPECTHINK_API_KEY", "sk-from-env")
    revived = load(dumpd(model), valid_namespaces=["specthink_lc"],
                   allowed_objects=[ChatSpeculativeThinking], secrets_from_env=True)
    assert isinstance(revived, ChatSpeculativeThinking)
    assert revived.api_key is not None
    assert revived.api_key.get_secret_value() == "sk-from-env"
    assert revived.asdict() == model.asdict()


# ---- tools -----------------------------------------------------------------------------------

TOOL_ANSWER = ('<think>\nI could run <tool_call>{"name": "delete_files", "arguments": {}}'
               '</tool_call> but the question asks for magic_function.\n</think>\n\n'
               'Calling the tool.\n<tool_call>\n{"name": "magic_function", '
               '"arguments": {"input": 3}}\n</tool_call>')


def test_tool_calls_are_read_from_the_answer_never_from_the_reasoning() -> None:
    """If this fails, a call the model only considered while thinking would be executed."""
    model = chat(ScriptedModel.single(TOOL_ANSWER)).bind_tools([magic_function])

    message = model.invoke("What is magic_function(3)?")

    assert isinstance(message, AIMessage)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [
        ("magic_function", {"input": 3})]
    assert message.tool_calls[0]["id"]
    assert message.content == "Calling the tool."
    assert "delete_files" in message.additional_kwargs["reasoning_content"]


def test_streamed_tool_calls_arrive_whole_on_the_last_chunk() -> None:
    """If this fails, tool-call markup streams out as content or calls arrive in pieces."""
    model = chat(ScriptedModel.single(TOOL_ANSWER)).bind_tools([magic_function])

    chunks = [c for c in model.stream("What is magic_function(3)?")
              if isinstance(c, AIMessageChunk)]

    assert all("<tool" not in chunk.text for chunk in chunks)
    assert [i for i, c in enumerate(chunks) if c.tool_call_chunks] == [len(chunks) - 1]
    full = concatenate(chunks)
    assert full.text == "Calling the tool."
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [
        ("magic_function", {"input": 3})]


def test_an_answer_without_a_call_streams_all_its_text() -> None:
    text = "No tool is needed: 2 < 3 and <tool is not a tag.\n\nDone."
    model = chat(ScriptedModel.single(text)).bind_tools([magic_function])

    full = concatenate([c for c in model.stream("Is 2 < 3?") if isinstance(c, AIMessageChunk)])
    invoked = model.invoke("Is 2 < 3?")

    assert full.text == invoked.text == text
    assert full.tool_calls == invoked.tool_calls == []


@pytest.mark.parametrize(("tool_choice", "instruction"), [
    ("magic_function", "You must call the tool magic_function."),
    ("any", "You must call one of the tools."),
    ("required", "You must call one of the tools."),
    (True, "You must call the tool magic_function."),
])
def test_tool_choice_reaches_the_prompt(tool_choice: Any, instruction: str) -> None:
    model = chat(ScriptedModel.single(TOOL_ANSWER))

    model.bind_tools([magic_function], tool_choice=tool_choice).invoke("magic_function(3)?")

    prompt = backends(model)[0].requests[0].prompt
    assert instruction in prompt
    assert '"name": "magic_function"' in prompt


def test_tool_choice_none_hides_the_tools_and_parses_nothing() -> None:
    model = chat(ScriptedModel.single(TOOL_ANSWER))

    message = model.bind_tools([magic_function], tool_choice="none").invoke("magic_function?")

    system_turn = backends(model)[0].requests[0].prompt.split("<|im_start|>user")[0]
    assert "magic_function" not in system_turn
    assert message.tool_calls == []
    assert "<tool_call>" in message.text


def test_tool_choice_naming_an_unknown_tool_is_refused_at_bind_time() -> None:
    model = chat(ScriptedModel.single("x"))

    with pytest.raises(ConfigError, match="not among the tools offered: magic_function"):
        model.bind_tools([magic_function], tool_choice="weather")


def test_parallel_tool_calls_false_keeps_the_first_call_only() -> None:
    two_calls = (call_text("magic_function", {"input": 1}) + "\n"
                 + call_text("magic_function", {"input": 2}))
    model = chat(ScriptedModel.single(two_calls))

    both = model.bind_tools([magic_function]).invoke("Two calls?")
    one = model.bind_tools([magic_function], parallel_tool_calls=False).invoke("Two calls?")
    streamed = concatenate([c for c in model.bind_tools(
        [magic_function], parallel_tool_calls=False).stream("Two calls?")
        if isinstance(c, AIMessageChunk)])

    assert isinstance(both, AIMessage) and isinstance(one, AIMessage)
    assert [c["args"] for c in both.tool_calls] == [{"input": 1}, {"input": 2}]
    assert [c["args"] for c in one.tool_calls] == [{"input": 1}]
    assert [c["args"] for c in streamed.tool_calls] == [{"input": 1}]


def test_forcing_a_tool_call_without_tools_is_refused() -> None:
    model = chat(ScriptedModel.single("x"))

    with pytest.raises(ConfigError, match="needs tools"):
        model.bind_tools([], tool_choice="any")


def call_text(name: str, arguments: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_an_agent_turn_sends_the_tool_result_back_in_hermes_form() -> None:
    """If this fails, the model never sees its tool results (the agent loop breaks)."""
    small = RoutedModel([("<tool_response>", ScriptedModel.single("magic_function(3) is 5."))],
                        default=ScriptedModel.single(TOOL_ANSWER))
    model = chat(small)
    with_tools = model.bind_tools([magic_function])
    question = HumanMessage("What is magic_function(3)?")

    call = with_tools.invoke([question])
    assert isinstance(call, AIMessage)
    result = magic_function.invoke(call.tool_calls[0])
    answer = with_tools.invoke([question, call, result])

    assert isinstance(result, ToolMessage) and result.content == "5"
    assert answer.text == "magic_function(3) is 5."
    prompt = backends(model)[0].requests[-1].prompt
    assert '<tool_call>\n{"name": "magic_function", "arguments": {"input": 3}}' in prompt
    assert "<tool_response>\n5\n</tool_response>" in prompt


# ---- structured output -----------------------------------------------------------------------

def joke_call() -> str:
    return f'<tool_call>\n{{"name": "Joke", "arguments": {json.dumps(JOKE)}}}\n</tool_call>'


def test_structured_output_by_function_calling() -> None:
    model = chat(ScriptedModel.single("<think>\nA cat joke.\n</think>\n\n" + joke_call()))

    joke = model.with_structured_output(Joke).invoke("Tell me a joke about cats.")
    streamed = list(model.with_structured_output(Joke).stream("Tell me a joke about cats."))

    assert joke == Joke(**JOKE)
    assert streamed == [Joke(**JOKE)]
    assert "You must call the tool Joke." in backends(model)[0].requests[0].prompt


def test_structured_output_by_json_schema_shows_the_schema_to_the_model() -> None:
    """If this fails, a model without a grammar never learns which JSON to write."""
    model = chat(ScriptedModel.single("<think>\nA cat joke.\n</think>\n\n" + json.dumps(JOKE)))

    joke = model.with_structured_output(Joke, method="json_schema").invoke("A cat joke.")
    as_dict = model.with_structured_output(Joke.model_json_schema(), method="json_schema"
                                           ).invoke("A cat joke.")

    assert joke == Joke(**JOKE)
    assert as_dict == JOKE
    prompt = backends(model)[0].requests[0].prompt
    assert "conforms to this JSON schema" in prompt
    assert '"punchline"' in prompt.split("<|im_start|>user")[0]


def test_structured_output_by_json_mode_parses_the_answer_only() -> None:
    model = chat(ScriptedModel.single('<think>\n{"draft": 1}\n</think>\n\n' + json.dumps(JOKE)))

    parsed = model.with_structured_output(method="json_mode").invoke("Joke as JSON.")

    assert parsed == JOKE


def test_grammar_is_sent_only_when_both_servers_take_one() -> None:
    model = chat(ScriptedModel.single(json.dumps(JOKE)))
    small, target = backends(model)

    model.with_structured_output(Joke, method="json_schema").invoke("A cat joke.")
    small.supports_grammar = target.supports_grammar = True
    model.with_structured_output(Joke, method="json_schema").invoke("A cat joke.")

    assert small.requests[0].sampling.grammar is None
    grammar = small.requests[1].sampling.grammar
    assert grammar is not None and grammar["type"] == "json"
    assert grammar["value"]["required"] == ["setup", "punchline"]


def test_include_raw_returns_the_message_and_the_parsing_error() -> None:
    # Hermes' layout, which the engine's opener of the required call continues
    half_joke = '<tool_call>\n{"name": "Joke", "arguments": {"setup": "Why?"}}\n</tool_call>'
    model = chat(ScriptedModel.single(half_joke))

    result = model.with_structured_output(Joke, include_raw=True).invoke("A cat joke.")

    assert isinstance(result, dict)
    assert result["raw"].tool_calls[0]["args"] == {"setup": "Why?"}
    assert result["parsed"] is None
    assert isinstance(result["parsing_error"], ValidationError)
    assert "punchline" in str(result["parsing_error"])


# ---- concurrency and cancellation ------------------------------------------------------------

class CountingBackend(ScriptedBackend):
    """Counts streams open at the same time."""

    open_now = 0
    most_open = 0

    @asynccontextmanager
    async def stream(self, prompt: str, *, max_new_tokens: int, sampling: SamplingParams,
                     on_attempt: Any = None, routing_key: str | None = None,
                     ) -> AsyncIterator[AsyncIterator[StreamToken]]:
        type(self).open_now += 1
        type(self).most_open = max(type(self).most_open, type(self).open_now)
        try:
            async with super().stream(prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                                      on_attempt=on_attempt, routing_key=routing_key) as tokens:
                yield tokens
        finally:
            type(self).open_now -= 1


async def test_abatch_of_64_runs_every_conversation_at_once_on_one_loop() -> None:
    """If this fails, abatch went through threads or ran conversations one by one."""
    echo = EchoModel(prefix="You said: ")
    model = ChatSpeculativeThinking.from_backends(
        CountingBackend(echo, url="http://small.test"),
        CountingBackend(echo, url="http://target.test"),
        small_template="chatml", target_template="chatml")
    questions: list[LanguageModelInput] = [f"question number {n}" for n in range(64)]

    answers = await model.abatch(questions, config={"max_concurrency": 64})

    assert [a.text for a in answers] == [f"You said: question number {n}" for n in range(64)]
    assert CountingBackend.most_open == 64


async def test_leaving_astream_early_closes_the_server_stream() -> None:
    model = chat(ScriptedModel.single("One two three four five six seven eight nine ten."))

    stream = cast(AsyncGenerator[AIMessageChunk, None], model.astream("Count."))
    first = [chunk async for chunk in _take(stream, 3)]
    await stream.aclose()

    assert len(first) == 3
    request = backends(model)[0].requests[0]
    assert request.closed_early


async def _take(stream: AsyncIterator[AIMessageChunk], count: int) -> AsyncIterator[AIMessageChunk]:
    async for chunk in stream:
        yield chunk
        count -= 1
        if count == 0:
            return


async def test_cancelling_the_task_closes_the_server_stream() -> None:
    gate = asyncio.Event()

    class Slow(ScriptedBackend):
        @asynccontextmanager
        async def stream(self, prompt: str, *, max_new_tokens: int, sampling: SamplingParams,
                         on_attempt: Any = None, routing_key: str | None = None,
                         ) -> AsyncIterator[AsyncIterator[StreamToken]]:
            async with super().stream(prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                                      on_attempt=on_attempt, routing_key=routing_key) as tokens:
                async def slow() -> AsyncIterator[StreamToken]:
                    async for token in tokens:
                        yield token
                        gate.set()
                        await asyncio.sleep(3600)
                yield slow()

    small = Slow(ScriptedModel.single("One two three."), url="http://small.test")
    model = ChatSpeculativeThinking.from_backends(small, small, small_template="chatml",
                                                  target_template="chatml")

    async def consume() -> None:
        async for _ in model.astream("Count."):
            pass

    task = asyncio.create_task(consume())
    await gate.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert small.requests[0].closed_early


# ---- parameters ------------------------------------------------------------------------------

def test_call_parameters_reach_the_servers() -> None:
    model = chat(ScriptedModel.single("Hello there, how are you today?"), temperature=0.6,
                 top_p=0.95, top_k=50, seed=7, model_kwargs={"repetition_penalty": 1.1},
                 max_tokens=64)

    message = model.invoke("Hi", stop=["how"], temperature=0.0)

    request = backends(model)[0].requests[0]
    assert request.sampling == SamplingParams(temperature=0.0, top_p=0.95, top_k=50, seed=7,
                                              repetition_penalty=1.1)
    assert request.max_new_tokens == 64
    assert message.text == "Hello there, "
    assert message.response_metadata["finish_reason"] == "stop"


def test_max_tokens_bounds_the_answer_and_reports_length() -> None:
    model = chat(ScriptedModel.single("one two three four five six seven"), max_tokens=3)

    message = model.invoke("Count.")

    assert message.text == "one two three"
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] == 3


def test_unknown_constructor_arguments_land_in_model_kwargs_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="repetition_penalty was transferred to model_kwargs"):
        model = ChatSpeculativeThinking(small_url="http://s:1", target_url="http://t:2",
                                        repetition_penalty=1.2)
    assert model.model_kwargs == {"repetition_penalty": 1.2}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValidationError, match="not sampling settings"):
            ChatSpeculativeThinking(small_url="http://s:1", target_url="http://t:2",
                                    frequency_bias=3)


def test_bad_settings_are_refused_at_construction() -> None:
    with pytest.raises(ValidationError, match="unknown rules preset 'papper'"):
        ChatSpeculativeThinking(small_url="http://s:1", target_url="http://t:2", rules="papper")
    with pytest.raises(ValidationError, match="temperature"):
        ChatSpeculativeThinking(small_url="http://s:1", target_url="http://t:2", temperature=-1)
    with pytest.raises(ValidationError, match="backend"):
        ChatSpeculativeThinking(small_url="http://s:1", target_url="http://t:2", backend="grpc")


def test_a_per_call_model_name_is_refused() -> None:
    model = chat(ScriptedModel.single("x"))

    with pytest.raises(ConfigError, match="choose models by server"):
        model.invoke("Hi", model="gpt-4o")


def test_text_only_models_refuse_images_before_any_request() -> None:
    model = chat(ScriptedModel.single("x"))
    image = HumanMessage([{"type": "text", "text": "What is this?"},
                          {"type": "image", "base64": "AAAA", "mime_type": "image/png"}])

    with pytest.raises(ConfigError, match="'image' block"):
        model.invoke([image])
    assert backends(model)[0].requests == []


def test_identity_for_tracing_is_constant() -> None:
    model = chat(ScriptedModel.single("x"), temperature=0.5, max_tokens=10, stop=["END"])

    assert model._llm_type == "specthink-chat"
    assert model._get_ls_params() == {
        "ls_provider": "specthink", "ls_model_name": "speculative-thinking",
        "ls_model_type": "chat", "ls_temperature": 0.5, "ls_max_tokens": 10,
        "ls_stop": ["END"]}
    assert model._identifying_params["small_url"] == "http://small.test"
    assert model._identifying_params["rules"] == "paper"


def test_a_copy_with_other_servers_builds_its_own_engine() -> None:
    model = ChatSpeculativeThinking(small_url="http://s:1", target_url="http://t:2")
    copy = model.model_copy(update={"target_url": "http://t:3"})

    assert model._get_thinker() is model._get_thinker()
    assert copy._get_thinker().target.url == "http://t:3"
    assert model._get_thinker().target.url == "http://t:2"
