"""A gpt-oss pair over vLLM-protocol loopback servers that render the REAL gpt-oss chat template
and detokenize as vLLM does: with the family's response template as the pair's output format,
the reasoning is exactly the reasoning, the answer exactly the answer, the target takes over
mid-reasoning, and every generation request keeps the special tokens (``skip_special_tokens:
false``); with the ``<think>`` default, the answer arrives as "analysis..." fused text, the
failure issue 21 reports."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from specthink import SpeculativeThinker
from specthink.backends import OpenAICompletionsBackend, TGIBackend
from specthink.errors import ConfigError
from specthink.formats import THINK_HERMES, OutputFormat
from specthink.formats.families import builtin_template
from specthink.output import OutputSplitter, split_result
from specthink.settings import PairSettings
from specthink.testing import Continuation, JinjaChatTemplate
from specthink.trace import FinishEvent, Result
from tests.support import ServerPair

GPT_OSS_TEMPLATE_FILE = str(Path(__file__).resolve().parents[2] / "data" / "chat_templates"
                            / "openai-gpt-oss-120b.jinja")
TEMPLATE = JinjaChatTemplate(
    "gpt-oss", Path(GPT_OSS_TEMPLATE_FILE).read_text(encoding="utf-8"),
    special_tokens=("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>",
                    "<|return|>", "<|call|>"),
    stop_tokens=("<|return|>", "<|call|>"))
REASONING = ("12 * 13 = 120 + 36.\n\nWait, let me check: 120 + 36 = 156.\n\n"
             "So the product is 156.")
ANSWER = "12 * 13 = 156."
TURN = (f"<|channel|>analysis<|message|>{REASONING}<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{ANSWER}<|return|>")
QUESTION = [{"role": "user", "content": "What is 12 * 13?"}]


class HarmonyModel:
    """gpt-oss, greedy: one harmony turn after the generation prompt, continued from whatever
    the prompt already holds of it (whoever wrote it); text the turn does not hold stops it."""

    def continuation(self, prompt: str) -> Continuation:
        user = prompt.rfind("<|start|>user")
        start = prompt.find("<|start|>assistant", user) + len("<|start|>assistant")
        written = prompt[start:]
        return Continuation(TURN[len(written):] if TURN.startswith(written) else "")


EARLIER_REASONING = "The user wants the weather in Paris; the tool knows it."
"""The reasoning of an earlier tool-calling turn, handed back in a tool loop."""
HARMONY_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


class HarmonyLoopModel:
    """gpt-oss in a tool loop, greedy: one harmony turn (``turn``, by default the answer)
    after the generation prompt (the ``<|start|>assistant`` after the last turn of someone
    else: a user, or a tool's result), continued from whatever the prompt holds of it."""

    def __init__(self, turn: str = TURN) -> None:
        self.turn = turn

    def continuation(self, prompt: str) -> Continuation:
        last = max(prompt.rfind("<|start|>user"), prompt.rfind("<|start|>functions."))
        head = prompt.find("<|start|>assistant", last)
        while head != -1:
            written = prompt[head + len("<|start|>assistant"):]
            if self.turn.startswith(written):
                return Continuation(self.turn[len(written):])
            head = prompt.find("<|start|>assistant", head + 1)
        return Continuation("")


def start_tool_loop(loopback_server: Callable[..., object], turn: str = TURN) -> ServerPair:
    """A gpt-oss pair whose models write ``turn``, after a tool's result too."""
    options = {"flavor": "vllm", "chat_template": TEMPLATE}
    return ServerPair(loopback_server(HarmonyLoopModel(turn), model_id="openai/gpt-oss-20b",
                                      **options),  # type: ignore[arg-type]
                      loopback_server(HarmonyLoopModel(turn), model_id="openai/gpt-oss-120b",
                                      **options))  # type: ignore[arg-type]


HARMONY_DECOY = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
CALL_REASONING = (f"The user wants the weather. Maybe {HARMONY_DECOY} first?\n\n"
                  "Wait, no: the question is about Paris.")
CALL_TURN = (f"<|channel|>analysis<|message|>{CALL_REASONING}<|end|><|start|>assistant"
             '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
             '{"city": "Paris"}<|call|>')
"""gpt-oss calling a tool, a call of another format drafted in its reasoning (a decoy)."""


def thinker(pair: ServerPair, output_format: OutputFormat) -> SpeculativeThinker:
    return SpeculativeThinker(
        small=OpenAICompletionsBackend(pair.small.url, model="openai/gpt-oss-20b"),
        target=OpenAICompletionsBackend(pair.target.url, model="openai/gpt-oss-120b"),
        small_template="server", target_template="server", output_format=output_format)


def start(loopback_server: Callable[..., object], flavor: str = "vllm") -> ServerPair:
    options = {"flavor": flavor, "chat_template": TEMPLATE}
    return ServerPair(loopback_server(HarmonyModel(), model_id="openai/gpt-oss-20b",
                                      **options),  # type: ignore[arg-type]
                      loopback_server(HarmonyModel(), model_id="openai/gpt-oss-120b",
                                      **options))  # type: ignore[arg-type]


async def split_exactly(engine: SpeculativeThinker) -> Result:
    """The engine's answer to QUESTION, checked: exactly REASONING and ANSWER, no call, after a
    takeover (whatever the family's markers)."""
    try:
        result = await engine.agenerate(QUESTION)
    finally:
        await engine.aclose()
    whole = split_result(result)
    assert (whole.reasoning, whole.answer, whole.tool_calls) == (REASONING, ANSWER, [])
    assert result.stats.total_takeovers >= 1
    return result


async def streamed_split(engine: SpeculativeThinker) -> tuple[str, str, int]:
    """The engine's streamed answer to QUESTION through an :class:`OutputSplitter`:
    ``(reasoning, answer, takeovers)``, the deltas joined, after checking they join to what the
    splitter's final result holds."""
    splitter = OutputSplitter()
    deltas = []
    takeovers = 0
    try:
        async for event in engine.astream(QUESTION):
            deltas += splitter.feed(event)
            if isinstance(event, FinishEvent):
                takeovers = event.result.stats.total_takeovers
    finally:
        await engine.aclose()
    final = splitter.finish()
    deltas += final.deltas
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    answer = "".join(d.text for d in deltas if d.kind == "answer")
    assert (final.reasoning, final.answer) == (reasoning, answer)
    return reasoning, answer, takeovers


async def test_gpt_oss_pair_over_tgi_keeps_harmonys_special_tokens(
        loopback_server: Callable[..., object]) -> None:
    """If this fails, a gpt-oss pair behind TGI loses harmony's markers: TGI streams every
    token's text with ``special: true`` on the special ones (text_generation_server's
    ``decode_token`` decodes with ``skip_special_tokens=False``), and a backend that drops
    those texts fuses the analysis channel into the answer, as vLLM does without
    ``skip_special_tokens: false``. The stop token's text stays out (it ends the stream)."""
    pair = start(loopback_server, "tgi")
    result = await split_exactly(SpeculativeThinker(
        small=TGIBackend(pair.small.url), target=TGIBackend(pair.target.url),
        small_template="server", target_template="server",
        output_format=OutputFormat.from_template(builtin_template("gpt-oss"), "gpt-oss")))
    assert "<|return|>" not in result.text and "<|channel|>" in result.text


async def test_gpt_oss_pair_over_llama_cpp_splits_as_over_vllm(
        loopback_server: Callable[..., object]) -> None:
    """If this fails, a gpt-oss pair behind llama.cpp's servers loses harmony's markers, or
    splits otherwise than behind vLLM: llama.cpp writes a special token's text only when the
    request names it in ``preserved_tokens`` (``<|end|>`` is not one of the four gpt-oss
    tokens it always renders), so without them the analysis channel runs into the answer; a
    named stop token's text arrives too, and must stay out as it does behind vLLM."""
    harmony = OutputFormat.from_template(builtin_template("gpt-oss"), "gpt-oss")
    over_vllm = split_result(await split_exactly(thinker(start(loopback_server), harmony)))
    pair = start(loopback_server, "llamacpp")
    result = await split_exactly(thinker(pair, harmony))
    assert split_result(result) == over_vllm
    assert "<|end|>" in result.text and "<|return|>" not in result.text
    generations = [r for s in (pair.small, pair.target) for r in s.records
                   if r.path == "/v1/completions"]
    assert generations and all(
        {"<|end|>", "<|channel|>", "<|message|>"} <= set(r.parameters["preserved_tokens"])
        for r in generations)


async def test_a_llama_cpp_python_target_is_refused_before_any_generation(
        loopback_server: Callable[..., object]) -> None:
    """If this fails, a gpt-oss pair whose target is served by llama-cpp-python (whose
    /v1/completions never writes special tokens' text) starts generating anyway: the small
    model's request goes out and the target's turns would arrive fused. The engine asks each
    backend (``check_keeps``) while preparing, before any generation request."""
    small = loopback_server(HarmonyModel(), model_id="openai/gpt-oss-20b", flavor="vllm",
                            chat_template=TEMPLATE)
    target = loopback_server(HarmonyModel(), model_id="openai/gpt-oss-120b",
                             flavor="llama-cpp-python", chat_template=TEMPLATE)
    engine = SpeculativeThinker(
        small=OpenAICompletionsBackend(small.url, model="openai/gpt-oss-20b"),  # type: ignore[attr-defined]
        target=OpenAICompletionsBackend(target.url, model="openai/gpt-oss-120b"),  # type: ignore[attr-defined]
        small_template="server", target_template=GPT_OSS_TEMPLATE_FILE,
        output_format=OutputFormat.from_template(builtin_template("gpt-oss"), "gpt-oss"))
    try:
        with pytest.raises(ConfigError, match=r"llama-cpp-python.*<\|end\|>") as refused:
            await engine.agenerate(QUESTION)
    finally:
        await engine.aclose()
    assert not [r for s in (small, target) for r in s.records  # type: ignore[attr-defined]
                if r.path == "/v1/completions"]
    # <|channel|> and <|message|> stay (libllama renders them for gpt-oss); <|call|> and
    # <|return|> may be the stop token, never written anyway: neither is named.
    assert not {"<|channel|>", "<|return|>"} & set(re.findall(r"<\|\w+\|>", str(refused.value)))


async def test_gpt_oss_pair_split_by_its_response_template(
        loopback_server: Callable[..., object]) -> None:
    """If this fails, a gpt-oss pair's reasoning and answer are not split by harmony's
    channels, no takeover happens in its reasoning, or the servers drop the markers."""
    pair = start(loopback_server)
    harmony = OutputFormat.from_template(builtin_template("gpt-oss"), "gpt-oss")
    await split_exactly(thinker(pair, harmony))
    generations = [r for s in (pair.small, pair.target) for r in s.records
                   if r.path == "/v1/completions"]
    assert generations and all(r.parameters.get("skip_special_tokens") is False
                               for r in generations)

    reasoning, answer, takeovers = await streamed_split(thinker(pair, harmony))
    assert (reasoning, answer) == (REASONING, ANSWER) and takeovers >= 1


async def test_without_the_template_harmony_is_fused_text(
        loopback_server: Callable[..., object]) -> None:
    """If this fails, the contrast the issue reports is gone: under the ``<think>`` default
    vLLM drops harmony's special tokens and the reasoning arrives as "analysis..." content."""
    pair = start(loopback_server)
    engine = thinker(pair, THINK_HERMES)
    try:
        result = await engine.agenerate(QUESTION)
    finally:
        await engine.aclose()
    whole = split_result(result)
    # The markers are gone, so the reasoning is content; and a continuation sent back without
    # them is not the model's own text, so it breaks off after the first handoff.
    assert whole.reasoning == ""
    assert whole.answer.startswith("analysis12 * 13 = 120 + 36.")



QWEN35 = JinjaChatTemplate(
    "qwen3.5", (Path(__file__).resolve().parents[2] / "data" / "chat_templates"
                / "Qwen3.5-4B.jinja").read_text(encoding="utf-8"),
    special_tokens=("<|im_end|>",), stop_tokens=("<|im_end|>",))
DECOY = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n" \
        "</function>\n</tool_call>"
XML_REASONING = ("The user wants the weather.\n\nWait, maybe Oslo first:\n" + DECOY
                 + "\n\nNo, the question is about Paris.")
XML_TURN = (f"<think>\n{XML_REASONING}\n</think>\n\nLet me check.\n\n<tool_call>\n"
            "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n"
            "</parameter>\n</function>\n</tool_call><|im_end|>")
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}]


