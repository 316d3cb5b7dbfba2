"""The OpenAI-compatible backend and the LangChain model on the real local llama.cpp pair.

SmolLM2-135M-Instruct serves both roles: these tests check the mechanics (real model text, real
HTTP, real prompt caching), not the quality of the answers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from specthink import SpeculativeThinker, TakeoverRules
from specthink.backends import OpenAICompletionsBackend, SamplingParams
from specthink.errors import ConfigError
from specthink.formats import OutputFormat
from specthink.formats.families import builtin_template
from specthink.formats.response_template import load_template
from specthink.local import LocalPair
from tests.local.real_pair import REAL_PAIR_MARKS, running_pair

pytestmark = REAL_PAIR_MARKS


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPair]:
    with running_pair(tmp_path_factory.mktemp("local-pair"), verbose=True) as local:
        yield local


async def test_openai_backend_streams_real_tokens(pair: LocalPair) -> None:
    backend = OpenAICompletionsBackend(pair.url("small"))
    try:
        info = await backend.info()
        prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
        async with backend.stream(prompt, max_new_tokens=12, sampling=SamplingParams()) as tokens:
            received = [token async for token in tokens]
        assert await backend.count_tokens(prompt) > 5
    finally:
        await backend.aclose()
    assert "smollm2" in info.model_id.lower()
    text = "".join(t.text for t in received)
    assert text.strip()
    assert received[-1].finish_reason in ("eos", "length")
    # llama-cpp-python sends no usage chunk in streams; servers that do (vLLM, TGI) fill it in
    assert received[-1].input_tokens is None or received[-1].input_tokens > 5


CHATML_MARKED = {
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {"reasoning_content": {"open": "<|im_start|>think\n", "close": "<|im_end|>"},
               "content": {"close": "<|endoftext|>"}}}
"""A response template whose reasoning is marked by SmolLM2's own special tokens."""


async def test_markers_the_model_holds_as_special_tokens_are_refused_by_llama_cpp_python(
        pair: LocalPair) -> None:
    """If this fails, an output format whose markers the served model holds as special tokens
    is run on llama-cpp-python's real server, whose /v1/completions drops their text: the
    reasoning would come back fused into the answer, instead of a ConfigError before any
    generation request naming the markers and llama-server. Harmony's markers are plain text
    to SmolLM2, so a gpt-oss format is not refused here: nothing of it would be lost."""
    generations: list[str] = []
    small = OpenAICompletionsBackend(pair.url("small"))
    engine = SpeculativeThinker(
        small=small, target=OpenAICompletionsBackend(pair.url("target")),
        small_template="chatml", target_template="chatml",
        output_format=OutputFormat.from_template(load_template(CHATML_MARKED)),
        on_request=lambda role, attempt, kind: generations.extend(
            [role] if kind == "generation" else []))
    try:
        with pytest.raises(ConfigError, match=r"llama-cpp-python.*<\|im_end\|>.*llama-server"):
            await engine.agenerate([{"role": "user", "content": "What is 2 + 2?"}],
                                   max_new_tokens=8)
        await small.check_keeps(builtin_template("gpt-oss").required_markers)
    finally:
        await engine.aclose()
    assert generations == []


def _prefix_hits(log: Path) -> list[tuple[int, int]]:
    """(reused, recomputed) prompt tokens per request, from llama-cpp-python's verbose log."""
    found = re.findall(r"(\d+) prefix-match hit, remaining (\d+) prompt tokens",
                       log.read_text(errors="replace"))
    return [(int(a), int(b)) for a, b in found]


def test_langchain_model_on_the_real_pair(pair: LocalPair) -> None:
    from langchain_core.messages import AIMessage, HumanMessage

    from specthink_lc import ChatSpeculativeThinking

    model = ChatSpeculativeThinking(
        small_url=pair.url("small"), target_url=pair.url("target"), backend="openai",
        rules=TakeoverRules.paper_instruct(begin_tokens=24, n1=8), small_template="chatml",
        target_template="chatml", temperature=0, max_tokens=160)
    small_log = pair.log_file("small")
    chunks = list(model.stream("List three prime numbers, one per paragraph."))

    text = "".join(str(c.content) for c in chunks)
    last = chunks[-1]
    stats = last.response_metadata["speculative_thinking"]
    usage = last.usage_metadata
    assert text.strip()
    assert usage is not None and usage["output_tokens"] == stats["output_tokens"]
    assert stats["output_tokens"] == (stats["small_tokens"] + stats["target_tokens"]
                                      + stats["intervention_tokens"])
    assert stats["takeovers"]["begin"] == 1 and stats["target_tokens"] > 0
    assert 0 < stats["target_share"] <= 1
    assert stats["requests"]["small"] >= 1

    # The next turn extends the conversation: llama.cpp serves the shared prefix from its cache.
    hits_turn_one = len(_prefix_hits(small_log))
    follow_up = [HumanMessage("List three prime numbers, one per paragraph."), AIMessage(text),
                 HumanMessage("Now add them up.")]
    try:
        model.invoke(follow_up)
    finally:
        model.close()
    reused, recomputed = _prefix_hits(small_log)[hits_turn_one]
    assert reused > recomputed > 0
