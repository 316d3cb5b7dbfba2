"""SpeculativeThinkingLLM on in-process backends: the LlamaIndex surface, no sockets."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ImageBlock,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.tools import FunctionTool

from specthink import ConfigError, FinishEvent, TakeoverEvent, TextEvent
from specthink.testing.models import ScriptedModel, last_user_message
from specthink_li import NoToolCallError, SpeculativeThinkingLLM

from .li_support import PromptReader, inprocess_llm

REASONED = ("<think>\nThe user asks for 12 * 13.\n\n"
            "Wait, 12 * 13 = 12 * 10 + 12 * 3 = 120 + 36 = 156.\n\n"
            "So the product is 156.\n</think>\n\n12 * 13 = 156.")
QUESTION = [ChatMessage(role="user", content="What is 12 * 13?")]
THINK = "<think>\nThe product of two numbers.\n</think>\n\n"


def reasoner() -> PromptReader:
    return PromptReader(lambda conversation: REASONED)


# ---- construction, configuration, serialisation ---------------------------------------------

def test_urls_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTHINK_SMALL_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SPECTHINK_TARGET_URL", "http://127.0.0.1:10")
    monkeypatch.setenv("SPECTHINK_API_KEY", "sk-env-secret")
    llm = SpeculativeThinkingLLM()
    assert (llm.small_url, llm.target_url) == ("http://127.0.0.1:9", "http://127.0.0.1:10")
    assert "api_key=***" in repr(llm.thinker.small)  # the backend got the key from the env


def test_a_missing_url_names_the_argument_and_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECTHINK_SMALL_URL", raising=False)
    monkeypatch.delenv("SPECTHINK_TARGET_URL", raising=False)
    with pytest.raises(ConfigError, match=r"small_url= \(or \$SPECTHINK_SMALL_URL\)"):
        SpeculativeThinkingLLM(target_url="http://127.0.0.1:10")


def test_the_api_key_never_reaches_serialised_forms() -> None:
    """Broken if the key became a field: LlamaIndex's callbacks log ``to_dict()``."""
    llm = SpeculativeThinkingLLM(small_url="http://127.0.0.1:9", target_url="http://127.0.0.1:10",
                                 api_key="sk-very-secret")
    for text in (json.dumps(llm.to_dict(), default=str), llm.to_json(), str(llm.to_payload()),
                 repr(llm), str(llm.metadata)):
        assert "sk-very-secret" not in text
    assert "api_key=***" in repr(llm.thinker.target)


def test_bad_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SpeculativeThinkingLLM(small_url="http://a:1", target_url="http://b:1", temperature=-1)
    with pytest.raises(ConfigError):
        SpeculativeThinkingLLM(small_url="http://a:1", target_url="http://b:1",
                               rules="no-such-preset")


def test_the_constructor_opens_no_connection_and_metadata_has_defaults() -> None:
    """Nothing listens on port 9; construction and ``metadata`` must not notice."""
    llm = SpeculativeThinkingLLM(small_url="http://127.0.0.1:9", target_url="http://127.0.0.1:9",
                                 max_tokens=512)
    meta = llm.metadata
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.num_output == 512
    assert meta.model_name == "http://127.0.0.1:9 + http://127.0.0.1:9"


async def test_metadata_comes_from_both_servers_info() -> None:
    llm = inprocess_llm(reasoner(), max_input_tokens=8191)
    before = llm.metadata
    meta = await llm.afetch_metadata()
    assert before.context_window != 8191
    assert meta.context_window == 8191
    assert meta.num_output == 8191 // 2  # no max_tokens: half the window is left for thinking
    assert meta.model_name == "test/small-1.5b + test/target-32b"
    assert llm.metadata == meta  # cached


def test_fetch_metadata_works_from_sync_code() -> None:
    llm = inprocess_llm(reasoner(), max_input_tokens=2048, max_tokens=100)
    meta = llm.fetch_metadata()
    assert (meta.context_window, meta.num_output) == (2048, 100)


