"""``tool_choice`` "required" or a named function, honoured in every built-in family's own call
syntax: over vLLM-protocol loopback servers rendering the family's REAL chat template, a pair
whose models would answer in words (they reason, then answer) makes exactly the required call,
because the engine writes the family's call opener after the reasoning, as the family's model
writes a call, and the model fills in the rest. The openers below are written out as each
family's model writes a call (its chat template's rendering of an assistant's tool call, and
harmony's own ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>``), not
read from specthink's data, so a wrong opener in the data makes the model answer in words."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from specthink import SpeculativeThinker
from specthink.errors import ConfigError
from specthink.formats.families import builtin_template, family_of, template_names
from specthink.formats.response_template import load_template
from specthink.output import OutputSplitter, split_result
from specthink.settings import PairSettings
from specthink.testing import Continuation, JinjaChatTemplate, LoopbackServer
from specthink.trace import FinishEvent
from tests.core.formats.test_pair_formats import (
    DEEPSEEK_V31,
    GEMMA_4,
    GRANITE,
    MINISTRAL,
    PHI4,
    QWEN35,
    TEMPLATE,
)
from tests.support import ServerPair

TEMPLATES = Path(__file__).resolve().parents[2] / "data" / "chat_templates"
REASONING = ("The user asks for the weather in Paris.\n\nWait, I know it already: it is "
             "sunny.\n\nSo no tool is needed.")
ANSWER = "It is sunny in Paris."
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CHOICES = {
    # the engine writes the call up to its arguments
    "named": (NAMED, ("get_weather", {"city": "Paris"})),
    # the engine writes the call up to the name; this model then names get_time
    "required": ("required", ("get_time", {"city": "Paris"})),
}

R1_DISTILL = JinjaChatTemplate(
    "deepseek-r1", (TEMPLATES / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text(
        encoding="utf-8"),
    bos_token="<｜begin▁of▁sentence｜>", special_tokens=("<｜end▁of▁sentence｜>",),
    stop_tokens=("<｜end▁of▁sentence｜>",))
NEMOTRON = JinjaChatTemplate(
    "nemotron-3", (TEMPLATES / "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja").read_text(
        encoding="utf-8"), special_tokens=("<|im_end|>",), stop_tokens=("<|im_end|>",))
QWEN3 = JinjaChatTemplate(
    "qwen3", (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8"),
    special_tokens=("<|im_end|>",), stop_tokens=("<|im_end|>",))
DS_END = "<｜end▁of▁sentence｜>"
DS_CALL = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
DS_CALL_END = "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
PARIS = '{"city": "Paris"}'


@dataclass(frozen=True)
class Family:
    """A family's pair, and how its model writes: ``turn`` left to itself (after the
    generation prompt's last ``assistant`` marker following the last ``user`` marker), and
    each ``(opener, rest)``: once the text written so far holds ``opener`` (a call begun as
    this family's model begins one, after its reasoning), the model writes ``rest`` after
    it."""

    models: tuple[str, str]
    template: JinjaChatTemplate
    user: str
    assistant: str
    turn: str
    calls: tuple[tuple[str, str], ...]
    template_kwargs: dict[str, Any] | None = None


def _hermes(close: str, end: str) -> tuple[tuple[str, str], ...]:
    return ((f'{close}\n\n<tool_call>\n{{"name": "get_weather", "arguments": ',
             f"{PARIS}}}\n</tool_call>{end}"),
            (f'{close}\n\n<tool_call>\n{{"name": "',
             f'get_time", "arguments": {PARIS}}}\n</tool_call>{end}'))


FAMILIES: dict[str, Family] = {
    "gpt-oss": Family(
        ("openai/gpt-oss-20b", "openai/gpt-oss-120b"), TEMPLATE, "<|start|>user",
        "<|start|>assistant",
        f"<|channel|>analysis<|message|>{REASONING}<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>",
        (("<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
          "<|constrain|>json<|message|>", f"{PARIS}<|call|>"),
         ("<|end|><|start|>assistant<|channel|>commentary to=functions.",
          f"get_time <|constrain|>json<|message|>{PARIS}<|call|>"))),
    "qwen3.5": Family(
        ("Qwen/Qwen3.5-4B", "Qwen/Qwen3.5-27B"), QWEN35, "<|im_start|>user",
        "<|im_start|>assistant\n", f"<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>",
        (("</think>\n\n<tool_call>\n<function=get_weather>\n",
          "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>"),
         ("</think>\n\n<tool_call>\n<function=",
          "get_time>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
          "<|im_end|>"))),
    # Nemotron 3 reads as Qwen3.5 but writes one newline after </think>, not two.
    "nemotron-3": Family(
        ("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
         "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-FP8"), NEMOTRON, "<|im_start|>user",
        "<|im_start|>assistant\n", f"<think>\n{REASONING}\n</think>\n{ANSWER}<|im_end|>",
        (("</think>\n<tool_call>\n<function=get_weather>\n",
          "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n<|im_end|>"),
         ("</think>\n<tool_call>\n<function=",
          "get_time>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
          "<|im_end|>"))),
    "qwen3": Family(
        ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-32B"), QWEN3, "<|im_start|>user",
        "<|im_start|>assistant\n", f"<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>",
        _hermes("</think>", "<|im_end|>")),
    "deepseek-r1": Family(
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"),
        R1_DISTILL, "<｜User｜>", "<｜Assistant｜>",
        f"<think>\n{REASONING}\n</think>\n\n{ANSWER}{DS_END}", _hermes("</think>", DS_END)),
    "deepseek-r1-0528": Family(
        ("deepseek-ai/DeepSeek-R1-0528-Qwen3-8B", "deepseek-ai/DeepSeek-R1-0528"), R1_DISTILL,
        "<｜User｜>", "<｜Assistant｜>", f"<think>\n{REASONING}\n</think>\n\n{ANSWER}{DS_END}",
        ((f"</think>\n\n{DS_CALL}function<｜tool▁sep｜>get_weather\n```json\n",
          f"{PARIS}\n```{DS_CALL_END}{DS_END}"),
         (f"</think>\n\n{DS_CALL}function<｜tool▁sep｜>",
          f"get_time\n```json\n{PARIS}\n```{DS_CALL_END}{DS_END}")),
        # llama.cpp's R1 distill template, standing in for R1-0528's, closes the reasoning
        # unless asked to think (R1-0528's family passes no switch: its own template has none)
        {"enable_thinking": True}),
    "deepseek-v3.1": Family(
        ("deepseek-ai/DeepSeek-V3.1", "deepseek-ai/DeepSeek-V3.1-Terminus"), DEEPSEEK_V31,
        "<｜User｜>", "<｜Assistant｜>", f"<think>{REASONING}</think>{ANSWER}{DS_END}",
        ((f"</think>{DS_CALL}get_weather<｜tool▁sep｜>", f"{PARIS}{DS_CALL_END}{DS_END}"),
         (f"</think>{DS_CALL}", f"get_time<｜tool▁sep｜>{PARIS}{DS_CALL_END}{DS_END}"))),
    "gemma-4": Family(
        ("google/gemma-4-E4B-it", "google/gemma-4-31B-it"), GEMMA_4, "<|turn>user",
        "<|turn>model\n", f"<|channel>thought\n{REASONING}<channel|>{ANSWER}<turn|>",
        (("<channel|><|tool_call>call:get_weather{",
          'city:<|"|>Paris<|"|>}<tool_call|><turn|>'),
         ("<channel|><|tool_call>call:", 'get_time{city:<|"|>Paris<|"|>}<tool_call|><turn|>'))),
    "granite": Family(
        ("ibm-granite/granite-3.3-2b-instruct", "ibm-granite/granite-3.3-8b-instruct"), GRANITE,
        "<|start_of_role|>user", "<|start_of_role|>assistant<|end_of_role|>",
        f"<think>{REASONING}</think><response>{ANSWER}</response><|end_of_text|>",
        (('</think><|tool_call|>[{"name": "get_weather", "arguments": ',
          f"{PARIS}}}]<|end_of_text|>"),
         ('</think><|tool_call|>[{"name": "',
          f'get_time", "arguments": {PARIS}}}]<|end_of_text|>'))),
    # Phi-4-reasoning's template renders no tools and no calls: its calls are read as the
    # Hermes blocks specthink's opener begins, as the R1 distills' are.
    "phi-4-reasoning": Family(
        ("microsoft/Phi-4-reasoning", "microsoft/Phi-4-reasoning-plus"), PHI4,
        "<|im_start|>user", "<|im_start|>assistant<|im_sep|>",
        f"<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>",
        _hermes("</think>", "<|im_end|>")),
    "mistral-reasoning": Family(
        ("mistralai/Ministral-3-8B-Reasoning-2512", "mistralai/Ministral-3-14B-Reasoning-2512"),
        MINISTRAL, "[INST]", "[/INST]", f"[THINK]{REASONING}[/THINK]{ANSWER}</s>",
        (("[/THINK][TOOL_CALLS]get_weather[ARGS]", f"{PARIS}</s>"),
         ("[/THINK][TOOL_CALLS]", f"get_time[ARGS]{PARIS}</s>"))),
}
"""Every built-in response template's family (Qwen3.5 stands for Qwen3-Coder, which shares its
format)."""


class AnswersInWords:
    """A family's model, greedy, that ignores the instruction to call a tool: it reasons and
    answers in words; a call someone else began in its own syntax it completes."""

    def __init__(self, family: Family) -> None:
        self.family = family

    def continuation(self, prompt: str) -> Continuation:
        family = self.family
        head = prompt.find(family.assistant, prompt.rfind(family.user))
        written = prompt[head + len(family.assistant):]
        for opener, rest in family.calls:
            # a call begun with ``opener``, continued from wherever it is (a handoff may
            # fall inside it)
            if (at := written.find(opener)) >= 0:
                call = written[:at + len(opener)] + rest
                return Continuation(call[len(written):] if call.startswith(written) else "")
        turn = family.turn
        return Continuation(turn[len(written):] if turn.startswith(written) else "")


def start(loopback_server: Callable[..., LoopbackServer], name: str,
          flavor: str = "vllm") -> ServerPair:
    family = FAMILIES[name]
    small, target = family.models
    options = {"flavor": flavor, "chat_template": family.template}
    return ServerPair(loopback_server(AnswersInWords(family), model_id=small, **options),
                      loopback_server(AnswersInWords(family), model_id=target, **options))


def thinker(pair: ServerPair, name: str, backend: str = "openai") -> SpeculativeThinker:
    small, target = FAMILIES[name].models
    return PairSettings(small_url=pair.small.url, target_url=pair.target.url, backend=backend,
                        small_model=small, target_model=target, small_template="server",
                        target_template="server",
                        template_kwargs=FAMILIES[name].template_kwargs).build()


def test_every_builtin_has_a_family_here() -> None:
    """If this fails, a built-in response template's required calls are tested nowhere, or
    one declares no call opener."""
    tested = {t.template for name in FAMILIES for m in FAMILIES[name].models
              if (t := family_of(m)) is not None}
    assert tested == set(template_names())
    assert all(builtin_template(t).call_opener is not None for t in template_names())


@pytest.mark.parametrize("choice", sorted(CHOICES))
@pytest.mark.parametrize("name", sorted(FAMILIES))
async def test_a_required_call_is_made_in_the_familys_syntax(
        loopback_server: Callable[..., LoopbackServer], name: str, choice: str) -> None:
    """If this fails, a pair of this family given ``tool_choice`` "required" or a named
    function answers in words (the engine did not write the family's call opener after the
    reasoning, or wrote it in another syntax), the call is not read back as exactly one call
    of that name, the reasoning is lost, or the splitter streaming the events disagrees."""
    tool_choice, called = CHOICES[choice]
    pair = start(loopback_server, name)
    engine = thinker(pair, name)
    splitter = OutputSplitter()
    deltas = []
    try:
        result = await engine.agenerate(QUESTION, tools=[WEATHER, TIME], tool_choice=tool_choice)
        async for event in engine.astream(QUESTION, tools=[WEATHER, TIME],
                                          tool_choice=tool_choice):
            deltas += splitter.feed(event)
            if isinstance(event, FinishEvent):
                assert event.result.text == result.text
        free = await engine.agenerate(QUESTION, tools=[WEATHER, TIME])
    finally:
        await engine.aclose()
    whole = split_result(result)
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [called]
    assert (whole.reasoning, whole.answer) == (REASONING, "")
    assert result.stats.total_takeovers >= 1
    final = splitter.finish()
    assert [(c.name, c.arguments) for c in final.tool_calls] == [called]
    assert "".join(d.text for d in [*deltas, *final.deltas] if d.kind == "reasoning") \
        == REASONING
    assert "".join(d.text for d in [*deltas, *final.deltas] if d.kind == "answer") == ""
    # Left to itself (tool_choice auto) the same pair answers in words.
    assert (split_result(free).answer, split_result(free).tool_calls) == (ANSWER, [])


@pytest.mark.parametrize(("name", "grammar"), [
    ("qwen3", {"type": "json", "value": WEATHER["function"]["parameters"]}),
    ("qwen3.5", None),
], ids=["hermes-json", "xml"])
async def test_a_servers_call_grammar_is_sent_only_for_hermes_json_calls(
        loopback_server: Callable[..., LoopbackServer], name: str,
        grammar: dict[str, Any] | None) -> None:
    """If this fails, TGI's JSON grammar for a named call's arguments is sent after an XML
    call's opener, where it forbids the ``<parameter=...>`` the model must write (and the
    closing tags), or it is no longer sent after a Hermes JSON opener, whose arguments it
    keeps what the tool's parameters allow."""
    pair = start(loopback_server, name, flavor="tgi")
    engine = thinker(pair, name, backend="tgi")
    try:
        result = await engine.agenerate(QUESTION, tools=[WEATHER, TIME], tool_choice=NAMED)
    finally:
        await engine.aclose()
    assert [(c.name, c.arguments) for c in split_result(result).tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    last = max([*pair.small.records, *pair.target.records], key=lambda r: r.started)
    assert last.parameters.get("grammar") == grammar


async def test_a_template_that_declares_no_opener_refuses_a_required_call(
        loopback_server: Callable[..., LoopbackServer], tmp_path: Path) -> None:
    """If this fails, a response template handed over without ``specthink.call_opener`` (here
    harmony's, in a model's own tokenizer_config.json: the engine cannot know how its calls
    begin) leaves a required call to the model's goodwill instead of refusing it before any
    generation request, naming ``tool_choice``; or a malformed opener is accepted."""
    pair = start(loopback_server, "gpt-oss")
    small, target = FAMILIES["gpt-oss"].models
    spec = json.loads(json.dumps(builtin_template("gpt-oss").spec))
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"response_template": spec}), encoding="utf-8")
    engine = PairSettings(small_url=pair.small.url, target_url=pair.target.url,
                          backend="openai", small_model=small, target_model=target,
                          small_template="server", target_template="server",
                          response_template=str(config)).build()
    try:
        with pytest.raises(ConfigError) as refused:
            await engine.agenerate(QUESTION, tools=[WEATHER], tool_choice="required")
        generations = [r for server in (pair.small, pair.target) for r in server.records]
        answered = await engine.agenerate(QUESTION, tools=[WEATHER])
    finally:
        await engine.aclose()
    assert refused.value.field == "tool_choice"
    assert "call_opener" in str(refused.value)
    assert split_result(answered).answer == ANSWER  # the format itself reads the model
    assert generations == []
    for bad in ({"named": "<call>", "any": "<"}, {"named": "{name}"},
                {"named": "{name}", "any": "<", "extra": 1}):
        with pytest.raises(ConfigError, match="call_opener"):
            load_template({**spec, "specthink": {"call_opener": bad}})
