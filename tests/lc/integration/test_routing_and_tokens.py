"""The LangChain model's routing key (run metadata -> every generation request) and token
counting by the small server."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from typing import Any

import pytest

from specthink.testing import LoopbackServer
from specthink.testing.models import Script, ScriptedModel, Tokenizer
from specthink_lc import ChatSpeculativeThinking

SMALL = ScriptedModel([Script("", "Let x be 2.\n\nWait, x is 3.\n\nSo x is 3.")])
TARGET = ScriptedModel([Script("", "Actually x is two, since both terms are equal.")])


@pytest.fixture
def pair() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    with LoopbackServer(SMALL, model_id="Qwen/Qwen2.5-1.5B-Instruct") as small, \
            LoopbackServer(TARGET, model_id="Qwen/Qwen2.5-32B-Instruct") as target:
        yield small, target


def keys(*servers: LoopbackServer) -> list[str | None]:
    return [r.headers.get("x-session-id") for s in servers for r in s.records]


@pytest.mark.parametrize("key", ["session_id", "thread_id"])
async def test_the_runs_session_or_thread_is_the_routing_key(
        pair: tuple[LoopbackServer, LoopbackServer], key: str) -> None:
    """Every request of both roles carries the conversation's id, so a router keeps it on the
    replica holding its prefix (broken: each request could land anywhere)."""
    small, target = pair
    model = ChatSpeculativeThinking(small_url=small.url, target_url=target.url)
    try:
        await model.ainvoke("What is x?", config={"metadata": {key: "conversation-7"}})
        model.invoke("What is x?", config={"metadata": {key: "conversation-7"}})
        chunks = [c async for c in model.astream(
            "What is x?", config={"metadata": {key: "conversation-7"}})]
    finally:
        await model.aclose()
        model.close()
    assert chunks
    assert len(target.records) >= 3
    assert set(keys(small, target)) == {"conversation-7"}


async def test_without_a_session_each_call_gets_one_fresh_key(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """One answer stays on one replica, and two answers are not tied together."""
    small, target = pair
    model = ChatSpeculativeThinking(small_url=small.url, target_url=target.url)
    try:
        await model.ainvoke("What is x?")
        first = len(small.records), len(target.records)
        await model.ainvoke("What is x?")
    finally:
        await model.aclose()
    one = set(keys(*(s for s in (small, target))))
    assert len(one) == 2 and None not in one
    call_one = {r.headers["x-session-id"] for r in small.records[:first[0]]} | {
        r.headers["x-session-id"] for r in target.records[:first[1]]}
    assert len(call_one) == 1


def test_token_ids_come_from_the_small_server_without_transformers(
        pair: tuple[LoopbackServer, LoopbackServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """get_num_tokens used to fall back to GPT-2 through transformers (an ImportError here)."""
    real_import = builtins.__import__

    def no_transformers(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] == "transformers":
            raise ImportError("transformers is not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    small, target = pair
    model = ChatSpeculativeThinking(small_url=small.url, target_url=target.url)
    try:
        text = "Speculative thinking counts tokens on the server."
        ids = model.get_token_ids(text)
        assert model.get_num_tokens(text) == len(ids)
        assert len(ids) >= len(Tokenizer().tokenize(text))
        assert small.calls_to("/tokenize")
    finally:
        model.close()