def test_a_copy_with_other_servers_gets_its_own_engine() -> None:
    llm = SpeculativeThinkingLLM(small_url="http://127.0.0.1:9", target_url="http://127.0.0.1:10")
    engine = llm.thinker
    moved = llm.model_copy(update={"small_url": "http://127.0.0.1:11"})
    assert moved.thinker.small.url == "http://127.0.0.1:11"
    assert llm.thinker is engine and engine.small.url == "http://127.0.0.1:9"
    hotter = llm.model_copy(update={"temperature": 0.7})  # a per-request setting
    assert hotter.thinker is engine


def test_the_public_names_are_pinned() -> None:
    import specthink_li

    assert specthink_li.__all__ == ["NoToolCallError", "SpeculativeThinkingLLM"]
    assert issubclass(specthink_li.NoToolCallError, ValueError)


def test_class_name_is_stable() -> None:
    assert SpeculativeThinkingLLM.class_name() == "SpeculativeThinkingLLM"
    assert inprocess_llm(reasoner()).to_dict()["class_name"] == "SpeculativeThinkingLLM"


# ---- chat and completion -----------------------------------------------------------------

def test_chat_splits_reasoning_from_answer_and_reports_statistics() -> None:
    llm = inprocess_llm(reasoner())
    response = llm.chat(QUESTION)
    thinking, text = response.message.blocks
    assert isinstance(thinking, ThinkingBlock) and isinstance(text, TextBlock)
    assert thinking.content is not None and "Wait, 12 * 13" in thinking.content
    assert response.message.content == "12 * 13 = 156."
    stats = response.message.additional_kwargs["speculative_thinking"]
    assert stats["takeovers"]["rule1"] >= 1 and stats["target_tokens"] > 0
    assert thinking.num_tokens == stats["reasoning_tokens"] > 0
    assert response.additional_kwargs["completion_tokens"] == stats["output_tokens"]
    assert response.raw["usage"] == response.additional_kwargs


async def test_achat_gives_the_same_answer_as_chat() -> None:
    llm = inprocess_llm(reasoner())
    sync = llm.chat(QUESTION)
    response = await llm.achat(QUESTION)
    assert response.message.blocks == sync.message.blocks


def test_an_answer_without_reasoning_is_plain_text() -> None:
    llm = inprocess_llm(ScriptedModel.single("Paris."))
    response = llm.chat([ChatMessage(role="user", content="Capital of France?")])
    assert [type(b) for b in response.message.blocks] == [TextBlock]
    assert response.message.content == "Paris."


def test_a_prompt_that_opens_the_reasoning_still_splits_it() -> None:
    """DeepSeek-R1 templates end with ``<think>\\n``: the output starts inside the reasoning."""
    model = ScriptedModel.single("Two and two.\n</think>\n\n4")
    llm = inprocess_llm(model, template="deepseek-r1")
    response = llm.chat([ChatMessage(role="user", content="2 + 2?")])
    thinking = response.message.blocks[0]
    assert isinstance(thinking, ThinkingBlock) and thinking.content == "Two and two."
    stats = response.message.additional_kwargs["speculative_thinking"]
    assert thinking.num_tokens == stats["reasoning_tokens"] > 0
    assert response.message.content == "4"
    streamed = list(llm.stream_chat([ChatMessage(role="user", content="2 + 2?")]))
    thinking = "".join(c.additional_kwargs.get("thinking_delta", "") for c in streamed)
    assert thinking == "Two and two."
    assert "".join(c.delta or "" for c in streamed) == "4"


def test_completion_family_is_derived_from_chat() -> None:
    llm = inprocess_llm(PromptReader(lambda c: f"You said: {last_user_message(c)}"))
    assert llm.complete("hello").text == "You said: hello"
    chunks = list(llm.stream_complete("hello"))
    assert "".join(c.delta or "" for c in chunks) == chunks[-1].text == "You said: hello"
    assert "speculative_thinking" in chunks[-1].additional_kwargs


