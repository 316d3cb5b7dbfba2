"""Every built-in response template, executed by specthink's streaming parser piece by piece,
gives what transformers' ``parse_response`` gives on the same raw text: an assistant turn as each
family's REAL chat template (tests/data/chat_templates, rendered by transformers' own renderer)
writes it after the real generation prompt, cut where the server stops (the stop token is never
in the text), and that is the reasoning, answer and calls the turn was rendered from.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

transformers_chat = pytest.importorskip("transformers.utils.chat_parsing")

from specthink.formats.families import (  # noqa: E402 - after the skip
    FAMILIES,
    builtin_template,
    family_of,
    template_names,
)
from specthink.formats.response_template import ResponseParser  # noqa: E402
from tests.core.formats.family_cases import (  # noqa: E402
    ANSWER,
    CASES,
    REASONING,
    TOOLS,
    USER,
    render,
)


def pieces(text: str, how: str) -> list[str]:
    if how == "whole":
        return [text]
    if how == "chars":
        return list(text)
    rng = random.Random(how)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        out.append(text[i:i + n])
        i += n
    return out


def streamed(template: str, prompt: str, output: str, how: str,
             tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    parser = ResponseParser(builtin_template(template), prompt, tools=tools)
    for piece in pieces(output, how):
        parser.feed(piece)
    return parser.finalize()[0]


@pytest.mark.parametrize("how", ["whole", "chars", "seed-1", "seed-2"])
@pytest.mark.parametrize("with_tools", [True, False], ids=["tools", "no-tools"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_parse_equals_transformers(name: str, with_tools: bool, how: str) -> None:
    """If this fails, a family's built-in template (or specthink's executor of the format)
    reads the family's real output differently from transformers' parse_response: wrong
    reasoning, answer or calls for that family."""
    case = CASES[name]
    prompt, output = case.raw()
    tools = TOOLS if with_tools else None
    spec = json.loads(json.dumps(builtin_template(case.template).spec))
    theirs = transformers_chat.parse_response(output, spec, prefix=prompt, tools=tools)
    assert streamed(case.template, prompt, output, how, tools) == theirs


@pytest.mark.parametrize("name", sorted(CASES))
def test_builtin_reads_the_turn_it_was_rendered_from(name: str) -> None:
    """If this fails, a built-in template parses without error but gets a family's reasoning,
    answer or call wrong (transformers would agree with the wrong result)."""
    case = CASES[name]
    prompt, output = case.raw()
    message = streamed(case.template, prompt, output, "seed-3", TOOLS)
    assert message.get("reasoning_content") == case.reasoning
    assert message.get("content") == case.content
    assert message.get("tool_calls", []) == case.calls


def test_every_builtin_and_family_is_exercised() -> None:
    """If this fails, a built-in response template or a family has no rendering above."""
    assert {c.template for c in CASES.values()} == set(template_names())
    assert {f.name for f in FAMILIES} <= {name.split("/")[0] for name in CASES}


@pytest.mark.parametrize(("model_type", "template"),
                         [("qwen3", "qwen3"), ("gemma4", "gemma-4")])
def test_builtins_match_transformers_own_templates(model_type: str, template: str) -> None:
    """If this fails, a built-in drifted from the response template transformers ships for the
    same family (transformers.cli.serving's fallbacks per model_type). (qwen3-xml is theirs for
    qwen3_5 but for one thing: whitespace ending the output closes the answer, as Nemotron 3
    ends a call turn with a newline before the stop token; see test_xml_answer_survives_...)"""
    serving = pytest.importorskip("transformers.cli.serving.utils")
    theirs = next(spec for types, spec in serving._RESPONSE_TEMPLATE_FALLBACKS.items()
                  if model_type in types)
    ours = dict(builtin_template(template).spec)
    ours.pop("version", None)
    assert ours == theirs


def test_family_ids_of_the_rendered_checkpoints() -> None:
    """If this fails, a checkpoint whose real template is tested here is not found by its id."""
    expected = {
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": "deepseek-r1",
        "deepseek-ai/DeepSeek-R1-0528": "deepseek-r1-0528",
        "deepseek-ai/DeepSeek-V3.1": "deepseek-v3.1",
        "deepseek-ai/DeepSeek-V3.1-Terminus": "deepseek-v3.1",
        "Qwen/QwQ-32B": "qwen3", "Qwen/Qwen3-0.6B": "qwen3",
        "HuggingFaceTB/SmolLM3-3B": "qwen3",
        "Qwen/Qwen3.5-4B": "qwen3-xml", "Qwen/Qwen3-Coder-30B-A3B-Instruct": "qwen3-xml",
        "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": "nemotron-3",
        "openai/gpt-oss-120b": "gpt-oss", "openai/gpt-oss-20b": "gpt-oss",
        "google/gemma-4-31B-it": "gemma-4",
        "mistralai/Ministral-3-14B-Reasoning-2512": "mistral-reasoning",
        "mistralai/Magistral-Small-2509": "mistral-reasoning",
        "ibm-granite/granite-3.3-2b-instruct": "granite",
        "ibm-granite/granite-3.3-8b-instruct": "granite",
        # Granite 4.0 / 4.1 templates have no thinking switch and call in Hermes blocks.
        "ibm-granite/granite-4.0-h-small": None, "ibm-granite/granite-4.1-8b": None,
        "microsoft/Phi-4-reasoning": "phi-4-reasoning",
        "microsoft/Phi-4-reasoning-plus": "phi-4-reasoning",
        # Phi-4 and Phi-4-mini do not reason; the mini reasoners and the vision reasoner have
        # other templates (no <think> in Phi-4-mini-reasoning's, a <nothink> mode in -vision's).
        "microsoft/phi-4": None, "microsoft/Phi-4-mini-instruct": None,
        "microsoft/Phi-4-mini-reasoning": None, "microsoft/Phi-4-mini-flash-reasoning": None,
        "microsoft/Phi-4-reasoning-vision-15B": None,
    }
    found = {model: (f.template if (f := family_of(model)) else None) for model in expected}
    assert found == expected


def test_xml_answer_survives_a_newline_before_the_stop_token() -> None:
    """If this fails, a Nemotron 3 / Qwen3.5 turn with an answer and a call loses its answer:
    the newline its template writes after </tool_call> (the server drops the stop token after
    it) reopens the answer empty and overwrites it, as transformers' qwen3_5 template does."""
    output = f"{REASONING}\n</think>\n{ANSWER}\n<tool_call>\n<function=f>\n</function>\n" \
             "</tool_call>\n"
    message = streamed("qwen3-xml", "<|im_start|>assistant\n<think>\n", output, "chars", None)
    assert message["content"] == ANSWER
    assert message["tool_calls"] == [{"type": "function",
                                      "function": {"name": "f", "arguments": {}}}]