class Qwen35Model:
    """Qwen3.5, greedy: one thinking turn with an XML call after the generation prompt (which
    opens ``<think>``), continued from whatever the prompt holds of it."""

    def continuation(self, prompt: str) -> Continuation:
        written = prompt[prompt.rfind("<|im_start|>assistant\n") + len(
            "<|im_start|>assistant\n"):]
        return Continuation(XML_TURN[len(written):] if XML_TURN.startswith(written) else "")


def start_qwen35(loopback_server: Callable[..., object]) -> ServerPair:
    """A Qwen3.5 pair whose models think, drafting a decoy call, then call in XML."""
    options = {"flavor": "vllm", "chat_template": QWEN35}
    return ServerPair(loopback_server(Qwen35Model(), model_id="Qwen/Qwen3.5-4B",
                                      **options),  # type: ignore[arg-type]
                      loopback_server(Qwen35Model(), model_id="Qwen/Qwen3.5-27B",
                                      **options))  # type: ignore[arg-type]


async def test_qwen35_pair_calls_in_xml(loopback_server: Callable[..., object]) -> None:
    """If this fails, a Qwen3.5 / Nemotron 3 pair leaves its XML call as text in the answer
    (issue 21), executes the call it only drafted while thinking, starts outside the reasoning
    its prompt opened, or passes an integer argument as a string."""
    options = {"flavor": "vllm", "chat_template": QWEN35}
    pair = ServerPair(loopback_server(Qwen35Model(), model_id="Qwen/Qwen3.5-4B", **options),
                      loopback_server(Qwen35Model(), model_id="Qwen/Qwen3.5-27B", **options))
    engine = SpeculativeThinker(
        small=OpenAICompletionsBackend(pair.small.url, model="Qwen/Qwen3.5-4B"),
        target=OpenAICompletionsBackend(pair.target.url, model="Qwen/Qwen3.5-27B"),
        small_template="server", target_template="server",
        output_format=OutputFormat.from_template(builtin_template("qwen3-xml")))
    try:
        result = await engine.agenerate(
            [{"role": "user", "content": "Weather in Paris?"}], tools=WEATHER)
    finally:
        await engine.aclose()
    assert result.starts_in_reasoning
    assert result.stats.total_takeovers >= 1
    whole = split_result(result)
    assert whole.reasoning == XML_REASONING
    assert whole.answer == "Let me check."
    # The XML call's "2" is cast by the offered schema, as transformers and vLLM cast it.
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2})]