async def test_async_completion_family() -> None:
    llm = inprocess_llm(PromptReader(lambda c: f"You said: {last_user_message(c)}"))
    assert (await llm.acomplete("hi")).text == "You said: hi"
    chunks = [c async for c in await llm.astream_complete("hi")]
    assert "".join(c.delta or "" for c in chunks) == "You said: hi"


def test_call_arguments_reach_the_engine() -> None:
    model = PromptReader(lambda c: "one two three four five six seven eight")
    llm = inprocess_llm(model)
    response = llm.chat(QUESTION, max_tokens=3, temperature=0.5, top_p=0.9)
    assert response.message.content == "one two three"
    stats = response.message.additional_kwargs["speculative_thinking"]
    assert stats["finish_reason"] == "length"
    request = llm.thinker.small.requests[-1]  # type: ignore[attr-defined]
    assert (request.sampling.temperature, request.sampling.top_p) == (0.5, 0.9)
    assert llm.chat(QUESTION, stop=[" four"]).message.content == "one two three"


def test_temperature_zero_is_greedy() -> None:
    llm = inprocess_llm(ScriptedModel.single("ok"), temperature=0)
    llm.chat(QUESTION)
    assert llm.thinker.small.requests[-1].sampling.greedy  # type: ignore[attr-defined]


def test_unknown_call_arguments_are_refused_before_any_request() -> None:
    llm = inprocess_llm(reasoner())
    with pytest.raises(ConfigError, match=r"unknown arguments \['frequency_penalty'\]"):
        llm.chat(QUESTION, frequency_penalty=1.0)
    assert llm.thinker.small.requests == []  # type: ignore[attr-defined]


def test_non_text_content_is_refused_before_any_request() -> None:
    llm = inprocess_llm(reasoner())
    message = ChatMessage(role="user", blocks=[TextBlock(text="What is this?"),
                                               ImageBlock(url="http://example.invalid/a.png")])
    with pytest.raises(ConfigError, match=r"message 0 \(user\) holds a ImageBlock"):
        llm.chat([message])


# ---- streaming ---------------------------------------------------------------------------

def check_stream(chunks: list[ChatResponse]) -> None:
    final = chunks[-1]
    assert "".join(c.delta or "" for c in chunks) == final.message.content
    thinking = "".join(c.additional_kwargs.get("thinking_delta", "") for c in chunks)
    assert [b.content for b in final.message.blocks if isinstance(b, ThinkingBlock)] == [thinking]
    for before, after in itertools.pairwise(chunks):  # content only grows
        assert (after.message.content or "").startswith(before.message.content or "")
    raw = final.raw
    assert isinstance(raw, dict) and isinstance(raw["event"], FinishEvent)
    assert raw["usage"]["completion_tokens"] > 0
    assert "speculative_thinking" in final.message.additional_kwargs


def test_stream_chat_deltas_add_up_to_the_final_text() -> None:
    llm = inprocess_llm(reasoner())
    chunks = list(llm.stream_chat(QUESTION))
    check_stream(chunks)
    assert chunks[-1].message.content == "12 * 13 = 156."
    events = [c.raw["event"] for c in chunks]
    assert any(isinstance(e, TakeoverEvent) for e in events)
    assert {e.source for e in events if isinstance(e, TextEvent)} == {"small", "target"}


async def test_astream_chat_deltas_add_up_to_the_final_text() -> None:
    llm = inprocess_llm(reasoner())
    stream = await llm.astream_chat(QUESTION)
    chunks = [chunk async for chunk in stream]
    check_stream(chunks)
    assert chunks[-1].message.blocks == llm.chat(QUESTION).message.blocks


