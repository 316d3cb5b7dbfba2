"""The response template of a role: the user's (a dict, a name, a tokenizer_config.json whose
response_template applies), else the model family's built-in, else a ConfigError saying what to
pass."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from specthink.errors import ConfigError
from specthink.formats.families import (
    builtin_template,
    family_of,
    response_template_for,
    template_names,
)
from specthink.formats.response_template import parse_response
from specthink.settings import PairSettings

OWN = {"start_anchor": "<|assistant|>", "fields": {
    "reasoning_content": {"open": "<reason>", "close": "</reason>"},
    "content": {"close": "<|end|>"}}}
"""A response template of a model specthink knows nothing of."""


def test_a_known_family_gets_its_builtin() -> None:
    """If this fails, a known model id does not bring its family's response template."""
    assert response_template_for("openai/gpt-oss-20b") is builtin_template("gpt-oss")
    assert response_template_for("Qwen/Qwen3-Coder-30B-A3B-Instruct") \
        is builtin_template("qwen3-xml")


def test_an_unknown_model_is_a_config_error_naming_what_to_pass() -> None:
    """If this fails, an unknown model either gets a guessed format (its reasoning taken for
    the answer) or an error that does not say how to hand over a template."""
    with pytest.raises(ConfigError) as caught:
        response_template_for("acme/reasoner-7b", role="target")
    message = str(caught.value)
    assert "'acme/reasoner-7b'" in message and "target" in message
    assert "response_template=" in message and "tokenizer_config.json" in message
    for name in template_names():
        assert name in message


def test_a_given_template_wins_over_the_family() -> None:
    """If this fails, a user's response template is ignored for a model whose id names a
    family."""
    template = response_template_for("Qwen/Qwen3-0.6B", OWN)
    assert parse_response("<reason>hm</reason>ok<|end|>", template, prefix="") == {
        "reasoning_content": "hm", "content": "ok"}


def test_a_tokenizer_config_brings_its_response_template(tmp_path: Path) -> None:
    """If this fails, the unknown-id case cannot be served from the checkpoint's own
    tokenizer_config.json, as a dict or as its path."""
    config = {"chat_template": "{{ messages }}", "response_template": OWN}
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    for given in (config, path, str(path)):
        template = response_template_for("acme/reasoner-7b", given)
        assert dict(template.spec) == OWN


def test_a_tokenizer_config_without_one_falls_back_to_the_family(tmp_path: Path) -> None:
    """If this fails, a chat-template-only tokenizer_config.json breaks a known family, or
    hides that an unknown one has no response template."""
    config = {"chat_template": "{{ messages }}"}
    assert response_template_for("google/gemma-4-31B-it", config) \
        is builtin_template("gemma-4")
    with pytest.raises(ConfigError, match="no response template"):
        response_template_for("acme/reasoner-7b", config)


def test_names_and_bad_files() -> None:
    """If this fails, a built-in or family name is not accepted, or a bad name or unreadable
    file passes silently."""
    assert response_template_for(None, "nemotron-3") is builtin_template("nemotron-3")
    assert response_template_for(None, "Gemma-4") is builtin_template("gemma-4")
    with pytest.raises(ConfigError, match="unknown response template 'bogus'"):
        response_template_for(None, "bogus")
    with pytest.raises(ConfigError, match="cannot read"):
        response_template_for(None, "/nonexistent/tokenizer_config.json")
    with pytest.raises(ConfigError, match="not an object"):
        response_template_for(None, {"response_template": "x"})


def test_thinking_switches_of_the_families() -> None:
    """If this fails, a family whose template switches thinking off by default (Gemma 4) or
    on a flag (Qwen3, Nemotron 3) loses the switch that speculative thinking needs."""
    for model in ("google/gemma-4-31B-it", "Qwen/Qwen3-0.6B",
                  "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"):
        family = family_of(model)
        assert family is not None and family.thinking_kwargs == {"enable_thinking": True}
    for model in ("deepseek-ai/DeepSeek-V3.1", "ibm-granite/granite-3.3-8b-instruct"):
        family = family_of(model)
        assert family is not None and family.thinking_kwargs == {"thinking": True}
    # Phi-4-reasoning's template has no switch: its system text always asks for <think>.
    family = family_of("microsoft/Phi-4-reasoning-plus")
    assert family is not None and family.thinking_kwargs == {}


