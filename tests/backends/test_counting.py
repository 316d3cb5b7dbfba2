"""Token counts of long texts read as the tokenizer's answer streams in
(``specthink.backends._counting``): the same count the whole answer gives, on every server
whose tokenizer answers with a count or an object per token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from specthink.backends import OpenAICompletionsBackend, TGIBackend
from specthink.backends._counting import count_occurrences, int_field
from specthink.testing import EchoModel, LoopbackServer

Start = Callable[..., LoopbackServer]
LONG = "Hello there, general Kenobi! " * 5_000
"""150 KB: above STREAMED_COUNT_CHARS, so counted from the stream."""


class Chunks:
    """A ``ResponseBody`` stand-in that hands out ``data`` in pieces of ``size`` bytes."""

    def __init__(self, data: bytes, size: int) -> None:
        self.pieces = [data[i:i + size] for i in range(0, len(data), size)]
        self.closed = False

    async def next_chunk(self, tokens_received: int | None) -> bytes | None:
        return self.pieces.pop(0) if self.pieces else None

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 64, 10_000])
async def test_occurrences_split_across_reads_are_counted_once(size: int) -> None:
    """Broken: a key cut between two reads is missed or counted twice."""
    body = b'[{"id":1,"text":"a\\"id\\":"},{"id":2,"text":"\\"id\\""},{"id":3,"text":"x"}]'
    chunks = Chunks(body, size)
    assert await count_occurrences(chunks, b'"id":') == 3  # type: ignore[arg-type]
    assert chunks.closed


async def test_a_count_field_is_read_from_the_head_and_the_rest_left_unread() -> None:
    """Broken: the whole id list behind vLLM's count is read and parsed."""
    chunks = Chunks(b'{"count":123456,"max_model_len":8192,"tokens":[' + b"1," * 100_000,
                    size=16)
    assert await int_field(chunks, "count") == 123456  # type: ignore[arg-type]
    assert chunks.closed and chunks.pieces  # most of the answer never read


async def test_tgi_counts_a_long_text_as_its_whole_answer_would(
        loopback_server: Start) -> None:
    """Broken: the count of a long prompt differs from the server's token list."""
    server = loopback_server(EchoModel())
    backend = TGIBackend(server.url)
    try:
        assert await backend.count_tokens(LONG) == len(await backend.tokenize(LONG))
    finally:
        await backend.aclose()


@pytest.mark.parametrize("flavor", ["vllm", "tgi", "llama-cpp-python", "llamacpp"])
async def test_openai_servers_count_a_long_text_as_their_ids_say(
        loopback_server: Start, flavor: str) -> None:
    """vLLM's and llama-cpp-python's count fields, TGI's token objects counted as they stream,
    llama.cpp's id list: every tokenizer gives the long text's true count. Broken: a long
    prompt is parsed whole, or a streamed count is off."""
    options: dict[str, Any] = {"flavor": flavor}
    server = loopback_server(EchoModel(), **options)
    backend = OpenAICompletionsBackend(server.url)
    try:
        expected = len(await backend.tokenize(LONG))
        assert await backend.count_tokens(LONG) == expected
    finally:
        await backend.aclose()
    count_paths = [call.path for call in server.calls][-1]
    assert count_paths == {"vllm": "/tokenize", "tgi": "/tokenize", "llamacpp": "/tokenize",
                           "llama-cpp-python": "/extras/tokenize/count"}[flavor]