GEMMA_4 = JinjaChatTemplate(
    "gemma-4", (Path(__file__).resolve().parents[2] / "data" / "chat_templates"
                / "google-gemma-4-31B-it.jinja").read_text(encoding="utf-8"),
    bos_token="<bos>",
    special_tokens=("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>",
                    "<|tool_call>", "<tool_call|>", '<|"|>'),
    stop_tokens=("<turn|>",))
GEMMA_THOUGHT = f"<|channel>thought\n{REASONING}<channel|>{ANSWER}<turn|>"
GEMMA_NO_THOUGHT = f"<|channel>thought\n<channel|>{ANSWER}<turn|>"


class Gemma4Model:
    """Gemma 4, greedy: it reasons in a thought channel when its system turn holds the
    ``<|think|>`` switch, else answers after the empty thought its generation prompt holds;
    continued from whatever the prompt holds of its turn."""

    def continuation(self, prompt: str) -> Continuation:
        head = prompt.rfind("<|turn>model\n")
        written = prompt[head + len("<|turn>model\n"):]
        turn = GEMMA_THOUGHT if "<|think|>" in prompt[:head] else GEMMA_NO_THOUGHT
        return Continuation(turn[len(written):] if turn.startswith(written) else "")


def start_gemma(loopback_server: Callable[..., object]) -> ServerPair:
    options = {"flavor": "vllm", "chat_template": GEMMA_4}
    small, target = FAMILY_PAIRS["gemma-4"]
    return ServerPair(loopback_server(Gemma4Model(), model_id=small,
                                      **options),  # type: ignore[arg-type]
                      loopback_server(Gemma4Model(), model_id=target,
                                      **options))  # type: ignore[arg-type]


