"""LangChain on a gpt-oss pair over vLLM-protocol servers that render the real gpt-oss chat
template (tests/core/formats/test_pair_formats.py sets it up): the family's response template
splits what the adapter returns."""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("langchain_core")

from specthink_lc import ChatSpeculativeThinking
from tests.core.formats.test_pair_formats import ANSWER, REASONING, start


async def test_langchain_on_the_gpt_oss_pair(loopback_server: Callable[..., object]) -> None:
    """If this fails, LangChain users of a gpt-oss pair get harmony's reasoning in the content
    (or lose it): with ``response_template="gpt-oss"`` the content is exactly the answer and
    ``reasoning_content`` exactly the reasoning, invoked or streamed."""
    pair = start(loopback_server)
    model = ChatSpeculativeThinking(
        small_url=pair.small.url, target_url=pair.target.url, backend="openai",
        small_model="openai/gpt-oss-20b", target_model="openai/gpt-oss-120b",
        small_template="server", target_template="server", response_template="gpt-oss")
    try:
        message = await model.ainvoke("What is 12 * 13?")
        assert message.content == ANSWER
        assert message.additional_kwargs["reasoning_content"] == REASONING
        assert sum(message.response_metadata["speculative_thinking"]["takeovers"].values()) >= 1
        content, reasoning = "", ""
        async for chunk in model.astream("What is 12 * 13?"):
            content += str(chunk.content)
            reasoning += chunk.additional_kwargs.get("reasoning_content", "")
        assert (content, reasoning) == (ANSWER, REASONING)
    finally:
        await model.aclose()