def test_each_role_gets_its_familys_thinking_switch_and_template_kwargs_win() -> None:
    """If this fails, the thinking switch of a role's family is not passed (Gemma 4 would not
    reason), reaches a model of another family, or ``template_kwargs`` cannot override it."""
    urls = {"small_url": "http://small", "target_url": "http://target", "backend": "openai"}
    pair = PairSettings(**urls, small_model="google/gemma-4-E4B-it",
                        target_model="openai/gpt-oss-120b", response_template="gemma-4")
    assert pair.role_template_kwargs("small") == {"enable_thinking": True}
    assert pair.role_template_kwargs("target") == {}
    # No model id: the family the response template names decides.
    named = PairSettings(**urls, response_template="gemma-4")
    assert named.role_template_kwargs("target") == {"enable_thinking": True}
    off = PairSettings(**urls, small_model="Qwen/Qwen3-8B",
                       template_kwargs={"enable_thinking": False, "reasoning_effort": "high"})
    assert off.role_template_kwargs("small") == {"enable_thinking": False,
                                                 "reasoning_effort": "high"}
    assert off.role_template_kwargs("target") == {"enable_thinking": False,
                                                  "reasoning_effort": "high"}


def test_template_kwargs_meeting_a_tgi_rendered_template_are_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    """If this fails, a user's template_kwargs are dropped silently on TGI (whose renderer
    takes none), or a family's default switch, which TGI cannot take either, is warned about
    on every build of the paper's TGI pair."""
    urls = {"small_url": "http://small", "target_url": "http://target", "backend": "tgi"}
    with caplog.at_level(logging.WARNING, logger="specthink.settings"):
        PairSettings(**urls, small_model="Qwen/Qwen3-8B").build()
        PairSettings(**urls, template_kwargs={"enable_thinking": False},
                     small_template="chatml", target_template="chatml").build()
        assert caplog.records == []
        PairSettings(**urls, template_kwargs={"enable_thinking": False},
                     target_template="chatml").build()
        PairSettings(**urls, template_kwargs={"enable_thinking": False}).build()
    assert len(caplog.records) == 2
    assert "small model's template" in caplog.records[0].getMessage()
    assert "small and target model's template" in caplog.records[1].getMessage()


PAIR_URLS = {"small_url": "http://127.0.0.1:9", "target_url": "http://127.0.0.1:9",
             "backend": "openai"}


@pytest.mark.parametrize(("small", "target", "expected"), [
    ("openai/gpt-oss-20b", "openai/gpt-oss-120b", "gpt-oss"),
    ("Qwen/Qwen3.5-4B", "Qwen/Qwen3.5-27B", "qwen3.5"),
    ("google/gemma-4-E4B-it", "google/gemma-4-31B-it", "gemma-4"),
    ("mistralai/Magistral-Small-2509", "mistralai/Magistral-Medium-2509", "mistral-reasoning"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
     "deepseek-r1"),
    ("ibm-granite/granite-3.3-2b-instruct", "ibm-granite/granite-3.3-8b-instruct",
     "granite-3.3"),
    ("microsoft/Phi-4-reasoning", "microsoft/Phi-4-reasoning-plus", "phi-4-reasoning"),
    (None, "openai/gpt-oss-120b", "gpt-oss"),  # the target's id names the pair's family
])
def test_a_pair_reads_its_familys_format_without_being_told(
        small: str | None, target: str, expected: str) -> None:
    """If this fails, a user who names a gpt-oss (Qwen3.5, Gemma 4, ...) pair by its model ids,
    as every vLLM user does, still gets ``<think>`` + Hermes: harmony's reasoning fused into
    the answer, XML calls left as text."""
    settings = PairSettings(**PAIR_URLS, small_model=small, target_model=target)
    output_format = settings.pair_output_format()
    family = family_of(target)
    assert family is not None
    assert output_format.name == expected
    assert output_format.template is builtin_template(family.template)
    assert settings.build().output_format.template is output_format.template