GEMMA_TEMPLATE_FILE = str(Path(__file__).resolve().parents[2] / "data" / "chat_templates"
                          / "google-gemma-4-31B-it.jinja")


@pytest.mark.parametrize("template", ["server", "auto", GEMMA_TEMPLATE_FILE],
                         ids=["server-rendered", "auto", "client-side"])
async def test_gemma4_thinks_by_default(loopback_server: Callable[..., object],
                                        template: str) -> None:
    """If this fails, a Gemma 4 pair (whose template switches thinking off unless
    ``enable_thinking`` is passed) has no reasoning and so no takeover at all, the failure
    issue 21 reports; or ``template_kwargs`` cannot switch it off again. Rendered by the
    server (vLLM's ``/tokenize`` with ``chat_template_kwargs``; ``auto`` too, whose built-ins
    learnt without the kwargs must not stand in for it) and client-side alike."""
    pair = start_gemma(loopback_server)
    urls = {"small_url": pair.small.url, "target_url": pair.target.url, "backend": "openai",
            "small_model": "google/gemma-4-E4B-it", "target_model": "google/gemma-4-31B-it",
            "small_template": template, "target_template": template,
            "response_template": "auto"}
    engine = PairSettings(**urls).build()
    try:
        result = await engine.agenerate(QUESTION)
    finally:
        await engine.aclose()
    whole = split_result(result)
    assert (whole.reasoning, whole.answer) == (REASONING, ANSWER)
    assert result.stats.total_takeovers >= 1

    engine = PairSettings(**urls, template_kwargs={"enable_thinking": False}).build()
    try:
        result = await engine.agenerate(QUESTION)
    finally:
        await engine.aclose()
    whole = split_result(result)
    assert (whole.reasoning, whole.answer) == ("", ANSWER)
    assert result.stats.total_takeovers == 0


