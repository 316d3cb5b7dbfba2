"""The LlamaIndex examples, run against a loopback pair, so they cannot rot."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from specthink.testing import last_user_message

from .li_support import PromptReader, ignore_memory_leak, workflow_agent

pytestmark = ignore_memory_leak

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
THINK = "<think>\n{}\n</think>\n\n"
TEMPLATES = {"small_template": "chatml", "target_template": "chatml"}


def call(name: str, arguments: dict[str, object]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def answer(conversation: str) -> str:
    """What the examples' model says, read from the conversation in its prompt."""
    question = last_user_message(conversation)
    if "<tool_response>" in conversation:
        weather = re.search(r"It is (\w+) and (\d+) degrees in (\w+)", conversation)
        product = re.search(r"<tool_response>\n(\d+)\n</tool_response>", conversation)
        assert weather and product, conversation
        return (f"It is {weather[1]} and {weather[2]} degrees in {weather[3]}, "
                f"and 6 times 7 is {product[1]}.")
    if "weather in Paris" in question:
        return (THINK.format("Two tools are needed.\n\nYes, both at once.")
                + call("get_weather", {"city": "Paris"}) + "\n"
                + call("multiply", {"a": 6, "b": 7}))
    if observed := re.search(r"Observation: (\d+)", conversation):
        return ("Thought: I can answer without using any more tools.\n"
                f"Answer: 12 times 13 is {observed[1]}.")
    if "12 times 13" in question:
        return (THINK.format("A tool multiplies.\n\nWait, which one? multiply.")
                + "Thought: I need to use a tool to help me answer the question.\n"
                + 'Action: multiply\nAction Input: {"a": 12, "b": 13}')
    if "capital of Zembla" in question:
        found = re.search(r"The capital of Zembla is (\w+)\.", conversation)
        return THINK.format("The context names it.\n\nLet me check: yes.") + (
            f"The capital of Zembla is {found[1]}." if found else "The context does not say.")
    if "What is my name?" in question:
        named = re.search(r"My name is (\w+)", conversation)
        return f"Your name is {named[1]}." if named else "You did not tell me."
    if "221" in question:
        return (THINK.format("221 is odd.\n\nWait, 13 * 17 = 221.\n\nLet me verify: 13 * 17 "
                             "is 130 + 91 = 221.") + "No: 221 = 13 * 17.")
    if "My name is" in question:
        return "Nice to meet you, Ada."
    return "I have no script for this question."


MODEL = PromptReader(answer)



def test_li_query_engine(
        example: Callable[[str], ModuleType], example_urls: tuple[str, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert example("li_query_engine").main(*example_urls, **TEMPLATES) == \
        "The capital of Zembla is Vrell."
    out = capsys.readouterr().out
    assert "models: test/small + test/target, context window 4096 tokens" in out
    assert "from 3 retrieved passages" in out


def test_li_chat_engine(
        example: Callable[[str], ModuleType], example_urls: tuple[str, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    replies = example("li_chat_engine").main(*example_urls, **TEMPLATES)
    assert replies == ["Nice to meet you, Ada.", "No: 221 = 13 * 17.", "Your name is Ada."]
    assert "(6 messages in the history)" in capsys.readouterr().out


@workflow_agent
def test_li_react_agent(
        example: Callable[[str], ModuleType], example_urls: tuple[str, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert example("li_react_agent").main(*example_urls, **TEMPLATES) == "12 times 13 is 156."
    assert "tool multiply({'a': 12, 'b': 13}) -> 156" in capsys.readouterr().out


@workflow_agent
def test_li_function_agent(
        example: Callable[[str], ModuleType], example_urls: tuple[str, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert example("li_function_agent").main(*example_urls, **TEMPLATES) == \
        "It is sunny and 21 degrees in Paris, and 6 times 7 is 42."
    out = capsys.readouterr().out
    assert "tool get_weather({'city': 'Paris'}) -> It is sunny and 21 degrees in Paris." in out
    assert "tool multiply({'a': 6, 'b': 7}) -> 42" in out
    assert "(thinking) Two tools are needed." in out
