"""LangChain's standard integration tests, against two loopback TGI-protocol servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar, Literal

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests

from specthink.testing import LoopbackServer
from specthink_lc import ChatSpeculativeThinking


class TestChatSpeculativeThinkingIntegration(ChatModelIntegrationTests):
    urls: ClassVar[dict[str, str]] = {}

    @pytest.fixture(autouse=True)
    def _servers(self, suite_pair: tuple[LoopbackServer, LoopbackServer]) -> Iterator[None]:
        small, target = suite_pair
        type(self).urls = {"small_url": small.url, "target_url": target.url}
        yield

    @pytest.fixture
    async def model(self, request: pytest.FixtureRequest) -> AsyncIterator[BaseChatModel]:
        """The base fixture's model, closed in the test's own event loop afterwards.

        Async tests run on a loop pytest closes after each test; connections pooled on it must
        be closed before that, or they leak (ResourceWarning).
        """
        extra = getattr(request, "param", None) or {}
        chat = self.chat_model_class(**{**self.standard_chat_model_params,
                                        **self.chat_model_params, **extra})
        yield chat
        await chat.aclose()

    @property
    def chat_model_class(self) -> type[ChatSpeculativeThinking]:
        return ChatSpeculativeThinking

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {**self.urls, "small_template": "chatml", "target_template": "chatml"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        # The two models are the servers at small_url and target_url; a per-call model name
        # cannot choose others, so the adapter refuses model= rather than pretend.
        return False

    @property
    def supported_usage_metadata_details(self) -> dict[
            Literal["invoke", "stream"],
            list[Literal["audio_input", "audio_output", "reasoning_output",
                         "cache_read_input", "cache_creation_input"]]]:
        return {"invoke": ["reasoning_output"], "stream": ["reasoning_output"]}

    def invoke_with_reasoning_output(self, *, stream: bool = False) -> AIMessage:
        model = self.chat_model_class(**self.chat_model_params)
        question = "What is 2 + 2?"
        if not stream:
            return model.invoke(question)
        full = None
        for chunk in model.stream(question):
            full = chunk if full is None else full + chunk
        assert isinstance(full, AIMessage)
        return full

    # Images, audio, PDF and video stay off (the langchain-tests defaults): the servers run
    # text-only models.
