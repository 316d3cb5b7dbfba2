"""Scripted pairs of every family, over vLLM-protocol loopback servers that render the family's
REAL chat template (tests/data/chat_templates): what the LangChain, LlamaIndex and serve family
tests run against.

Each family's model writes, after its generation prompt, the turn its real template renders
for an assistant message (transformers' renderer; composed as the model writes it where the
template renders no reasoning or no calls), so a turn is the family's own text, special tokens
included, cut after its stop token. Three turns per family:

- ``plain``: reasoning (with a "Wait" after a paragraph break, so the target takes over) and an
  answer, when no tools are offered;
- ``call``: reasoning that drafts a decoy call in the family's own call syntax, then the
  answer text and a call of ``get_weather`` for Paris, when tools are offered;
- ``after_tool``: reasoning and the final answer, once the tool's result is in the prompt.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

from specthink.testing import Continuation, JinjaChatTemplate
from tests.support import ServerPair

chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")

TEMPLATES = Path(__file__).resolve().parents[2] / "data" / "chat_templates"

QUESTION = "Weather in Paris?"
TOOL_DESCRIPTION = "The weather of a city."
TOOL_RESULT = "Sunny, 21 C"
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": TOOL_DESCRIPTION,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CALL_ID = "call12345"
"""Nine alphanumerics: Mistral's templates refuse other tool-call ids."""
ARGUMENTS = {"city": "Paris", "days": 2}
CALL = {"id": CALL_ID, "type": "function",
        "function": {"name": "get_weather", "arguments": ARGUMENTS}}

PLAIN_REASONING = ("12 * 13 = 120 + 36.\n\nWait, let me check: 120 + 36 = 156.\n\n"
                   "So the product is 156.")
PLAIN_ANSWER = "12 * 13 = 156."
CALL_ANSWER = "Let me check."
FINAL_REASONING = "The tool says sunny.\n\nWait, it also gives 21 C.\n\nSo: sunny and mild."
FINAL_ANSWER = "Sunny and 21 C in Paris."


def call_reasoning(decoy: str) -> str:
    """Reasoning that drafts ``decoy`` (a call of Oslo in the family's syntax) and drops it."""
    return (f"The user wants the weather. Maybe {decoy} first?\n\n"
            "Wait, no: the question is about Paris.")