async def test_leaving_a_stream_early_closes_the_server_stream() -> None:
    llm = inprocess_llm(PromptReader(lambda c: " ".join(["word"] * 200)))
    stream = await llm.astream_chat(QUESTION)
    async for chunk in stream:
        if chunk.delta:
            break
    await stream.aclose()
    # LlamaIndex's callback wrapper drops (rather than closes) the inner generator; the loop's
    # async-generator finaliser closes it a few iterations later.
    request = llm.thinker.small.requests[-1]  # type: ignore[attr-defined]
    for _ in range(20):
        if request.closed_early:
            break
        await asyncio.sleep(0)
    assert request.closed_early
    assert request.tokens_sent < 200


async def test_async_calls_share_the_loop() -> None:
    """Broken if ``achat`` blocked the loop: the in-process server yields to the loop per token,
    so concurrent requests interleave only when the adapter awaits all the way down."""
    llm = inprocess_llm(PromptReader(lambda c: f"echo {last_user_message(c)} " * 5))
    order: list[str] = []

    async def ask(tag: str) -> str:
        stream = await llm.astream_chat([ChatMessage(role="user", content=tag)])
        async for chunk in stream:
            if chunk.delta:
                order.append(tag)
        return chunk.message.content or ""

    answers = await asyncio.gather(ask("a"), ask("b"))
    assert list(answers) == ["echo a " * 5, "echo b " * 5]
    assert order != sorted(order)  # a's and b's tokens interleaved


# ---- callbacks ---------------------------------------------------------------------------

def test_every_public_method_reports_to_the_callback_manager() -> None:
    debug = LlamaDebugHandler()
    llm = inprocess_llm(reasoner(), callback_manager=CallbackManager([debug]))
    llm.chat(QUESTION)
    list(llm.stream_chat(QUESTION))
    llm.complete("What is 12 * 13?")
    list(llm.stream_complete("What is 12 * 13?"))
    pairs = debug.get_event_pairs(CBEventType.LLM)
    assert len(pairs) == 4
    for start, end in pairs:
        serialized = start.payload["serialized"] if start.payload else {}
        assert serialized["class_name"] == "SpeculativeThinkingLLM"
        assert end.payload is not None


async def test_async_methods_report_to_the_callback_manager() -> None:
    debug = LlamaDebugHandler()
    llm = inprocess_llm(reasoner(), callback_manager=CallbackManager([debug]))
    await llm.achat(QUESTION)
    _ = [c async for c in await llm.astream_chat(QUESTION)]
    await llm.acomplete("What is 12 * 13?")
    _ = [c async for c in await llm.astream_complete("What is 12 * 13?")]
    assert len(debug.get_event_pairs(CBEventType.LLM)) == 4


def test_token_counting_reads_the_usage() -> None:
    from llama_index.core.callbacks import TokenCountingHandler

    counter = TokenCountingHandler()
    llm = inprocess_llm(reasoner(), callback_manager=CallbackManager([counter]))
    response = llm.chat(QUESTION)
    list(llm.stream_chat(QUESTION))
    stats = response.message.additional_kwargs["speculative_thinking"]
    assert counter.completion_llm_token_count == 2 * stats["output_tokens"]


# ---- messages ----------------------------------------------------------------------------

def test_history_reaches_the_template_with_tool_calls_and_results() -> None:
    model = PromptReader(lambda c: "Done.")
    llm = inprocess_llm(model)
    history = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Multiply 12 by 13."),
        ChatMessage(role="assistant", blocks=[
            ThinkingBlock(content="private reasoning of an earlier turn"),
            TextBlock(text=""),
            ToolCallBlock(tool_call_id="call_1", tool_name="multiply",
                          tool_kwargs={"a": 12, "b": 13})]),
        ChatMessage(role="tool", content="156", additional_kwargs={"tool_call_id": "call_1"}),
    ]
    assert llm.chat(history).message.content == "Done."
    prompt = model.conversations[-1]
    assert "<|im_start|>system\nBe brief." in prompt
    assert '<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 13}}' in prompt
    assert "<tool_response>\n156\n</tool_response>" in prompt
    assert "private reasoning" not in prompt  # past reasoning is not sent again


# ---- tools -------------------------------------------------------------------------------

def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