MINISTRAL = JinjaChatTemplate(
    "mistral-reasoning", (Path(__file__).resolve().parents[2] / "data" / "chat_templates"
                          / "mistralai-Ministral-3-14B-Reasoning-2512.jinja").read_text(
                              encoding="utf-8"),
    bos_token="<s>", eos_token="</s>",
    special_tokens=("<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]", "[TOOL_RESULTS]",
                    "[/TOOL_RESULTS]"),
    stop_tokens=("</s>",))
MISTRAL_TURN = f"[THINK]{REASONING}[/THINK]{ANSWER}</s>"


class MinistralModel:
    """Ministral 3 Reasoning, greedy: ``[THINK]`` reasoning then the answer after the last
    ``[/INST]``, continued from whatever the prompt holds of it."""

    def continuation(self, prompt: str) -> Continuation:
        written = prompt[prompt.rfind("[/INST]") + len("[/INST]"):]
        return Continuation(MISTRAL_TURN[len(written):] if MISTRAL_TURN.startswith(written)
                            else "")


FAMILY_PAIRS: dict[str, tuple[str, str]] = {
    "gemma-4": ("google/gemma-4-E4B-it", "google/gemma-4-31B-it"),
    "mistral-reasoning": ("mistralai/Ministral-3-8B-Reasoning-2512",
                          "mistralai/Ministral-3-14B-Reasoning-2512"),
}
"""The small and target model ids of the families :func:`start_family` serves."""


