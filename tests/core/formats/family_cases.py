"""Each family's assistant turn as its REAL chat template writes it (tests/data/chat_templates,
rendered by transformers' own renderer), after the real generation prompt, cut where the server
stops; shared by the tests of the response templates and of the splitter."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")

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
         "<|tool_response>", "<|end_of_text|>")


def render(template_file: str, messages: Sequence[Mapping[str, Any]], *, generation: bool,
           tools: Sequence[Mapping[str, Any]] | None = TOOLS, **kwargs: Any) -> str:
    source = (TEMPLATES / template_file).read_text(encoding="utf-8")
    rendered, _ = chat_template_utils.render_jinja_template(
        [list(messages)], tools=tools, chat_template=source, add_generation_prompt=generation,
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


def _v31_calls() -> str:
    """DeepSeek-V3.1 thinks after the prompt's "<think>", then calls as its template renders an
    assistant's tool calls."""
    whole = render("deepseek-ai-DeepSeek-V3.1.jinja",
                   [*USER, {"role": "assistant", "content": None, "tool_calls": [CALL]}],
                   generation=False)
    start = whole.index("<｜tool▁calls▁begin｜>")
    end = whole.index("<｜tool▁calls▁end｜>") + len("<｜tool▁calls▁end｜>")
    return f"{REASONING}</think>{ANSWER}{whole[start:end]}"


GRANITE_CALL = '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]'
GRANITE_DECOY = '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
GRANITE_DECOY_REASONING = f"The user wants the weather. Maybe {GRANITE_DECOY} first?\n\n" \
                          "Wait, no: the question is about Paris."


def _granite(content: str, **expected: Any) -> Case:
    """A Granite 3.3 turn whose content is written as given (thinking on in the prompt)."""
    return Case("granite", "ibm-granite-granite-3.3-2B-Instruct.jinja",
                kwargs={"thinking": True}, turn={"role": "assistant", "content": content},
                **expected)


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
    "nemotron-3": Case("nemotron-3", "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja",
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
    # Granite 3.3's template renders an assistant turn's content only (no reasoning, no
    # tool_calls): the turn is written as its model writes it with thinking on, in llama.cpp's
    # Granite layout: <think>, the answer in <response>, then <|tool_call|> and a JSON list.
    "granite-3.3": _granite(f"<think>{REASONING}</think><response>{ANSWER}</response>"
                            f"{GRANITE_CALL}"),
    "granite-3.3/decoy": _granite(f"<think>{GRANITE_DECOY_REASONING}</think>\n<response>"
                                  f"{ANSWER}</response>\n{GRANITE_CALL}",
                                  reasoning=GRANITE_DECOY_REASONING),
    "granite-3.3/answer": _granite(f"<think>{REASONING}</think>\n<response>{ANSWER}</response>",
                                   calls=[]),
    # llama.cpp's Granite parser reads an answer written without <response> too.
    "granite-3.3/untagged": _granite(f"<think>{REASONING}</think>{ANSWER}", calls=[]),
    # Thinking off: no tags at all.
    "granite-3.3/plain": _granite(ANSWER, reasoning=None, calls=[]),
    # Phi-4-reasoning's template renders an assistant turn's content as given, after a
    # generation prompt that does not open <think> (its system text asks for "<think> {Thought
    # section} </think> {Solution section}"). It renders no tools and no tool_calls: a call is a
    # Hermes block, as specthink's call opener (tool_choice) or a user's tool prompt asks for.
    "phi-4-reasoning": Case("phi-4-reasoning", "microsoft-Phi-4-reasoning.jinja", calls=[], turn={
        "role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"}),
    "phi-4-reasoning/call": Case("phi-4-reasoning", "microsoft-Phi-4-reasoning.jinja", turn={
        "role": "assistant",
        "content": f"<think>\n{REASONING}\n</think>\n\n{ANSWER}\n{HERMES_CALL}"}),
    # V3.1's template renders a call turn without its reasoning: composed the same way.
    "deepseek-v3.1": Case("deepseek-v3.1", "deepseek-ai-DeepSeek-V3.1.jinja",
                          kwargs={"thinking": True}, compose=_v31_calls),
}
