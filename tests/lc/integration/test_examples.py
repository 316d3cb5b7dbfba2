"""The LangChain examples, run against a loopback pair, so they cannot rot."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from langchain_core.messages import AIMessage, ToolMessage

from specthink.testing.models import last_user_message

from ..answers import AnswerModel

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
THINK = "<think>\n{}\n</think>\n\n"


def call(name: str, arguments: dict[str, object]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def answer(prompt: str) -> str:
    """What the examples' model says to each of their questions."""
    question = last_user_message(prompt)
    if "12 * 13" in question:
        return THINK.format("12 * 13 = 120 + 36.\n\nWait, let me check: 120 + 36 = 156.") \
            + "12 * 13 = 156."
    if "221" in question:
        return THINK.format("221 is odd.\n\nWait, 13 * 17 = 221.\n\nLet me verify: 13 * 17 "
                            "is 130 + 91 = 221.") + "No: 221 = 13 * 17."
    if "weather in Paris" in question:
        return THINK.format("Two tools are needed.") + call("get_weather", {"city": "Paris"})
    if "sunny" in question:
        return THINK.format("Now the product.") + call("multiply", {"a": 6, "b": 7})
    if "<tool_response>\n42" in question:
        return "It is sunny and 21 degrees in Paris, and 6 times 7 is 42."
    if "Extract the weather report" in question:
        return THINK.format("The city is Lyon.\n\nYes, 21 degrees.") + call(
            "WeatherReport", {"city": "Lyon", "temperature_c": 21})
    return "I have no script for this question."


MODEL = AnswerModel(answer)



def test_lc_chain(
        example: Callable[[str], ModuleType], example_urls: tuple[str, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    answer_text = example("lc_chain").main(*example_urls, small_template="chatml",
                                           target_template="chatml")

    assert answer_text == "12 * 13 = 156."
    assert capsys.readouterr().out.strip() == "12 * 13 = 156."


def test_lc_stream_shows_the_takeovers(
        example: Callable[[str], ModuleType], example_urls: tuple[str, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    message = example("lc_stream").main(*example_urls, small_template="chatml",
                                        target_template="chatml")

    assert message.text == "No: 221 = 13 * 17."
    stats = message.response_metadata["speculative_thinking"]
    assert stats["takeovers"]["rule1"] >= 1
    printed = capsys.readouterr().out
    assert "No: 221 = 13 * 17." in printed
    assert "target (rule1)" in printed
    assert "takeovers:" in printed


def test_lc_agent_runs_both_tools_then_answers(
        example: Callable[[str], ModuleType], example_urls: tuple[str, str]) -> None:
    messages = example("lc_agent").main(*example_urls, small_template="chatml",
                                        target_template="chatml")

    tool_results = [m.content for m in messages if isinstance(m, ToolMessage)]
    assert tool_results == ["It is sunny and 21 degrees in Paris.", "42"]
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.text == "It is sunny and 21 degrees in Paris, and 6 times 7 is 42."


def test_lc_structured(
        example: Callable[[str], ModuleType], example_urls: tuple[str, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    module = example("lc_structured")

    report = module.main(*example_urls, small_template="chatml", target_template="chatml")

    assert report == module.WeatherReport(city="Lyon", temperature_c=21)
    assert "target share" in capsys.readouterr().out