def start_family(loopback_server: Callable[..., object], family: str) -> ServerPair:
    """A pair of ``family`` (Gemma 4 or Ministral 3 Reasoning) rendering its real template,
    whose models reason then answer (Gemma 4 only when its thinking switch is on)."""
    if family == "gemma-4":
        return start_gemma(loopback_server)
    small, target = FAMILY_PAIRS[family]
    options = {"flavor": "vllm", "chat_template": MINISTRAL}
    return ServerPair(loopback_server(MinistralModel(), model_id=small,
                                      **options),  # type: ignore[arg-type]
                      loopback_server(MinistralModel(), model_id=target,
                                      **options))  # type: ignore[arg-type]


DEEPSEEK_V31 = JinjaChatTemplate(
    "deepseek-v3.1", (Path(__file__).resolve().parents[2] / "data" / "chat_templates"
                      / "deepseek-ai-DeepSeek-V3.1.jinja").read_text(encoding="utf-8"),
    bos_token="<｜begin▁of▁sentence｜>", special_tokens=("<｜end▁of▁sentence｜>",),
    stop_tokens=("<｜end▁of▁sentence｜>",))


class DeepSeekV31Model:
    """DeepSeek-V3.1, greedy: reasons after the prompt's ``<think>`` (its ``thinking``
    switch on), else answers after the closed ``<think></think>``."""

    def continuation(self, prompt: str) -> Continuation:
        head = prompt.rfind("<｜Assistant｜>") + len("<｜Assistant｜>")
        turn = f"<think>{REASONING}</think>{ANSWER}<｜end▁of▁sentence｜>"
        if prompt[head:].startswith("<think></think>"):
            turn = f"<think></think>{ANSWER}<｜end▁of▁sentence｜>"
        written = prompt[head:]
        return Continuation(turn[len(written):] if turn.startswith(written) else "")


async def test_deepseek_v31_thinks_by_default(loopback_server: Callable[..., object]) -> None:
    """If this fails, a DeepSeek-V3.1 pair (whose template answers without thinking unless
    ``thinking`` is passed) has no reasoning and no takeover, or ``template_kwargs`` cannot
    switch it off."""
    options = {"flavor": "vllm", "chat_template": DEEPSEEK_V31}
    small = loopback_server(DeepSeekV31Model(), model_id="deepseek-ai/DeepSeek-V3.1",
                            **options)  # type: ignore[arg-type]
    target = loopback_server(DeepSeekV31Model(), model_id="deepseek-ai/DeepSeek-V3.1-Terminus",
                             **options)  # type: ignore[arg-type]
    urls = {"small_url": small.url, "target_url": target.url,  # type: ignore[attr-defined]
            "backend": "openai", "small_model": "deepseek-ai/DeepSeek-V3.1",
            "target_model": "deepseek-ai/DeepSeek-V3.1-Terminus", "small_template": "server",
            "target_template": "server", "response_template": "auto"}
    for kwargs, expected, takeovers in (
            (None, (REASONING, ANSWER), True),
            ({"thinking": False}, ("", ANSWER), False)):
        engine = PairSettings(**urls, template_kwargs=kwargs).build()
        try:
            result = await engine.agenerate(QUESTION)
        finally:
            await engine.aclose()
        whole = split_result(result)
        assert (whole.reasoning, whole.answer) == expected
        assert (result.stats.total_takeovers >= 1) is takeovers


GRANITE_TEMPLATE_FILE = str(Path(__file__).resolve().parents[2] / "data" / "chat_templates"
                            / "ibm-granite-granite-3.3-2B-Instruct.jinja")
GRANITE = JinjaChatTemplate(
    "granite", Path(GRANITE_TEMPLATE_FILE).read_text(encoding="utf-8"),
    # Granite 3.x's added special tokens; its <think> / <response> tags are written as text here.
    special_tokens=("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"),
    stop_tokens=("<|end_of_text|>",))
GRANITE_HEAD = "<|start_of_role|>assistant<|end_of_role|>"
GRANITE_THINKING = ("Write your thoughts between <think></think> and write your response "
                    "between <response></response> for each user query.")