def render(template: JinjaChatTemplate, messages: Sequence[Mapping[str, Any]], *,
           generation: bool, kwargs: Mapping[str, Any],
           tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """``messages`` as transformers' renderer writes them with the family's real template."""
    rendered, _ = chat_template_utils.render_jinja_template(
        [list(messages)], tools=tools, chat_template=template.source,
        add_generation_prompt=generation, bos_token=template.bos_token,
        eos_token=template.eos_token, **kwargs)
    return str(rendered[0])


Compose = Callable[[str, str, bool], str]
"""``(reasoning, content, with_call) -> output``: the text a model writes after the
generation prompt, stop token included, where its template renders no reasoning or no calls
of a last turn."""


@dataclass(frozen=True)
class Family:
    """One family's pair: model ids, the real template both servers render, where its
    generation prompt ends (``heads``), the decoy it could draft, and how its turns are
    written."""

    name: str
    small: str
    target: str
    template: JinjaChatTemplate
    heads: tuple[str, ...]
    decoy: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """The family's thinking switch, as specthink passes it by default."""
    call_has_content: bool = True
    """Whether a call turn has an answer beside the call: gpt-oss's template refuses one
    beside thinking; Gemma 4's writes it after the tool's result, closing the turn."""
    content_blocks: bool = False
    """Mistral: the reasoning as a ``thinking`` content block."""
    compose: Compose | None = None

    @property
    def call_answer(self) -> str:
        """The content of the call turn."""
        return CALL_ANSWER if self.call_has_content else ""

    @property
    def call_reasoning(self) -> str:
        return call_reasoning(self.decoy)

    def assistant(self, reasoning: str | None, content: str, *,
                  call: bool) -> dict[str, Any]:
        """An assistant message as the family's template reads it."""
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None and self.content_blocks:
            message["content"] = [{"type": "thinking", "thinking": reasoning},
                                  {"type": "text", "text": content}]
        elif reasoning is not None:
            message["reasoning_content"] = reasoning
        if call:
            message["tool_calls"] = [copy.deepcopy(CALL)]
        return message

    def history(self, reasoning: str | None = None) -> list[dict[str, Any]]:
        """The conversation after the call turn, as an OpenAI client sends it: question, the
        call (its reasoning handed back as ``reasoning_content`` when given), the tool's
        result."""
        call: dict[str, Any] = {"role": "assistant", "content": self.call_answer,
                                "tool_calls": [copy.deepcopy(CALL)]}
        if reasoning is not None:
            call["reasoning_content"] = reasoning
        return [{"role": "user", "content": QUESTION}, call,
                {"role": "tool", "tool_call_id": CALL_ID, "content": TOOL_RESULT}]

    def _turn(self, before: list[dict[str, Any]], reasoning: str, content: str, *,
              call: bool, tools: Sequence[Mapping[str, Any]] | None) -> str:
        """What the model writes after the last head of the generation prompt for
        ``before``: the prompt's own tail after that head (e.g. an opened ``<think>``), then the
        turn, stop token included."""
        prompt = render(self.template, before, generation=True, kwargs=self.kwargs,
                        tools=tools)
        head = max((prompt.rfind(h) + len(h), h) for h in self.heads if h in prompt)[0]
        if self.compose is not None:
            output = self.compose(reasoning, content, call)
        else:
            whole = render(self.template,
                           [*before, self.assistant(reasoning, content, call=call)],
                           generation=False, kwargs=self.kwargs, tools=tools)
            assert whole.startswith(prompt), f"{self.name}: the turn must continue the prompt"
            output = _through_stop(whole[len(prompt):], self.template.stop_tokens)
        return prompt[head:] + output

    @cached_property
    def plain_turn(self) -> str:
        return self._turn([{"role": "user", "content": "What is 12 * 13?"}], PLAIN_REASONING,
                          PLAIN_ANSWER, call=False, tools=None)

    @cached_property
    def call_turn(self) -> str:
        return self._turn([{"role": "user", "content": QUESTION}], self.call_reasoning,
                          self.call_answer, call=True, tools=WEATHER)

    @cached_property
    def bare_call_turn(self) -> str:
        """The call turn without an answer beside the call: what follows the call's opener
        that a required ``tool_choice`` writes right after the reasoning."""
        return self._turn([{"role": "user", "content": QUESTION}], self.call_reasoning, "",
                          call=True, tools=WEATHER)

    @cached_property
    def after_tool_turn(self) -> str:
        return self._turn(self.history(), FINAL_REASONING, FINAL_ANSWER, call=False,
                          tools=WEATHER)

    def shows_earlier_reasoning(self, reasoning: str) -> bool:
        """Whether the template, as vLLM renders it, shows a tool turn's reasoning on the
        next call (gpt-oss, Gemma 4, Qwen3.5...); others drop it."""
        return reasoning in self.template.render(self.history(reasoning), WEATHER,
                                                 template_kwargs=self.kwargs)


def _through_stop(text: str, stops: Sequence[str]) -> str:
    ends = [i + len(stop) for stop in stops if (i := text.find(stop)) >= 0]
    assert ends, "the rendered turn must end with a stop token"
    return text[:min(ends)]


class FamilyModel:
    """A family's model, greedy: the ``after_tool`` turn once a tool's result is in the
    prompt, a call turn when the tool is offered (its name in the prompt; with or without an
    answer beside the call, whichever the prompt already holds), else the ``plain`` one;
    continued from whatever the prompt holds of it after one of the family's heads (whoever
    wrote it)."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self.prompts: list[str] = []

    def continuation(self, prompt: str) -> Continuation:
        self.prompts.append(prompt)
        family = self.family
        turns = ([family.after_tool_turn] if TOOL_RESULT in prompt
                 else [family.call_turn, family.bare_call_turn] if "get_weather" in prompt
                 else [family.plain_turn])
        for head in family.heads:
            at = prompt.find(head)
            while at != -1:
                written = prompt[at + len(head):]
                for turn in turns:
                    if turn.startswith(written):
                        return Continuation(turn[len(written):])
                at = prompt.find(head, at + 1)
        return Continuation("")


def _template(file: str, *, special: tuple[str, ...] = (), stops: tuple[str, ...],
              bos: str = "", eos: str = "") -> JinjaChatTemplate:
    return JinjaChatTemplate(file.removesuffix(".jinja"),
                             (TEMPLATES / file).read_text(encoding="utf-8"), bos_token=bos,
                             eos_token=eos, special_tokens=tuple(dict.fromkeys(special + stops)),
                             stop_tokens=stops)


HERMES_DECOY = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
XML_DECOY = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
             "</function>\n</tool_call>")
_THINKING = {"enable_thinking": True}
_IM_END = ("<|im_end|>",)


def _granite(reasoning: str, content: str, call: bool) -> str:
    """Granite 3.3's template renders no reasoning and no calls: llama.cpp's Granite layout."""
    calls = ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]'
             if call else "")
    answer = f"<response>{content}</response>" if content else ""
    return f"<think>{reasoning}</think>{answer}{calls}<|end_of_text|>"


def _gpt_oss(reasoning: str, content: str, call: bool) -> str:
    """gpt-oss writes a call's recipient in the channel header (``<|channel|>commentary
    to=functions.NAME <|constrain|>json``, as OpenAI's harmony guide shows a model's output),
    where its template renders an earlier call with the recipient first."""
    analysis = f"<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant"
    if call:
        return (f"{analysis}<|channel|>commentary to=functions.get_weather <|constrain|>json"
                '<|message|>{"city": "Paris", "days": 2}<|call|>')
    return f"{analysis}<|channel|>final<|message|>{content}<|return|>"


def _gemma4(reasoning: str, content: str, call: bool) -> str:
    """Gemma 4's template renders a last turn's thought only beside calls: written as the
    model writes, thought, answer or call (a tool's result follows the call in the same model
    turn, and the model goes on after it)."""
    calls = ('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>'
             "<|tool_response>" if call else "<turn|>")
    return f"<|channel>thought\n{reasoning}<channel|>{content}{calls}"


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("qwen3", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-8B",
           _template("Qwen-Qwen3-0.6B.jinja", stops=_IM_END),
           ("<|im_start|>assistant\n",), HERMES_DECOY, _THINKING),
    Family("qwen3.5", "Qwen/Qwen3.5-4B", "Qwen/Qwen3.5-27B",
           _template("Qwen3.5-4B.jinja", stops=_IM_END),
           ("<|im_start|>assistant\n",), XML_DECOY, _THINKING),
    Family("nemotron-3", "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
           "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-FP8",
           _template("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja", stops=_IM_END),
           ("<|im_start|>assistant\n",), XML_DECOY, _THINKING),
    Family("gpt-oss", "openai/gpt-oss-20b", "openai/gpt-oss-120b",
           _template("openai-gpt-oss-120b.jinja",
                     special=("<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                              "<|constrain|>"), stops=("<|return|>", "<|call|>")),
           ("<|start|>assistant",), HERMES_DECOY, call_has_content=False,
           compose=_gpt_oss),
    Family("gemma-4", "google/gemma-4-E4B-it", "google/gemma-4-31B-it",
           _template("google-gemma-4-31B-it.jinja", bos="<bos>",
                     special=("<|turn>", "<|channel>", "<channel|>", "<|think|>",
                              "<|tool_call>", "<tool_call|>", '<|"|>', "<|tool_response>"),
                     stops=("<turn|>", "<|tool_response>")),
                  ("<|turn>model\n", "<tool_response|>"),
           '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>', _THINKING,
           call_has_content=False, compose=_gemma4),
    Family("mistral-reasoning", "mistralai/Ministral-3-8B-Reasoning-2512",
           "mistralai/Ministral-3-14B-Reasoning-2512",
           _template("mistralai-Ministral-3-14B-Reasoning-2512.jinja", bos="<s>", eos="</s>",
                     special=("<s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                              "[/SYSTEM_PROMPT]", "[THINK]", "[/THINK]", "[TOOL_CALLS]",
                              "[ARGS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
                              "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"), stops=("</s>",)),
           ("[/INST]", "[/TOOL_RESULTS]"), '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}',
           content_blocks=True),
    Family("granite", "ibm-granite/granite-3.3-2b-instruct",
           "ibm-granite/granite-3.3-8b-instruct",
           _template("ibm-granite-granite-3.3-2B-Instruct.jinja",
                     special=("<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"),
                     stops=("<|end_of_text|>",)),
           ("<|start_of_role|>assistant<|end_of_role|>",),
           '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
           {"thinking": True}, compose=_granite),
)}
"""Every family specthink knows by name, one pair each."""


@dataclass(frozen=True)
class FamilyPair(ServerPair):
    """Both servers of a family's pair, their models, and the settings that name them."""

    family: Family = field(kw_only=True)
    models: tuple[FamilyModel, FamilyModel] = field(kw_only=True)

    @property
    def prompts(self) -> list[str]:
        """Every prompt either model was asked to continue."""
        return [prompt for model in self.models for prompt in model.prompts]

    @property
    def settings(self) -> dict[str, str]:
        """The fields that name the pair: URLs and model ids only, the family found from them."""
        return {"small_url": self.small.url, "target_url": self.target.url,
                "backend": "openai", "small_model": self.family.small,
                "target_model": self.family.target, "small_template": "server",
                "target_template": "server"}


def start_family_pair(loopback_server: Callable[..., Any], name: str,
                      flavor: str = "vllm") -> FamilyPair:
    """The pair of family ``name`` on two vLLM-protocol loopback servers (or ``flavor``'s)."""
    family = FAMILIES[name]
    models = (FamilyModel(family), FamilyModel(family))
    servers = [loopback_server(model, model_id=model_id, flavor=flavor,
                               chat_template=family.template)
               for model, model_id in zip(models, (family.small, family.target), strict=True)]
    return FamilyPair(servers[0], servers[1], family=family, models=models)
