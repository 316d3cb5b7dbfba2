"""The shared wire pieces: SSE decoding, error translation, retry policy, URL and timeouts,
and the per-event-loop client."""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from specthink.backends import _http as http_module
from specthink.backends._http import (
    SHARD_SIZE,
    LineSplitter,
    RetryPolicy,
    ServerConnection,
    ServerSentEvent,
    SSEDecoder,
    SSEStream,
    is_transient,
    loads_json,
    parse_retry_after,
    resolve_timeout,
    translate_errors,
    uses_environment_proxy,
    validate_url,
)
from specthink.backends._transport import LeanTransport
from specthink.errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    ConfigError,
    GenerationError,
    OverloadedError,
    RequestValidationError,
    StreamDroppedError,
    StreamErrorEvent,
    UnhealthyError,
)
from specthink.testing import LoopbackServer, ScriptedModel


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
    stream = SSEStream(httpx.Response(200, stream=_Chunks(chunks)), "http://x")
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


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("raised", "expected"), [
    (httpx.ConnectError("refused"), BackendConnectionError),
    (httpx.ConnectTimeout("slow"), BackendTimeoutError),
    (httpx.ReadTimeout("stall"), BackendTimeoutError),
    (httpx.PoolTimeout("busy"), BackendTimeoutError),
    (httpx.RemoteProtocolError("reset"), BackendConnectionError),
    (httpx.ReadError("reset"), BackendConnectionError),
    (httpx.UnsupportedProtocol("gopher"), BackendError),
])
def test_httpx_errors_before_the_stream_map_and_chain(raised: Exception,
                                                       expected: type[Exception]) -> None:
    with pytest.raises(expected) as info, translate_errors("http://h:1"):
        raise raised
    assert type(info.value) is expected
    assert info.value.__cause__ is raised
    assert "http://h:1" in str(info.value)


@pytest.mark.parametrize("raised", [httpx.RemoteProtocolError("incomplete chunked read"),
                                    httpx.ReadError("connection reset")])
def test_a_break_after_tokens_is_a_dropped_stream(raised: Exception) -> None:
    with pytest.raises(StreamDroppedError) as info, translate_errors("http://h:1",
                                                                     tokens_received=3):
        raise raised
    assert info.value.tokens_received == 3
    assert info.value.__cause__ is raised


def test_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after": "2.5"})) == 2.5
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}),
                             now=1445412480.0) == 10.0
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert parse_retry_after(httpx.Headers()) is None


@pytest.mark.parametrize(("error", "transient"), [
    (OverloadedError("busy"), True),
    (UnhealthyError("loading"), True),
    (BackendConnectionError("refused"), True),
    (StreamErrorEvent("busy", error_type="overloaded"), True),
    (StreamErrorEvent("busy", error_type="overloaded", tokens_received=1), False),
    (StreamErrorEvent("bad", error_type="validation"), False),
    (RequestValidationError("bad"), False),
    (GenerationError("oom"), False),
    # a router (vllm-router, smg) that could not reach its replica: nothing was generated
    (BackendStatusError("error sending request", status_code=502), True),
    (BackendStatusError("incomplete generation", status_code=500), False),
    (StreamDroppedError("reset", tokens_received=4), False),
    (BackendTimeoutError("stall"), False),
])
def test_which_failures_are_retried(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


def test_retry_after_wins_up_to_the_cap() -> None:
    policy = RetryPolicy(retry_after_cap=30.0)
    assert policy.wait_seconds(1, OverloadedError("busy", retry_after=3.0)) == 3.0
    assert policy.wait_seconds(1, OverloadedError("busy", retry_after=600.0)) == 30.0


def test_backoff_doubles_with_jitter_up_to_the_maximum() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=8.0)
    for retry, base in [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (9, 8.0)]:
        wait = policy.wait_seconds(retry, OverloadedError("busy"))
        assert 0.75 * base <= wait <= base


def test_negative_retry_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ConfigError, match="initial_backoff"):
        RetryPolicy(initial_backoff=-0.1)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("url", ["", "ftp://h/x", "localhost:8080", "http://", "unix:///tmp/s"])
def test_non_http_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="http"):
        validate_url(url)


def test_url_loses_its_trailing_slash() -> None:
    assert validate_url("https://tgi.example/") == "https://tgi.example"


def test_timeouts_have_connect_and_read_but_no_pool_limit() -> None:
    timeout = resolve_timeout(None, connect=2.0, read=60.0)
    assert (timeout.connect, timeout.read, timeout.pool) == (2.0, 60.0, None)
    assert resolve_timeout(3.0, connect=2.0, read=60.0).read == 3.0
    given_timeout = httpx.Timeout(1.0)
    assert resolve_timeout(given_timeout, connect=2.0, read=60.0) is given_timeout
    with pytest.raises(ConfigError, match="read_timeout"):
        resolve_timeout(None, connect=2.0, read=0.0)


# --------------------------------------------------------------------------- clients per loop


async def test_one_client_per_event_loop_and_only_own_clients_closed() -> None:
    connection = ServerConnection("http://127.0.0.1:9")
    here = connection.client()
    assert connection.client() is here

    other: list[httpx.AsyncClient] = []

    async def in_other_loop() -> None:
        other.append(connection.client())
        await other[0].aclose()  # that loop's owner cleans up before its loop ends

    thread = threading.Thread(target=lambda: asyncio.run(in_other_loop()))
    thread.start()
    thread.join()
    assert other[0] is not here

    await connection.aclose()
    assert here.is_closed


async def test_a_passed_client_is_used_and_left_open() -> None:
    async with httpx.AsyncClient() as client:
        connection = ServerConnection("http://127.0.0.1:9", client=client)
        assert connection.client() is client
        await connection.aclose()
        assert not client.is_closed


async def test_one_lean_client_carries_every_request(
        loopback_server: Callable[..., LoopbackServer]) -> None:
    server = loopback_server(ScriptedModel.single("a b c"))
    connection = ServerConnection(server.url)
    streams = [await connection.open_stream(
        "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 5}},
        on_attempt=None, check_first=lambda event: None) for _ in range(SHARD_SIZE + 1)]
    [client] = connection.clients()
    assert isinstance(client._transport, LeanTransport)
    for stream in streams:
        await stream.aclose()
    await connection.aclose()
    assert client.is_closed


@pytest.mark.parametrize(("environment", "proxied"), [
    ({}, False),
    ({"HTTP_PROXY": "http://proxy:3128"}, True),
    ({"ALL_PROXY": "http://proxy:3128"}, True),
    ({"HTTPS_PROXY": "http://proxy:3128"}, False),  # the server is plain http
    ({"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "gpu-box"}, False),
])
def test_a_proxy_from_the_environment_keeps_httpx_own_transport(
        monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], proxied: bool) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert uses_environment_proxy("http://gpu-box:8080") is proxied


async def test_requests_spread_over_clients_beyond_the_shard_size(
        loopback_server: Callable[..., LoopbackServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx's own transport (used when a proxy applies) is sharded: httpcore scans its pool."""
    monkeypatch.setattr(http_module, "uses_environment_proxy", lambda url: True)
    server = loopback_server(ScriptedModel.single("a b c"))
    connection = ServerConnection(server.url)
    streams = [await connection.open_stream(
        "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 5}},
        on_attempt=None, check_first=lambda event: None) for _ in range(SHARD_SIZE + 1)]
    clients = connection.clients()
    assert len(clients) == 2
    for stream in streams:
        await stream.aclose()
    assert connection.client() is clients[0]  # back to the first once it has room
    await connection.aclose()
    assert all(client.is_closed for client in clients)
