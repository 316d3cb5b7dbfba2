"""The LlamaIndex LLM's routing key (a ``session_id`` keyword -> every generation request) and
token ids from the small server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from llama_index.core.base.llms.types import ChatMessage

from specthink.testing import LoopbackServer
from specthink.testing.models import Script, ScriptedModel
from specthink_li import SpeculativeThinkingLLM

SMALL = ScriptedModel([Script("", "Let x be 2.\n\nWait, x is 3.\n\nSo x is 3.")])
TARGET = ScriptedModel([Script("", "Actually x is two, since both terms are equal.")])
QUESTION = [ChatMessage(role="user", content="What is x?")]


@pytest.fixture
def pair() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    with LoopbackServer(SMALL, model_id="Qwen/Qwen2.5-1.5B-Instruct") as small, \
            LoopbackServer(TARGET, model_id="Qwen/Qwen2.5-32B-Instruct") as target:
        yield small, target


async def test_session_id_routes_every_request_of_chat_stream_and_complete(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    """Broken: requests of one conversation carry no key (or different keys), so a router may
    send a handoff to a replica without the prefix."""
    small, target = pair
    llm = SpeculativeThinkingLLM(small_url=small.url, target_url=target.url)
    try:
        await llm.achat(QUESTION, session_id="user-42")
        stream = await llm.astream_chat(QUESTION, session_id="user-42")
        async for _ in stream:
            pass
        await llm.acomplete("What is x?", session_id="user-42")
    finally:
        await llm.aclose()
    keys = {r.headers.get("x-session-id") for s in (small, target) for r in s.records}
    assert keys == {"user-42"}
    assert len(target.records) >= 3


def test_token_ids_come_from_the_small_server(
        pair: tuple[LoopbackServer, LoopbackServer]) -> None:
    small, target = pair
    llm = SpeculativeThinkingLLM(small_url=small.url, target_url=target.url)
    try:
        ids = llm.get_token_ids("Count these tokens, please.")
    finally:
        llm.close()
    assert ids and all(isinstance(i, int) for i in ids)
    assert small.calls_to("/tokenize")
