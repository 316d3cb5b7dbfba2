"""The template-driven splitter on every family's real output: reasoning exactly the reasoning,
the answer exactly the answer, the call exact, a decoy in the reasoning never a call, an
unoffered function never a call, a malformed call shown as text, and the shown pieces joining to
the whole whatever the split."""

from __future__ import annotations

import random

import pytest

from specthink.formats.families import builtin_template
from specthink.formats.splitting import TemplateSplit, TemplateSplitter
from tests.core.formats.family_cases import ARGS, CASES, TOOLS

STARTS_IN_REASONING = {"qwq", "qwen3.5", "nemotron-3", "deepseek-r1", "deepseek-r1-0528",
                       "deepseek-v3.1"}
"""Families whose generation prompt (with thinking on) opens the reasoning."""


def split(template: str, prompt: str, output: str, *, seed: int | None,
          **options: object) -> tuple[TemplateSplitter, TemplateSplit, list[tuple[str, str]]]:
    splitter = TemplateSplitter(builtin_template(template), prompt, **options)  # type: ignore[arg-type]
    shown: list[tuple[str, str]] = []
    rng = random.Random(seed)
    i = 0
    while i < len(output):
        n = len(output) if seed is None else rng.randint(1, 5)
        shown += splitter.feed(output[i:i + n])
        i += n
    result = splitter.finish()
    return splitter, result, shown + result.pieces


@pytest.mark.parametrize("seed", [None, 1, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_family_split_exactly(name: str, seed: int | None) -> None:
    """If this fails, a family's reasoning, answer or call comes out wrong from the splitter,
    or the pieces shown while streaming do not add up to them."""
    case = CASES[name]
    prompt, output = case.raw()
    splitter, result, shown = split(case.template, prompt, output, seed=seed, tools=TOOLS)
    assert splitter.starts_in_reasoning == (name in STARTS_IN_REASONING)
    assert result.reasoning == (case.reasoning or "")
    assert result.answer == (case.content or "")
    assert [(c.name, c.arguments) for c in result.tool_calls] == \
        [("get_weather", ARGS)] * len(case.calls)
    assert "".join(t for k, t in shown if k == "reasoning") == result.reasoning
    assert "".join(t for k, t in shown if k == "answer") == result.answer


def test_a_decoy_in_the_reasoning_is_never_a_call() -> None:
    """If this fails, a call the model only drafted while thinking is executed."""
    decoy = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    _, result, _ = split("qwen3-xml", "<|im_start|>assistant\n<think>\n",
                         f"Maybe {decoy}? No.\n</think>\n\nSunny.", seed=3, tools=TOOLS)
    assert result.tool_calls == []
    assert decoy in result.reasoning and result.answer == "Sunny."


def test_an_unoffered_function_is_never_a_call() -> None:
    """If this fails, the model can call a function the caller never offered."""
    output = ("[THINK]x[/THINK]Ok.[TOOL_CALLS]rm_rf[ARGS]{}"
              '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}')
    _, result, _ = split("mistral-reasoning", "[/INST]", output, seed=4, tools=TOOLS)
    assert [c.name for c in result.tool_calls] == ["get_weather"]


def test_a_malformed_call_is_shown_not_lost() -> None:
    """If this fails, a call with broken JSON raises mid-stream or vanishes from the answer."""
    _, result, _ = split("qwen3", "<|im_start|>assistant\n", "Ok <tool_call>{broken</tool_call>",
                         seed=5, tools=TOOLS)
    assert result.tool_calls == []
    assert result.answer == "Ok <tool_call>{broken</tool_call>"


def test_without_tools_call_markup_is_answer_text() -> None:
    """If this fails, a model's call markup disappears when no tool was offered (today's
    splitter shows it as text)."""
    output = '<|channel|>final<|message|>See <|channel|>commentary to=functions.f<|message|>{}'
    _, result, _ = split("gpt-oss", "<|start|>assistant", output, seed=None)
    assert result.tool_calls == []
    assert result.answer == "See <|channel|>commentary to=functions.f<|message|>{}"


def test_call_limit_and_tgis_no_tool() -> None:
    """If this fails, parallel_tool_calls=False keeps more than one call, or TGI's no_tool
    pseudo-call is not turned back into the answer."""
    calls = "".join(f'<tool_call>{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}'
                    "</tool_call>" for c in ("A", "B"))
    _, result, _ = split("qwen3", "", calls, seed=6, tools=TOOLS, max_tool_calls=1)
    assert [c.arguments for c in result.tool_calls] == [{"city": "A"}]
    no_tool = '<tool_call>{"name": "no_tool", "arguments": {"content": "Just text."}}</tool_call>'
    _, result, _ = split("qwen3", "", no_tool, seed=7, tools=TOOLS)
    assert result.tool_calls == [] and result.answer == "Just text."
