"""Server-sent events: line splitting, the WHATWG field rules, the reader's shortcut and the
JSON of an event (``specthink.backends._sse``)."""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from specthink.backends._connection import ResponseBody
from specthink.backends._sse import (
    LineSplitter,
    ServerSentEvent,
    SSEDecoder,
    SSEStream,
    loads_json,
)


def decode(chunks: list[bytes]) -> list[ServerSentEvent]:
    splitter, decoder = LineSplitter(), SSEDecoder()
    events = []
    for chunk in chunks:
        for line in splitter.feed(chunk):
            event = decoder.decode(line)
            if event is not None:
                events.append(event)
    return events


# --------------------------------------------------------------------------- lines


@pytest.mark.parametrize("stream", [b"a\nb\n", b"a\rb\r", b"a\r\nb\r\n", b"a\nb\r\n"])
def test_lines_break_at_lf_cr_and_crlf(stream: bytes) -> None:
    assert LineSplitter().feed(stream) == ["a", "b"]


def test_crlf_split_across_chunks_is_one_break() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\r") == ["a"]
    assert splitter.feed(b"\nb\n") == ["b"]


def test_blank_lines_are_kept() -> None:
    assert LineSplitter().feed(b"a\r\n\r\nb\n\n") == ["a", "", "b", ""]


def test_unicode_line_separators_are_not_breaks() -> None:
    text = "one\u2028two\u2029three\x85four"
    assert LineSplitter().feed(f"{text}\n".encode()) == [text]


def test_partial_line_waits_for_its_break() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"data:{\"a\"") == []
    assert splitter.feed(b":1}\n") == ['data:{"a":1}']


def test_chunks_cut_inside_a_utf8_character() -> None:
    encoded = "data:é中😀\n".encode()
    splitter = LineSplitter()
    lines = [line for i in range(len(encoded)) for line in splitter.feed(encoded[i:i + 1])]
    assert lines == ["data:é中😀"]


# --------------------------------------------------------------------------- events


def test_tgi_event_without_space_after_colon() -> None:
    [event] = decode([b'data:{"token":{"text":" hi"}}\n\n'])
    assert event.json() == {"token": {"text": " hi"}}


def test_openai_event_with_one_space_and_done() -> None:
    events = decode([b'data: {"x": 1}\n\n', b"data: [DONE]\n\n"])
    assert [e.data for e in events] == ['{"x": 1}', "[DONE]"]


def test_only_one_space_is_stripped() -> None:
    [event] = decode([b"data:  two spaces\n\n"])
    assert event.data == " two spaces"


def test_comments_and_unknown_fields_are_ignored() -> None:
    events = decode([b": keep-alive\n\n", b"foo: bar\ndata:x\n\n"])
    assert [e.data for e in events] == ["x"]


def test_several_data_lines_join_with_newlines() -> None:
    [event] = decode([b"data:a\ndata:b\n\n"])
    assert event.data == "a\nb"


def test_event_id_and_retry_fields() -> None:
    [event] = decode([b"event: error\nid: 7\nretry: 1500\ndata: {}\n\n"])
    assert (event.event, event.id, event.retry, event.data) == ("error", "7", 1500, "{}")


def test_event_without_closing_blank_line_is_not_dispatched() -> None:
    assert decode([b"data:x\n"]) == []


TGI_STREAM = (
    'data:{"index":1,"token":{"id":5,"text":"Ça","logprob":0.0,"special":false}}\r\n\r\n'
    ": ping\n\n"
    'data:{"index":2,"token":{"id":6,"text":" va\u2028?","logprob":0.0,"special":false}}\n\n'
    'data: {"index":3,"token":{"id":2,"text":"</s>","logprob":0.0,"special":true}}\r\r'
).encode()


@given(st.lists(st.integers(min_value=0, max_value=len(TGI_STREAM)), max_size=12))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(TGI_STREAM)]
    chunks = [TGI_STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    texts = [e.json()["token"]["text"] for e in decode(chunks)]
    assert texts == ["Ça", " va\u2028?", "</s>"]


MIXED_STREAM = (
    b'data:{"n":1}\n\n'
    b"event: ping\ndata: {\"n\":2}\n\n"
    b"id: 7\ndata:{\"n\":3}\n\n"
    b'data: {"n":4}\n\n'
    b"retry: 10\ndata:{\"n\":5}\ndata:{}\n\n"
    b'data:{"n":6}\r\n\r\n'
)


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


@given(st.lists(st.integers(min_value=0, max_value=len(MIXED_STREAM)), max_size=10))
async def test_a_stream_reads_the_same_events_as_the_decoder(cuts: list[int]) -> None:
    """SSEStream takes a shortcut for the usual one-data-line event; it must agree with the
    full decoder on names, ids and multi-line data, however the bytes are cut."""
    bounds = [0, *sorted(cuts), len(MIXED_STREAM)]
    chunks = [MIXED_STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    stream = SSEStream(ResponseBody(httpx.Response(200, stream=_Chunks(chunks)), "http://x"))
    events = []
    while (event := await stream.next_event()) is not None:
        events.append(event)
    assert events == decode([MIXED_STREAM])
    assert [(e.event, e.id) for e in events] == [
        ("message", None), ("ping", None), ("message", "7"), ("message", "7"),
        ("message", "7"), ("message", "7")]
    assert events[4].retry == 10 and events[4].data == '{"n":5}\n{}'


@pytest.mark.parametrize(("text", "expected"), [
    ('{"text":"\\u00e7a","n":1.5}', {"text": "ça", "n": 1.5}),
    ('{"seed":18446744073709551616}', {"seed": 2**64}),  # beyond 64 bits: the stdlib reads it
])
def test_event_json_reads_what_the_standard_library_reads(text: str, expected: object) -> None:
    assert loads_json(text) == expected


def test_event_json_reads_nan_as_python_does() -> None:
    assert math.isnan(loads_json('{"logprob":NaN}')["logprob"])


@pytest.mark.parametrize("text", ['{"a":', "", "[1,]"])
def test_malformed_event_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        loads_json(text)