def test_granite_turn_starts_after_a_generation_prompt_with_controls() -> None:
    """If this fails, Granite's start anchor misses the generation prompt its template writes
    with ``controls`` (``<|start_of_role|>assistant {...}<|end_of_role|>``): the whole prompt is
    read as the turn, and the ``<think></think>`` of its thinking system text is taken for a
    reasoning the turn already closed (thinking off), so the reasoning the model then writes is
    not expected."""
    template = builtin_template("granite")
    for extra in ({}, {"controls": {"length": "short"}}):
        prompt = render("ibm-granite-granite-3.3-2B-Instruct.jinja", USER, generation=True,
                        tools=None, thinking=True, **extra)
        assert "<think></think>" in prompt
        assert template.assistant_tail(prompt) == ""
        assert not template.closes_reasoning(prompt)
    assert prompt.endswith('<|start_of_role|>assistant {"length": "short"}<|end_of_role|>')


def test_phi4_reasoning_turn_starts_after_its_generation_prompt() -> None:
    """If this fails, Phi-4-reasoning's start anchor misses its generation prompt
    (``<|im_start|>assistant<|im_sep|>``, not ChatML's ``<|im_start|>assistant\\n``): the whole
    prompt is read as the turn, and the ``<think> {Thought section} </think>`` its system text
    always writes is taken for a reasoning the turn already closed, as if thinking were off
    (what the ``qwen3`` built-in makes of it)."""
    prompt = render("microsoft-Phi-4-reasoning.jinja", USER, generation=True)
    assert "<think> {Thought section} </think>" in prompt
    template = builtin_template("phi-4-reasoning")
    assert template.assistant_tail(prompt) == ""
    assert not template.closes_reasoning(prompt)
    assert not template.starts_in_reasoning(prompt)
    assert builtin_template("qwen3").closes_reasoning(prompt)