TOOLS = [FunctionTool.from_defaults(multiply), FunctionTool.from_defaults(add)]
CALL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 13}}\n</tool_call>'


def tool_caller() -> PromptReader:
    def answer(conversation: str) -> str:
        if "<tool_response>" in conversation:
            return "The product is 156."
        if "<tools>" in conversation:
            return "<think>\nI should use the multiply tool.\n</think>\n\n" + CALL
        return "I have no tools for that."
    return PromptReader(answer)


def test_prepare_chat_with_tools_builds_openai_tools_and_tool_choice() -> None:
    llm = inprocess_llm(tool_caller())
    history = [ChatMessage(role="user", content="earlier")]
    prepared = llm._prepare_chat_with_tools(TOOLS, user_msg="What is 12 * 13?",
                                            chat_history=history, tool_required=True)
    assert [t["function"]["name"] for t in prepared["tools"]] == ["multiply", "add"]
    assert prepared["tools"][0]["function"]["parameters"]["required"] == ["a", "b"]
    assert prepared["tool_choice"] == "required"
    assert [m.content for m in prepared["messages"]] == ["earlier", "What is 12 * 13?"]
    assert len(history) == 1  # the caller's list is left alone
    named = llm._prepare_chat_with_tools(TOOLS, user_msg="x", tool_choice="add")
    assert named["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert llm._prepare_chat_with_tools(TOOLS, user_msg="x")["tool_choice"] == "auto"
    assert llm._prepare_chat_with_tools([], user_msg="x")["tools"] is None


def test_chat_with_tools_returns_tool_selections() -> None:
    llm = inprocess_llm(tool_caller())
    response = llm.chat_with_tools(TOOLS, user_msg="What is 12 * 13?")
    assert response.message.content == ""
    assert isinstance(response.message.blocks[0], ThinkingBlock)
    [selection] = llm.get_tool_calls_from_response(response)
    assert (selection.tool_name, selection.tool_kwargs) == ("multiply", {"a": 12, "b": 13})
    assert selection.tool_id.startswith("call_")


async def test_achat_with_tools_and_predict_and_call() -> None:
    llm = inprocess_llm(tool_caller())
    response = await llm.achat_with_tools(TOOLS, user_msg="What is 12 * 13?")
    assert llm.get_tool_calls_from_response(response)[0].tool_name == "multiply"
    output = await llm.apredict_and_call(TOOLS, user_msg="What is 12 * 13?")
    assert output.response == "156"


def test_stream_chat_with_tools_holds_the_call_markup_back() -> None:
    llm = inprocess_llm(tool_caller())
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg="What is 12 * 13?"))
    assert all("<tool" not in (c.message.content or "") for c in chunks)
    assert "".join(c.delta or "" for c in chunks) == ""
    assert all(llm.get_tool_calls_from_response(c, error_on_no_tool_call=False) == []
               for c in chunks[:-1])
    [selection] = llm.get_tool_calls_from_response(chunks[-1])
    assert selection.tool_kwargs == {"a": 12, "b": 13}


def test_text_around_a_tool_call_streams_and_adds_up() -> None:
    model = PromptReader(lambda c: f"Let me compute that.\n{CALL}")
    llm = inprocess_llm(model)
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg="What is 12 * 13?"))
    assert "".join(c.delta or "" for c in chunks) == "Let me compute that."
    assert chunks[-1].message.content == "Let me compute that."
    assert len(llm.get_tool_calls_from_response(chunks[-1])) == 1


def test_arguments_given_as_json_strings_are_parsed() -> None:
    llm = inprocess_llm(tool_caller())
    response = ChatResponse(message=ChatMessage(role="assistant", blocks=[
        TextBlock(text=""),
        ToolCallBlock(tool_call_id="c1", tool_name="add", tool_kwargs='{"a": 1, "b": 2}'),
        ToolCallBlock(tool_call_id="c2", tool_name="add", tool_kwargs='{"a": 3, "b": 4'),
    ]))
    first, cut = llm.get_tool_calls_from_response(response)
    assert first.tool_kwargs == {"a": 1, "b": 2}
    assert cut.tool_kwargs == {"a": 3, "b": 4}  # a stream cut inside the JSON keeps what is there


