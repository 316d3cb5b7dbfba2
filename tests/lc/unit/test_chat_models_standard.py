"""LangChain's standard unit tests for ChatSpeculativeThinking."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.unit_tests import ChatModelUnitTests
from syrupy.assertion import SnapshotAssertion

from specthink_lc import ChatSpeculativeThinking


class TestChatSpeculativeThinkingUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatSpeculativeThinking]:
        return ChatSpeculativeThinking

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"small_url": "http://127.0.0.1:8031", "target_url": "http://127.0.0.1:8032"}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return (
            {
                "SPECTHINK_SMALL_URL": "http://small.example:8080",
                "SPECTHINK_TARGET_URL": "http://target.example:8080",
                "SPECTHINK_API_KEY": "env-key",
            },
            {},
            {
                "small_url": "http://small.example:8080",
                "target_url": "http://target.example:8080",
                "api_key": "env-key",
            },
        )

    # langchain-core's load(allowed_objects="all") admits only the classes listed in its own
    # serialization mapping, which no package outside langchain can join, so the base test's
    # round trip cannot pass for any third-party model. test_chat_models.py runs the same round
    # trip with allowed_objects=[ChatSpeculativeThinking], the way LangChain documents it.
    @pytest.mark.xfail(
        reason="load(allowed_objects='all') rejects classes outside langchain-core's mapping",
        raises=ValueError, strict=True)
    @pytest.mark.filterwarnings("ignore::langchain_core._api.beta_decorator.LangChainBetaWarning")
    def test_serdes(self, model: BaseChatModel, snapshot: SnapshotAssertion) -> None:
        super().test_serdes(model, snapshot)