"""The end of the system text Granite 3.3's template writes when ``thinking`` is on."""
GRANITE_THOUGHT = f"<think>{REASONING}</think><response>{ANSWER}</response><|end_of_text|>"
GRANITE_PLAIN = f"{ANSWER}<|end_of_text|>"
GRANITE_DECOY = '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
GRANITE_CALL_REASONING = ("The user wants the weather.\n\nWait, maybe Oslo first:\n"
                          + GRANITE_DECOY + "\n\nNo, the question is about Paris.")
GRANITE_CALL_TURN = (f"<think>{GRANITE_CALL_REASONING}</think><response>Let me check."
                     '</response><|tool_call|>[{"name": "get_weather", "arguments": '
                     '{"city": "Paris", "days": 2}}]<|end_of_text|>')
"""A Granite call turn in llama.cpp's Granite layout (``</think>``, the answer in
``<response>``, then ``<|tool_call|>`` and a JSON list), a call drafted in the reasoning."""


class GraniteModel:
    """Granite 3.3, greedy: with tools offered, the call turn; else it reasons in ``<think>``
    and answers in ``<response>`` when its system text asks it to (the template's ``thinking``
    switch), else answers plainly; continued from whatever the prompt holds of its turn.
    (Granite's template asks for thinking only without tools: the call turn stands for a
    Granite that reasons before calling, so that the call is read after a takeover.)"""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def continuation(self, prompt: str) -> Continuation:
        self.prompts.append(prompt)
        head = prompt.rfind(GRANITE_HEAD)
        before, written = prompt[:head], prompt[head + len(GRANITE_HEAD):]
        turn = (GRANITE_CALL_TURN if "<|start_of_role|>available_tools" in before
                else GRANITE_THOUGHT if GRANITE_THINKING in before else GRANITE_PLAIN)
        return Continuation(turn[len(written):] if turn.startswith(written) else "")


def start_granite(loopback_server: Callable[..., object]
                  ) -> tuple[ServerPair, GraniteModel, dict[str, str]]:
    """A Granite 3.3 pair rendering its real template, its small model, and the
    :class:`PairSettings` fields that name it."""
    options = {"flavor": "vllm", "chat_template": GRANITE}
    small = GraniteModel()
    pair = ServerPair(loopback_server(small, model_id="ibm-granite/granite-3.3-2b-instruct",
                                      **options),  # type: ignore[arg-type]
                      loopback_server(GraniteModel(),
                                      model_id="ibm-granite/granite-3.3-8b-instruct",
                                      **options))  # type: ignore[arg-type]
    fields = {
        "small_url": pair.small.url, "target_url": pair.target.url, "backend": "openai",
        "small_model": "ibm-granite/granite-3.3-2b-instruct",
        "target_model": "ibm-granite/granite-3.3-8b-instruct"}
    return pair, small, fields


@pytest.mark.parametrize("template", ["server", "auto", GRANITE_TEMPLATE_FILE],
                         ids=["server-rendered", "auto", "client-side"])
async def test_granite_thinks_by_default(loopback_server: Callable[..., object],
                                         template: str) -> None:
    """If this fails, a Granite 3.3 pair (whose template asks for ``<think>`` / ``<response>``
    only when ``thinking`` is passed) has no reasoning and no takeover, its answer keeps the
    ``<response>`` tags, or ``template_kwargs`` cannot switch thinking off. Rendered by the
    server (vLLM's ``/tokenize`` with ``chat_template_kwargs``) and client-side alike, the
    family found from the model ids."""
    _, small, fields = start_granite(loopback_server)
    settings = {**fields, "small_template": template, "target_template": template}
    engine = PairSettings(**settings).build()
    try:
        result = await engine.agenerate(QUESTION)
    finally:
        await engine.aclose()
    assert GRANITE_THINKING in small.prompts[0]
    whole = split_result(result)
    assert (whole.reasoning, whole.answer) == (REASONING, ANSWER)
    assert result.stats.total_takeovers >= 1

    assert (await streamed_split(PairSettings(**settings).build()))[:2] == (REASONING, ANSWER)

    small.prompts.clear()
    engine = PairSettings(**settings, template_kwargs={"thinking": False}).build()
    try:
        result = await engine.agenerate(QUESTION)
    finally:
        await engine.aclose()
    assert GRANITE_THINKING not in small.prompts[0]
    whole = split_result(result)
    assert (whole.reasoning, whole.answer) == ("", ANSWER)
    assert result.stats.total_takeovers == 0