def test_the_no_tool_call_error_counts_calls_and_names_the_offered_tools() -> None:
    llm = inprocess_llm(PromptReader(lambda c: "I would rather not call anything."))
    response = llm.chat_with_tools(TOOLS, user_msg="What is 12 * 13?")
    with pytest.raises(NoToolCallError) as caught:
        llm.get_tool_calls_from_response(response)
    message = str(caught.value)
    assert "0 tool calls came back" in message
    assert "tools offered: multiply, add" in message
    assert "I would rather not call anything." in message
    assert isinstance(caught.value, ValueError)
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []


def test_a_malformed_call_is_reported_not_lost() -> None:
    llm = inprocess_llm(PromptReader(lambda c: "<tool_call>\n{not json}\n</tool_call>"))
    response = llm.chat_with_tools(TOOLS, user_msg="What is 12 * 13?")
    assert "{not json}" in (response.message.content or "")
    with pytest.raises(NoToolCallError, match="1 <tool_call> block"):
        llm.get_tool_calls_from_response(response)


def test_only_one_call_is_kept_unless_parallel_calls_are_allowed() -> None:
    twice = PromptReader(lambda c: CALL + "\n" + CALL.replace("multiply", "add"))
    llm = inprocess_llm(twice)
    single = llm.chat_with_tools(TOOLS, user_msg="x")
    assert [s.tool_name for s in llm.get_tool_calls_from_response(single)] == ["multiply"]
    both = llm.chat_with_tools(TOOLS, user_msg="x", allow_parallel_tool_calls=True)
    assert [s.tool_name for s in llm.get_tool_calls_from_response(both)] == ["multiply", "add"]


def test_a_tool_choice_naming_an_unknown_tool_fails_before_any_request() -> None:
    llm = inprocess_llm(tool_caller())
    with pytest.raises(ConfigError, match="not among the tools offered: multiply, add"):
        llm.chat_with_tools(TOOLS, user_msg="x", tool_choice="divide")
    assert llm.thinker.small.requests == []  # type: ignore[attr-defined]


def test_structured_predict_fills_a_pydantic_model() -> None:
    from llama_index.core.prompts import PromptTemplate
    from pydantic import BaseModel

    class Product(BaseModel):
        """The product of two numbers."""

        value: int

    def answer(conversation: str) -> str:
        assert "You must call one of the tools." in conversation  # tool_required reached it
        return '<tool_call>\n{"name": "Product", "arguments": {"value": 156}}\n</tool_call>'

    llm = inprocess_llm(PromptReader(answer))
    product = llm.structured_predict(Product, PromptTemplate("Multiply {a} by {b}."), a=12, b=13)
    assert product == Product(value=156)


async def test_astructured_predict_fills_a_pydantic_model() -> None:
    from llama_index.core.prompts import PromptTemplate
    from pydantic import BaseModel

    class Product(BaseModel):
        value: int

    llm = inprocess_llm(PromptReader(
        lambda c: '<tool_call>\n{"name": "Product", "arguments": "{\\"value\\": 156}"}'
                  '\n</tool_call>'))
    product = await llm.astructured_predict(Product, PromptTemplate("Multiply 12 by 13."))
    assert product.value == 156


def test_stream_structured_predict_ends_with_the_filled_model() -> None:
    from llama_index.core.prompts import PromptTemplate
    from pydantic import BaseModel

    class Product(BaseModel):
        value: int

    llm = inprocess_llm(PromptReader(
        lambda c: THINK + '<tool_call>\n{"name": "Product", "arguments": {"value": 156}}'
                  '\n</tool_call>'))
    objects = list(llm.stream_structured_predict(Product, PromptTemplate("Multiply 12 by 13.")))
    assert objects[-1].value == 156  # type: ignore[union-attr]
