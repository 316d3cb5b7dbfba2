"""One LangChain call checks its messages and tools once (the core's ``ChatRequest``), not once
per layer it passes through (an earlier tree ran the message/tool validation 18 times for one
``ainvoke`` with one message and one tool)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from specthink import prompts
from specthink.testing.inprocess import ScriptedBackend
from specthink.testing.models import ScriptedModel
from specthink_lc import ChatSpeculativeThinking

ANSWER = ('<think>\nI call it.\n</think>\n\n<tool_call>\n{"name": "magic_function", '
          '"arguments": {"input": 3}}\n</tool_call>')


@tool
def magic_function(input: int) -> int:
    """Apply a magic function to an input."""
    return input + 2


@pytest.mark.parametrize("template", ["chatml", "server"])
async def test_one_tool_call_validates_its_message_and_tool_once(
        monkeypatch: pytest.MonkeyPatch, template: str) -> None:
    """Broken if: the caller's message or tool is checked more than once in one ``ainvoke``
    (each surface, the engine and every template on the way re-validating it), or not at all."""
    checked_messages: list[str] = []
    checked_tools: list[str] = []
    validate_message = prompts._validate_message
    validate_tool = prompts._validate_tool

    def count_message(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
        checked_messages.append(str(message.get("content")))
        return validate_message(index, message)

    def count_tool(index: int, tool: Any) -> dict[str, Any]:
        checked_tools.append(str(tool["function"]["name"]))
        return validate_tool(index, tool)

    monkeypatch.setattr(prompts, "_validate_message", count_message)
    monkeypatch.setattr(prompts, "_validate_tool", count_tool)
    model = ChatSpeculativeThinking.from_backends(
        ScriptedBackend(ScriptedModel.single(ANSWER), url="http://small.test"),
        ScriptedBackend(ScriptedModel.single(ANSWER), url="http://target.test"),
        small_template=template, target_template=template)

    message = await model.bind_tools([magic_function]).ainvoke("magic_function(3)?")

    assert isinstance(message, AIMessage)
    assert [call["name"] for call in message.tool_calls] == ["magic_function"]
    assert checked_messages == ["magic_function(3)?"]
    assert checked_tools == ["magic_function"]
