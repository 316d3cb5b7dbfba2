"""Every built-in response template, executed by specthink's streaming parser piece by piece,
gives what transformers' ``parse_response`` gives on the same raw text: an assistant turn as each
family's REAL chat template (tests/data/chat_templates, rendered by transformers' own renderer)
writes it after the real generation prompt, cut where the server stops (the stop token is never
in the text), and that is the reasoning, answer and calls the turn was rendered from.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

transformers_chat = pytest.importorskip("transformers.utils.chat_parsing")
chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")

from specthink.formats.families import (  # noqa: E402 - after the skips
    FAMILIES,
    builtin_template,
    family_of,
    template_names,
)
from specthink.formats.response_template import ResponseParser  # noqa: E402

TEMPLATES = Path(__file__).resolve().parents[2] / "data" / "chat_templates"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]
REASONING = "The user wants the weather.\nI should call get_weather for Paris."
ANSWER = "Let me check."
ARGS = {"city": "Paris", "days": 2}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": ARGS}}
EXPECTED_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": ARGS}}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n' \
              "</tool_call>"
STOPS = ("<|im_end|>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>", "</s>", "<turn|>",
         "<|tool_response>")


def render(template_file: str, messages: Sequence[Mapping[str, Any]], *, generation: bool,
           **kwargs: Any) -> str:
    source = (TEMPLATES / template_file).read_text(encoding="utf-8")
    rendered, _ = chat_template_utils.render_jinja_template(
        [list(messages)], tools=TOOLS, chat_template=source, add_generation_prompt=generation,
        bos_token="<s>", eos_token="</s>", **kwargs)
    return str(rendered[0])


def until_stop(text: str) -> str:
    """What a vLLM-protocol server returns: the text before the stop token."""
    ends = [i for stop in STOPS if (i := text.find(stop)) >= 0]
    return text[:min(ends)] if ends else text


@dataclass
class Case:
    """One family's assistant turn: ``turn`` builds the assistant message the real template
    renders, or ``compose`` writes the output where the template cannot render one."""

    template: str
    file: str
    turn: Mapping[str, Any] | None = None
    compose: Callable[[], str] | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    reasoning: str | None = REASONING
    content: str | None = ANSWER
    calls: list[dict[str, Any]] = field(default_factory=lambda: [EXPECTED_CALL])

    def raw(self) -> tuple[str, str]:
        """``(prompt, output)``."""
        prompt = render(self.file, USER, generation=True, **self.kwargs)
        if self.compose is not None:
            return prompt, self.compose()
        assert self.turn is not None
        whole = render(self.file, [*USER, self.turn], generation=False, **self.kwargs)
        assert whole.startswith(prompt), "the turn must continue the generation prompt"
        return prompt, until_stop(whole[len(prompt):])


def _r1_native_calls() -> str:
    """R1-0528 writes its calls the way the R1 template renders an assistant's tool calls."""
    whole = render("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
                   [*USER, {"role": "assistant", "content": None, "tool_calls": [CALL]}],
                   generation=False)
    start = whole.index("<｜tool▁calls▁begin｜>")
    end = whole.index("<｜tool▁calls▁end｜>") + len("<｜tool▁calls▁end｜>")
    return f"{REASONING}\n</think>\n\n{ANSWER}{whole[start:end]}"


THINKING = {"enable_thinking": True}
CASES = {
    "qwen3": Case("qwen3", "Qwen-Qwen3-0.6B.jinja", kwargs=THINKING, turn={
        "role": "assistant", "reasoning_content": REASONING, "content": ANSWER,
        "tool_calls": [CALL]}),
    # QwQ's template renders an earlier turn's content as given; the model writes after <think>.
    "qwq": Case("qwen3", "Qwen-QwQ-32B.jinja", kwargs=THINKING, turn={
        "role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\n{ANSWER}",
        "tool_calls": [CALL]}),
    # This SmolLM3 template renders no tool_calls; its calls are Hermes blocks in the text.
    "smollm3": Case("qwen3", "HuggingFaceTB-SmolLM3-3B.jinja", turn={
        "role": "assistant",
        "content": f"<think>\n{REASONING}\n</think>\n{ANSWER}\n{HERMES_CALL}"}),
    "qwen3.5": Case("qwen3-xml", "Qwen3.5-4B.jinja", kwargs=THINKING, turn={
        "role": "assistant", "reasoning_content": REASONING, "content": ANSWER,
        "tool_calls": [CALL]}),
    "qwen3-coder": Case("qwen3-xml", "Qwen3-Coder.jinja", reasoning=None, turn={
        "role": "assistant", "content": ANSWER, "tool_calls": [CALL]}),
    "nemotron-3": Case("qwen3-xml", "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja",
                       kwargs=THINKING, turn={
                           "role": "assistant", "reasoning_content": REASONING,
                           "content": ANSWER, "tool_calls": [CALL]}),
    # gpt-oss's template refuses content beside thinking in a call turn: two turns.
    "gpt-oss": Case("gpt-oss", "openai-gpt-oss-120b.jinja", content=None, turn={
        "role": "assistant", "thinking": REASONING, "tool_calls": [CALL]}),
    "gpt-oss/answer": Case("gpt-oss", "openai-gpt-oss-120b.jinja", calls=[], turn={
        "role": "assistant", "thinking": REASONING, "content": ANSWER}),
    "gemma-4": Case("gemma-4", "google-gemma-4-31B-it.jinja", kwargs=THINKING, turn={
        "role": "assistant", "reasoning_content": REASONING, "content": ANSWER,
        "tool_calls": [CALL]}),
    "mistral-reasoning": Case(
        "mistral-reasoning", "mistralai-Ministral-3-14B-Reasoning-2512.jinja", turn={
            "role": "assistant", "tool_calls": [CALL],
            "content": [{"type": "thinking", "thinking": REASONING},
                        {"type": "text", "text": ANSWER}]}),
    # The R1 template drops an earlier turn's reasoning: the output is written as the model
    # writes it after the prompt's "<think>\n", with the Hermes call specthink's R1 prompt asks
    # for; R1-0528's calls are the template's own rendering.
    "deepseek-r1": Case("deepseek-r1", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
                        kwargs=THINKING,
                        compose=lambda: f"{REASONING}\n</think>\n\n{ANSWER}\n{HERMES_CALL}"),
    "deepseek-r1-0528": Case("deepseek-r1-0528", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
                             kwargs=THINKING, compose=_r1_native_calls),
}


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
        "Qwen/QwQ-32B": "qwen3", "Qwen/Qwen3-0.6B": "qwen3",
        "HuggingFaceTB/SmolLM3-3B": "qwen3",
        "Qwen/Qwen3.5-4B": "qwen3-xml", "Qwen/Qwen3-Coder-30B-A3B-Instruct": "qwen3-xml",
        "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": "qwen3-xml",
        "openai/gpt-oss-120b": "gpt-oss", "openai/gpt-oss-20b": "gpt-oss",
        "google/gemma-4-31B-it": "gemma-4",
        "mistralai/Ministral-3-14B-Reasoning-2512": "mistral-reasoning",
        "mistralai/Magistral-Small-2509": "mistral-reasoning",
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
