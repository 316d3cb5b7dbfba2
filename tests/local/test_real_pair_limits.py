"""A real llama.cpp server's limits, through ``specthink serve`` and both adapters: its context
and ``tool_choice``.

llama-cpp-python (SmolLM2-135M, a 512-token context here) reports its context nowhere: it cuts
a reply at the context with finish reason ``length``, and refuses a streamed prompt that does
not fit with a 200 and no event at all. The engine learns the size from the server's own
refusal. SmolLM2 ignores "You must call the tool ...": the engine opens the call and the
server's grammar (GBNF) keeps the arguments JSON. One pair serves the whole module (the machine
has two cores); the same 135M model in both roles only shows the mechanics.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from specthink.errors import ContextLimitError
from specthink.local import LocalPair
from tests.local.real_pair import REAL_PAIR_MARKS, running_pair
from tests.serve.test_tools import TIME, WEATHER

pytestmark = REAL_PAIR_MARKS

N_CTX = 512
LONG_REPLY = "Write a long essay about the history of Rome, with at least twenty paragraphs."
"""SmolLM2 writes on past 512 tokens (greedy): the reply is cut by the context."""
TOO_LONG = "word " * 600
"""About 610 tokens with the template: more than the context holds."""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPair]:
    with running_pair(tmp_path_factory.mktemp("local-pair-ctx"), n_ctx=N_CTX) as local:
        yield local


def _serve(pair: LocalPair, rules: str = "paper_instruct") -> object:
    from starlette.testclient import TestClient

    from specthink.serve import ServeSettings, create_app

    settings = ServeSettings(small_url=pair.url("small"), target_url=pair.url("target"),
                             backend="openai", small_template="chatml",
                             target_template="chatml", rules=rules)
    return TestClient(create_app(settings))


def test_serve_ends_a_reply_cut_by_the_servers_context_with_length(pair: LocalPair) -> None:
    """If this fails, the engine takes the server's ``length`` for "stopped below our budget",
    asks again with a prompt that no longer fits, and the client gets 503 instead of
    ``finish_reason: "length"``."""
    with _serve(pair) as client:  # type: ignore[attr-defined]
        answer = client.post("/v1/chat/completions", json={
            "model": "specthink", "messages": [{"role": "user", "content": LONG_REPLY}],
            "max_tokens": 2000, "temperature": 0})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert N_CTX // 2 < usage["prompt_tokens"] + usage["completion_tokens"] <= N_CTX + 8


def test_serve_answers_a_prompt_over_the_context_with_400(pair: LocalPair) -> None:
    """If this fails, a prompt that does not fit llama-cpp-python's context is a 503
    (``upstream_unavailable``: its refusal looks like a dropped stream), not the 400
    ``context_length_exceeded`` docs/serve.md promises. (The paper rules: the small model
    meets the prompt first, and a second call is refused before any request.)"""
    with _serve(pair, "paper") as client:  # type: ignore[attr-defined]
        for _ in range(2):  # the second time, the size is known: refused before any request
            answer = client.post("/v1/chat/completions", json={
                "model": "specthink", "messages": [{"role": "user", "content": TOO_LONG}],
                "max_tokens": 20})
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")


def test_langchain_raises_context_limit_error_for_a_prompt_over_the_context(
        pair: LocalPair) -> None:
    """If this fails, LangChain callers get StreamDroppedError / BackendConnectionError for a
    prompt that simply does not fit."""
    from specthink_lc import ChatSpeculativeThinking

    model = ChatSpeculativeThinking(
        small_url=pair.url("small"), target_url=pair.url("target"), backend="openai",
        rules="paper_instruct", small_template="chatml", target_template="chatml",
        temperature=0, max_tokens=20)
    try:
        with pytest.raises(ContextLimitError, match=f"context of {N_CTX} tokens"):
            model.invoke(TOO_LONG)
    finally:
        model.close()


def test_llamaindex_raises_context_limit_error_for_a_prompt_over_the_context(
        pair: LocalPair) -> None:
    """If this fails, LlamaIndex callers get StreamDroppedError / BackendConnectionError for a
    prompt that simply does not fit."""
    from llama_index.core.llms import ChatMessage

    from specthink_li import SpeculativeThinkingLLM

    llm = SpeculativeThinkingLLM(
        small_url=pair.url("small"), target_url=pair.url("target"), backend="openai",
        rules="paper_instruct", small_template="chatml", target_template="chatml",
        max_tokens=20)
    try:
        with pytest.raises(ContextLimitError, match=f"context of {N_CTX} tokens"):
            llm.chat([ChatMessage(role="user", content=TOO_LONG)])
    finally:
        llm.close()


@pytest.mark.parametrize(("choice", "names"), [
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ("required", {"get_weather", "get_time"}),
], ids=["named", "required"])
def test_serve_honours_tool_choice_on_the_real_pair(pair: LocalPair, choice: object,
                                                    names: set[str]) -> None:
    """If this fails, ``tool_choice`` "required" or a named function is only a sentence in
    SmolLM2's prompt, which it ignores: the answer is text with ``finish_reason: "stop"``."""
    with _serve(pair) as client:  # type: ignore[attr-defined]
        answer = client.post("/v1/chat/completions", json={
            "model": "specthink", "temperature": 0, "max_tokens": 80,
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [WEATHER, TIME], "tool_choice": choice})
    assert answer.status_code == 200, answer.text
    result = answer.json()["choices"][0]
    assert result["finish_reason"] == "tool_calls", result
    calls = result["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] in names
    assert isinstance(json.loads(calls[0]["function"]["arguments"]), dict)
