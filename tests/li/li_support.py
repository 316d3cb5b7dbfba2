"""Shared pieces of the LlamaIndex adapter tests: a model that answers from its prompt, and
an ``SpeculativeThinkingLLM`` over in-process backends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from specthink import SpeculativeThinker
from specthink.testing.inprocess import ScriptedBackend
from specthink.testing.models import ASSISTANT_MARKERS, Continuation, TextModel
from specthink_li import SpeculativeThinkingLLM

AIOSQLITE_LEAK = r"<aiosqlite\.core\.Connection object"
"""LlamaIndex's default ``Memory`` (chat engines, agents) keeps its chat history in an in-memory
aiosqlite database whose connection it never closes; its ResourceWarning fires at whatever
garbage collection happens to free it."""

ignore_memory_leak = pytest.mark.filterwarnings(f"ignore:{AIOSQLITE_LEAK}:ResourceWarning")

# Warnings raised inside LlamaIndex itself, which nothing in this package can change:
# llama-index-workflows builds an agent by running inspect.getmembers over the instance, which
# reads pydantic's deprecated attributes (``__fields__``, ``model_computed_fields``, ...), and
# ReActAgent.take_step asks ``ctx.is_running``, which llama-index-workflows deprecates.
workflow_agent = pytest.mark.filterwarnings(
    "ignore::pydantic.warnings.PydanticDeprecationWarning",
    "ignore:is_running called from within a step:DeprecationWarning")


class PromptReader:
    """A deterministic "model" whose whole answer is a function of the conversation.

    ``answer(conversation)`` gets the prompt up to the assistant's generation marker and returns
    the full answer; the model continues it from whatever has been written so far (by either
    model), as greedy decoding would, and stops if the written text went elsewhere.
    """

    def __init__(self, answer: Callable[[str], str]) -> None:
        self.answer = answer
        self.conversations: list[str] = []

    def continuation(self, prompt: str) -> Continuation:
        at, marker = max((prompt.rfind(m), m) for m in ASSISTANT_MARKERS)
        conversation = prompt[:at] if at >= 0 else prompt
        written = prompt[at + len(marker):] if at >= 0 else ""
        if not written:
            self.conversations.append(conversation)
        full = self.answer(conversation)
        return Continuation(full[len(written):] if full.startswith(written) else "", True)


def inprocess_llm(model: TextModel, *, template: str = "chatml",
                  target_model: TextModel | None = None, max_input_tokens: int | None = None,
                  **kwargs: Any) -> SpeculativeThinkingLLM:
    """An LLM whose two "servers" run ``model`` in-process (no sockets)."""
    thinker = SpeculativeThinker(
        small=ScriptedBackend(model, url="inprocess://small", model_id="test/small-1.5b",
                              max_input_tokens=max_input_tokens),
        target=ScriptedBackend(target_model or model, url="inprocess://target",
                               model_id="test/target-32b", max_input_tokens=max_input_tokens),
        small_template=template, target_template=template)
    return SpeculativeThinkingLLM.from_thinker(thinker, **kwargs)