async def test_granite_pair_calls_after_a_takeover(
        loopback_server: Callable[..., object]) -> None:
    """If this fails, a Granite 3.3 pair leaves its ``<|tool_call|>`` JSON list as text,
    executes the call it only drafted while reasoning, keeps the ``<response>`` tags in the
    answer, or reads the call only without a takeover."""
    _, _, fields = start_granite(loopback_server)
    engine = PairSettings(**fields, small_template="server", target_template="server").build()
    try:
        result = await engine.agenerate(QUESTION, tools=WEATHER)
    finally:
        await engine.aclose()
    assert result.stats.total_takeovers >= 1
    whole = split_result(result)
    assert whole.reasoning == GRANITE_CALL_REASONING
    assert whole.answer == "Let me check."
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2})]


PHI4_TEMPLATE_FILE = str(Path(__file__).resolve().parents[2] / "data" / "chat_templates"
                         / "microsoft-Phi-4-reasoning.jinja")
PHI4 = JinjaChatTemplate(
    "phi-4-reasoning", Path(PHI4_TEMPLATE_FILE).read_text(encoding="utf-8"),
    # Phi-4's ChatML tokens, and <think> / </think> held as special too: whether its tokenizer
    # flags them or not, the engine asks for special tokens' text, so the stricter case is here.
    special_tokens=("<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>", "<think>",
                    "</think>"),
    stop_tokens=("<|im_end|>",))
PHI4_HEAD = "<|im_start|>assistant<|im_sep|>"
PHI4_TURN = f"<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>"


class Phi4ReasoningModel:
    """Phi-4-reasoning, greedy: after its generation prompt (which does not open ``<think>``;
    the system text its template always writes asks for ``<think> {Thought section} </think>
    {Solution section}``), it reasons in ``<think>`` and answers; continued from whatever the
    prompt holds of its turn."""

    def continuation(self, prompt: str) -> Continuation:
        written = prompt[prompt.rfind(PHI4_HEAD) + len(PHI4_HEAD):]
        return Continuation(PHI4_TURN[len(written):] if PHI4_TURN.startswith(written) else "")


@pytest.mark.parametrize("template", ["server", PHI4_TEMPLATE_FILE],
                         ids=["server-rendered", "client-side"])
async def test_phi4_reasoning_pair_split_after_a_takeover(
        loopback_server: Callable[..., object], template: str) -> None:
    """If this fails, a Phi-4-reasoning pair named by its model ids is not read with its
    family's template (refused as an unknown family, or read as thinking already closed by the
    ``<think> ... </think>`` its system text writes), its reasoning or answer come out wrong,
    or no takeover happens at its "Wait"."""
    options = {"flavor": "vllm", "chat_template": PHI4}
    small = loopback_server(Phi4ReasoningModel(), model_id="microsoft/Phi-4-reasoning",
                            **options)  # type: ignore[arg-type]
    target = loopback_server(Phi4ReasoningModel(), model_id="microsoft/Phi-4-reasoning-plus",
                             **options)  # type: ignore[arg-type]
    settings = {"small_url": small.url, "target_url": target.url,  # type: ignore[attr-defined]
                "backend": "openai", "small_model": "microsoft/Phi-4-reasoning",
                "target_model": "microsoft/Phi-4-reasoning-plus",
                "small_template": template, "target_template": template}
    engine = PairSettings(**settings).build()
    assert engine.output_format.name == "phi-4-reasoning"
    await split_exactly(engine)

    assert (await streamed_split(PairSettings(**settings).build()))[:2] == (REASONING, ANSWER)
