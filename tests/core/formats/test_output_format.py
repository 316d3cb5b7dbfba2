"""An OutputFormat built from a response template: its spans for the policy and the engine's
hold-back, the prompt's tail for where the output starts, and the special tokens the OpenAI
backend asks the server to keep."""

from __future__ import annotations

from specthink.backends import SamplingParams
from specthink.backends.openai import completion_body
from specthink.formats import THINK_HERMES, OutputFormat, Span
from specthink.formats.families import builtin_template


def test_spans_come_from_the_template() -> None:
    """If this fails, the policy's scope="thinking" and the engine's hold-back watch `</think>`
    on a family that closes its reasoning otherwise."""
    harmony = OutputFormat.from_template(builtin_template("gpt-oss"))
    assert harmony.reasoning == Span("<|channel|>analysis<|message|>", "<|end|>")
    assert OutputFormat.from_template(builtin_template("mistral-reasoning")).reasoning == \
        Span("[THINK]", "[/THINK]")
    assert harmony.template is builtin_template("gpt-oss")
    assert THINK_HERMES.template is None


def test_the_prompt_tail_decides_where_the_output_starts() -> None:
    """If this fails, a prompt whose template opened and closed the reasoning (thinking off)
    is taken to start inside it, as a bare endswith("<think>") cannot tell."""
    xml = OutputFormat.from_template(builtin_template("qwen3-xml"))
    assert xml.opened_by("<|im_start|>assistant\n<think>\n")
    assert not xml.opened_by("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_family_format_says_its_model_opens_the_reasoning_unless_the_prompt_closed_it(
        ) -> None:
    """If this fails, serve's start-up hint (``--rules paper_instruct``) fires for harmony,
    Mistral and Gemma 4 pairs, whose models write their reasoning's opener after a prompt that
    opens none, or stays silent where the template switched thinking off (closed the reasoning
    in the prompt); the default format, meant for any model, claims to know either way."""
    harmony = OutputFormat.from_template(builtin_template("gpt-oss"))
    assert harmony.model_opens_reasoning("<|start|>user<|message|>Hi<|end|><|start|>assistant")
    gemma = OutputFormat.from_template(builtin_template("gemma-4"))
    assert gemma.model_opens_reasoning("<|turn>user\nHi<turn|>\n<|turn>model\n")
    assert not gemma.model_opens_reasoning(
        "<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    mistral = OutputFormat.from_template(builtin_template("mistral-reasoning"))
    assert mistral.model_opens_reasoning("[INST]Hi[/INST]")
    qwen3 = OutputFormat.from_template(builtin_template("qwen3"))
    assert qwen3.model_opens_reasoning("<|im_start|>assistant\n")
    assert not qwen3.model_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not THINK_HERMES.model_opens_reasoning("<|im_start|>assistant\n")


def test_the_completion_body_keeps_special_tokens_when_asked() -> None:
    """If this fails, vLLM/SGLang drop a format's special-token markers from the text (harmony's
    channels vanish and reasoning fuses with the answer)."""
    keep = completion_body("p", model="m", max_new_tokens=4,
                           sampling=SamplingParams(keep_special_tokens=True))
    assert keep["skip_special_tokens"] is False
    plain = completion_body("p", model="m", max_new_tokens=4, sampling=SamplingParams())
    assert "skip_special_tokens" not in plain


def test_the_pair_settings_choose_the_format() -> None:
    """If this fails, a user cannot say (by name, or by the small model's family) how the
    models mark their output, or an unknown family is found out only mid-request."""
    import pytest

    from specthink.errors import ConfigError
    from specthink.settings import PairSettings

    urls = {"small_url": "http://127.0.0.1:9", "target_url": "http://127.0.0.1:9"}
    assert PairSettings(**urls).pair_output_format() is THINK_HERMES
    named = PairSettings(**urls, response_template="gpt-oss").build()
    assert named.output_format.template is builtin_template("gpt-oss")
    auto = PairSettings(**urls, response_template="auto", small_model="google/gemma-4-31B-it")
    assert auto.pair_output_format().template is builtin_template("gemma-4")
    with pytest.raises(ConfigError, match="response_template="):
        PairSettings(**urls, response_template="auto", small_model="acme/reasoner-7b")