def test_an_unknown_model_id_is_a_config_error_on_the_pair_naming_what_to_pass() -> None:
    """If this fails, a model of no known family is read with a guessed format (its reasoning
    the answer, its calls text) instead of a clear error, before any request, that names the
    setting and the choices."""
    with pytest.raises(ConfigError) as caught:
        PairSettings(**PAIR_URLS, small_model="acme/reasoner-7b", target_model="acme/big")
    assert caught.value.field == "response_template"
    message = str(caught.value)
    assert "'acme/reasoner-7b'" in message and "response_template" in message
    assert "think-hermes" in message and "tokenizer_config.json" in message
    for name in template_names():
        assert name in message
    told = PairSettings(**PAIR_URLS, small_model="acme/reasoner-7b",
                        response_template="think-hermes")
    assert told.pair_output_format().name == "think-hermes"


def test_unnamed_models_and_instruct_pairs_keep_think_and_hermes() -> None:
    """If this fails, a TGI or llama.cpp pair (one model per server, no id) or an instruct pair
    (whose reasoning specthink opens itself, ``paper_instruct``) is refused or misread."""
    assert PairSettings(**PAIR_URLS).pair_output_format().name == "think-hermes"
    instruct = PairSettings(**PAIR_URLS, small_model="meta-llama/Llama-3.1-8B-Instruct",
                            target_model="meta-llama/Llama-3.1-70B-Instruct",
                            rules="paper_instruct")
    assert instruct.pair_output_format().name == "think-hermes"


def test_an_unknown_models_tokenizer_config_brings_the_pairs_format(tmp_path: Path) -> None:
    """If this fails, a model specthink does not know by name cannot be served from its own
    checkpoint: the tokenizer_config.json given as its chat template has a response_template,
    and it should apply without being passed twice."""
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": "{{ messages }}", "response_template": OWN}),
                    encoding="utf-8")
    settings = PairSettings(**PAIR_URLS, small_model="acme/reasoner-7b",
                            small_template=str(path), target_template=str(path))
    template = settings.pair_output_format().template
    assert template is not None
    assert parse_response("<reason>hm</reason>ok<|end|>", template, prefix="") == {
        "reasoning_content": "hm", "content": "ok"}


def test_a_pair_of_two_families_with_different_formats_is_refused() -> None:
    """If this fails, a gpt-oss small model paired with a Qwen3 target is read with one of the
    two formats while each continues the other's harmony or ``<think>`` text: garbled reasoning
    and lost calls instead of a clear error before any request."""
    with pytest.raises(ConfigError) as caught:
        PairSettings(**PAIR_URLS, small_model="openai/gpt-oss-20b", target_model="Qwen/Qwen3-32B")
    assert caught.value.field == "response_template"
    assert "'openai/gpt-oss-20b' (gpt-oss)" in str(caught.value)
    assert "'Qwen/Qwen3-32B' (qwen3)" in str(caught.value)
    # Two families of one format (QwQ's and Qwen3's templates are the same built-in) pair well,
    # and a response_template given says which format both write.
    assert PairSettings(**PAIR_URLS, small_model="Qwen/Qwen3-1.7B",
                        target_model="Qwen/QwQ-32B").pair_output_format().name == "qwen3"
    assert PairSettings(**PAIR_URLS, small_model="openai/gpt-oss-20b",
                        target_model="Qwen/Qwen3-32B",
                        response_template="qwen3").pair_output_format().name == "qwen3"


@pytest.mark.parametrize(("name", "required", "closers"), [
    ("gpt-oss", {"<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>"},
     {"<|call|>", "<|return|>"}),
    ("mistral-reasoning", {"[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]"}, {"</s>"}),
    ("gemma-4", {"<|channel>", "<channel|>", "<|tool_call>", '<|"|>'}, {"<tool_call|>"}),
    ("qwen3", {"<think>", "</think>", "<tool_call>"}, {"</tool_call>"}),
])
def test_a_builtins_marker_tokens_hold_every_special_token_it_splits_on(
        name: str, required: set[str], closers: set[str]) -> None:
    """If this fails, llama.cpp is not told to keep one of the special tokens the family's
    output is split on (``preserved_tokens``), or llama-cpp-python is asked to keep a call's or
    the answer's closer, which may be the stop token it never writes (``required_markers``).
    Pattern delimiters count (harmony's call opener, Mistral's ``[ARGS]``), read with their
    escapes undone; named groups and the prompt's start anchor are no markers."""
    template = builtin_template(name)
    assert set(template.marker_tokens) == required | closers
    assert set(template.required_markers) == required
    assert len(template.marker_tokens) == len(set(template.marker_tokens))
