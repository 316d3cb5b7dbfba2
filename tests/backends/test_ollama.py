"""OllamaBackend (newline-delimited JSON, one new file) against a tiny Ollama server on
loopback (``tests.ollama_support``, the ``ollama`` fixture): what it sends, how it reads the
lines, how errors map, and the engine on top."""

from __future__ import annotations

from typing import Any

import pytest

from specthink import SpeculativeThinker
from specthink.backends import SamplingParams, create, kinds
from specthink.backends.ollama import OllamaBackend, decode_chunk, generate_body
from specthink.errors import (
    BackendStatusError,
    ConfigError,
    ContextLimitError,
    InStreamError,
    StreamDroppedError,
)
from tests.ollama_support import Ollama

GREEDY = SamplingParams()


async def collect(backend: Any, **options: Any) -> list[Any]:
    async with backend.stream("<|im_start|>assistant\n", sampling=GREEDY,
                              **{"max_new_tokens": 16, **options}) as tokens:
        return [token async for token in tokens]


def test_ollama_is_a_kind_of_the_factory() -> None:
    """Broken: a new protocol module is not found by ``create`` (it must take one file)."""
    assert "ollama" in kinds()
    backend = create("ollama", "http://127.0.0.1:1", model="m", read_timeout=9.0)
    assert isinstance(backend, OllamaBackend) and backend.timeout.read == 9.0


def test_the_request_is_raw_and_streamed_with_ollama_option_names() -> None:
    """Broken: Ollama applies its own template over ours (``raw`` missing) or ignores the
    budget and sampling settings (they go in ``options``)."""
    body = generate_body("p", model="m", max_new_tokens=5,
                         sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=3,
                                                 repetition_penalty=1.1))
    assert body == {"model": "m", "prompt": "p", "raw": True, "stream": True,
                    "options": {"num_predict": 5, "temperature": 0.7, "top_p": 0.9,
                                "top_k": 20, "seed": 3, "repeat_penalty": 1.1}}
    assert generate_body("p", model="m", max_new_tokens=5,
                         sampling=GREEDY)["options"] == {"num_predict": 5, "temperature": 0.0}
    with pytest.raises(ConfigError):
        generate_body("p", model="m", max_new_tokens=0, sampling=GREEDY)


def test_the_done_line_carries_the_finish_and_the_prompt_length() -> None:
    """Broken: the end of an answer is not recognised, so every stream looks dropped."""
    end = decode_chunk({"response": "", "done": True, "done_reason": "stop",
                        "prompt_eval_count": 12})
    assert end is not None
    assert (end.special, end.finish_reason, end.input_tokens) == (True, "eos", 12)
    assert decode_chunk({"response": "x", "done": False}) == type(end)("x")
    with pytest.raises(InStreamError, match="boom"):
        decode_chunk({"error": "boom"})


async def test_a_stream_reads_every_line_to_the_finish(ollama: Ollama) -> None:
    """Broken: NDJSON framing loses a line (the last one has no newline) or a token's text."""
    backend = OllamaBackend(ollama.url, model="qwen3:0.6b")
    try:
        tokens = await collect(backend, routing_key="conv-1")
    finally:
        await backend.aclose()
    assert "".join(t.text for t in tokens) == "Hello there."
    assert (tokens[-1].finish_reason, tokens[-1].input_tokens) == ("eos", 7)
    assert ollama.requests[0]["model"] == "qwen3:0.6b"
    assert ollama.headers[0]["x-session-id"] == "conv-1"


async def test_the_budget_ends_with_length(ollama: Ollama) -> None:
    """Broken: a cut answer is reported as finished by the model."""
    backend = OllamaBackend(ollama.url, model="qwen3:0.6b")
    try:
        tokens = await collect(backend, max_new_tokens=2)
    finally:
        await backend.aclose()
    assert [t.text for t in tokens] == ["Hello", " there", ""]
    assert tokens[-1].finish_reason == "length"


async def test_the_model_defaults_to_the_first_listed(ollama: Ollama) -> None:
    """Broken: without ``model`` the request names none and Ollama refuses it."""
    backend = OllamaBackend(ollama.url)
    try:
        await collect(backend)
        assert backend.model == "qwen3:0.6b"
        assert await backend.health()
    finally:
        await backend.aclose()


async def test_health_asks_the_version_and_is_false_when_down(ollama: Ollama) -> None:
    """Broken: ``health`` asks a path Ollama does not serve (every server looks down), or
    raises for a server that is down instead of answering False."""
    up = OllamaBackend(ollama.url, model="qwen3:0.6b")
    down = OllamaBackend("http://127.0.0.1:1", model="qwen3:0.6b", max_retries=0)
    try:
        assert await up.health() is True
        assert await down.health() is False
    finally:
        await up.aclose()
        await down.aclose()


async def test_an_error_line_before_any_token_raises_on_open(ollama: Ollama) -> None:
    """Broken: an in-stream error is read as text, or is not mapped (a length error must be a
    ContextLimitError like the other protocols')."""
    ollama.error_line = "the input length exceeds the context length"
    backend = OllamaBackend(ollama.url, model="qwen3:0.6b")
    try:
        with pytest.raises(ContextLimitError, match="exceeds the context length") as raised:
            await collect(backend)
        assert isinstance(raised.value, InStreamError)
    finally:
        await backend.aclose()


async def test_an_error_status_maps_to_its_class(ollama: Ollama) -> None:
    """Broken: Ollama's ``{"error": ...}`` bodies lose their message."""
    ollama.status_error = (404, "model 'nope' not found")
    backend = OllamaBackend(ollama.url, model="nope", max_retries=0)
    try:
        with pytest.raises(BackendStatusError, match="model 'nope' not found") as raised:
            await collect(backend)
    finally:
        await backend.aclose()
    assert raised.value.status_code == 404
    assert not isinstance(raised.value, ContextLimitError)


async def test_a_broken_stream_is_a_dropped_stream(ollama: Ollama) -> None:
    """Broken: a server dying mid-answer looks like a finished answer, so the engine does not
    resume."""
    ollama.drop_after = 2
    backend = OllamaBackend(ollama.url, model="qwen3:0.6b")
    try:
        with pytest.raises(StreamDroppedError):
            await collect(backend)
    finally:
        await backend.aclose()


async def test_the_engine_runs_over_ollama(ollama: Ollama) -> None:
    """Broken: the engine relies on something only the SSE backends have."""
    thinker = SpeculativeThinker(small=create("ollama", ollama.url, model="qwen3:0.6b"),
                                 target=create("ollama", ollama.url, model="qwen3:8b"),
                                 small_template="chatml", target_template="chatml")
    try:
        result = await thinker.agenerate([{"role": "user", "content": "Hi"}],
                                         max_new_tokens=16)
    finally:
        await thinker.aclose()
    assert result.text == "Hello there."
