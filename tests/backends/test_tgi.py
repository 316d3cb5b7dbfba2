"""TGIBackend against scripted HTTP answers (httpx.MockTransport): what it sends, how it reads
TGI's stream, and how failures become specthink errors."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx
import pytest

from specthink.backends import Backend, SamplingParams, ServerInfo, StreamToken, TGIBackend
from specthink.backends.tgi import decode_stream_event, generate_parameters
from specthink.errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    ConfigError,
    GenerationError,
    IncompleteGenerationError,
    InStreamError,
    OverloadedError,
    RequestValidationError,
    StreamDroppedError,
    UnhealthyError,
)

URL = "http://tgi.test"
GREEDY = SamplingParams()


class Chunks(httpx.AsyncByteStream):
    """A response body sent in the given chunks, optionally breaking afterwards."""

    def __init__(self, chunks: Iterable[bytes], *, then_raise: Exception | None = None) -> None:
        self.chunks = list(chunks)
        self.then_raise = then_raise
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.then_raise is not None:
            raise self.then_raise

    async def aclose(self) -> None:
        self.closed = True


def event(text: str, *, index: int = 1, special: bool = False,
          details: dict[str, Any] | None = None) -> bytes:
    payload = {"index": index, "token": {"id": 7, "text": text, "logprob": -0.1,
                                         "special": special},
               "generated_text": None, "details": details}
    return b"data:" + json.dumps(payload).encode() + b"\n\n"


def final(text: str = "</s>", reason: str = "eos_token", input_length: int = 5) -> bytes:
    return event(text, special=reason == "eos_token",
                 details={"finish_reason": reason, "generated_tokens": 3,
                          "input_length": input_length, "seed": None})


def sse(*chunks: bytes, then_raise: Exception | None = None) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"},
                          stream=Chunks(chunks, then_raise=then_raise))


Handler = Callable[[httpx.Request], httpx.Response]


def backend(handler: Handler, **options: Any) -> TGIBackend:
    options.setdefault("retry_backoff", 0.0)
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return TGIBackend(URL, client=client, **options)


async def collect(tgi: TGIBackend, prompt: str = "Q:", **options: Any) -> list[StreamToken]:
    options.setdefault("max_new_tokens", 16)
    options.setdefault("sampling", GREEDY)
    async with tgi.stream(prompt, **options) as tokens:
        return [token async for token in tokens]


class Recorder:
    """A handler that answers from a list, one answer per request, and keeps the requests."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def body(self, n: int = 0) -> Any:
        return json.loads(self.requests[n].content)


# --------------------------------------------------------------------------- payloads


def test_greedy_is_do_sample_false_without_temperature_or_top_p() -> None:
    assert generate_parameters(32, SamplingParams(temperature=0.0, top_p=0.95)) == {
        "max_new_tokens": 32, "details": True, "do_sample": False}


def test_sampling_sends_its_settings() -> None:
    params = generate_parameters(8, SamplingParams(temperature=0.6, top_p=0.95, top_k=50,
                                                   seed=3, repetition_penalty=1.1))
    assert params == {"max_new_tokens": 8, "details": True, "do_sample": True,
                      "temperature": 0.6, "top_p": 0.95, "top_k": 50, "seed": 3,
                      "repetition_penalty": 1.1}


def test_top_p_of_one_is_left_out_because_tgi_rejects_it() -> None:
    assert "top_p" not in generate_parameters(8, SamplingParams(temperature=0.7, top_p=1.0))


def test_grammar_is_passed_through() -> None:
    grammar = {"type": "json", "value": {"properties": {"a": {"type": "integer"}}}}
    assert generate_parameters(8, SamplingParams(grammar=grammar))["grammar"] == grammar


def test_max_new_tokens_below_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_parameters(0, GREEDY)


async def test_stream_posts_inputs_and_parameters() -> None:
    handler = Recorder(sse(event("Hi"), final()))
    tgi = backend(handler)
    await collect(tgi, "<s>prompt", max_new_tokens=12)
    request = handler.requests[0]
    assert (request.method, str(request.url)) == ("POST", f"{URL}/generate_stream")
    assert handler.body() == {"inputs": "<s>prompt", "parameters": {
        "max_new_tokens": 12, "details": True, "do_sample": False}}


# --------------------------------------------------------------------------- decoding


async def test_tokens_then_special_eos_with_finish_and_input_length() -> None:
    tgi = backend(Recorder(sse(event("Hello"), event(" world", index=2), final())))
    assert await collect(tgi) == [
        StreamToken("Hello"), StreamToken(" world"),
        StreamToken("", special=True, finish_reason="eos", input_tokens=5)]


@pytest.mark.parametrize(("reason", "finish"), [("length", "length"),
                                                 ("stop_sequence", "stop"),
                                                 ("eos_token", "eos")])
def test_finish_reasons_map(reason: str, finish: str) -> None:
    from specthink.backends.tgi import decode_stream_event

    token = decode_stream_event({"token": {"text": "x", "special": False},
                                 "details": {"finish_reason": reason, "input_length": 2}})
    assert token.finish_reason == finish


async def test_crlf_lines_and_chunks_cut_mid_character() -> None:
    body = (event("naïve") + event(" 数学", index=2) + final(" ok", "length")).replace(
        b"\n", b"\r\n")
    chunks = [body[i:i + 7] for i in range(0, len(body), 7)]
    tgi = backend(Recorder(sse(*chunks)))
    tokens = await collect(tgi)
    assert "".join(t.text for t in tokens) == "naïve 数学 ok"
    assert tokens[-1].finish_reason == "length"


async def test_keep_alive_comments_are_skipped() -> None:
    tgi = backend(Recorder(sse(b":\n\n", event("a"), b":\n\n", final())))
    assert [t.text for t in await collect(tgi)] == ["a", ""]


# --------------------------------------------------------------------------- in-stream errors


def error_event(message: str, error_type: str) -> bytes:
    return b"data:" + json.dumps({"error": message, "error_type": error_type}).encode() + b"\n\n"


async def test_error_event_before_any_token_raises_on_open() -> None:
    tgi = backend(Recorder(sse(error_event("Input validation error: `top_p` must be > 0.0",
                                           "validation"))))
    with pytest.raises(InStreamError) as info:
        await collect(tgi)
    assert (info.value.error_type, info.value.tokens_received) == ("validation", 0)
    assert "top_p" in str(info.value)


async def test_error_event_after_tokens_raises_while_reading() -> None:
    tgi = backend(Recorder(sse(event("a"), event("b", index=2),
                               error_event("Request failed during generation", "generation"))))
    seen: list[str] = []
    with pytest.raises(InStreamError) as info:
        async with tgi.stream("Q", max_new_tokens=9, sampling=GREEDY) as tokens:
            async for token in tokens:
                seen.append(token.text)
    assert seen == ["a", "b"]
    assert (info.value.error_type, info.value.tokens_received) == ("generation", 2)


async def test_overloaded_event_before_the_first_token_is_retried() -> None:
    handler = Recorder(sse(error_event("Model is overloaded", "overloaded")),
                       sse(event("ok"), final()))
    attempts: list[int] = []
    tokens = await collect(backend(handler), on_attempt=attempts.append)
    assert [t.text for t in tokens] == ["ok", ""]
    assert attempts == [1, 2]


# --------------------------------------------------------------------------- status answers


@pytest.mark.parametrize(("status", "error_type", "expected"), [
    (422, "validation", RequestValidationError),
    (424, "generation", GenerationError),
    (429, "overloaded", OverloadedError),
    (500, "incomplete_generation", IncompleteGenerationError),
    (503, "unhealthy", UnhealthyError),
])
async def test_error_statuses_map_to_their_class(status: int, error_type: str,
                                                 expected: type[BackendStatusError]) -> None:
    answer = httpx.Response(status, json={"error": f"{error_type} happened",
                                          "error_type": error_type})
    with pytest.raises(expected) as info:
        await collect(backend(Recorder(answer), max_retries=0))
    assert (info.value.status_code, info.value.error_type) == (status, error_type)
    assert info.value.url == URL


async def test_429_is_retried_until_it_succeeds() -> None:
    busy = httpx.Response(429, json={"error": "Model is overloaded", "error_type": "overloaded"})
    handler = Recorder(busy, busy, sse(event("x"), final()))
    attempts: list[int] = []
    await collect(backend(handler, max_retries=2), on_attempt=attempts.append)
    assert attempts == [1, 2, 3]


async def test_retries_are_bounded_by_max_retries() -> None:
    down = httpx.Response(503, json={"error": "loading", "error_type": "unhealthy"})
    handler = Recorder(down)
    with pytest.raises(UnhealthyError):
        await collect(backend(handler, max_retries=3))
    assert len(handler.requests) == 4


async def test_validation_errors_are_not_retried() -> None:
    handler = Recorder(httpx.Response(422, json={"error": "bad", "error_type": "validation"}))
    with pytest.raises(RequestValidationError):
        await collect(backend(handler, max_retries=5))
    assert len(handler.requests) == 1


async def test_retry_after_is_obeyed(caplog: pytest.LogCaptureFixture) -> None:
    busy = httpx.Response(429, headers={"Retry-After": "0.02"},
                          json={"error": "Model is overloaded", "error_type": "overloaded"})
    handler = Recorder(busy, sse(event("x"), final()))
    with caplog.at_level(logging.WARNING, logger="specthink.backends"):
        await collect(backend(handler, retry_backoff=5.0))
    assert "in 0.020 s" in caplog.text


async def test_exhausted_retries_report_the_servers_retry_after() -> None:
    busy = httpx.Response(429, headers={"Retry-After": "0"},
                          json={"error": "Model is overloaded", "error_type": "overloaded"})
    with pytest.raises(OverloadedError) as info:
        await collect(backend(Recorder(busy), max_retries=1))
    assert info.value.retry_after == 0.0


# --------------------------------------------------------------------------- transport failures


async def test_refused_connections_are_retried_then_raised() -> None:
    handler = Recorder(httpx.ConnectError("Connection refused"))
    with pytest.raises(BackendConnectionError) as info:
        await collect(backend(handler, max_retries=2))
    assert len(handler.requests) == 3
    assert isinstance(info.value.__cause__, httpx.ConnectError)


async def test_read_timeout_is_a_timeout_and_not_retried() -> None:
    handler = Recorder(httpx.ReadTimeout("stalled"))
    with pytest.raises(BackendTimeoutError):
        await collect(backend(handler, max_retries=2))
    assert len(handler.requests) == 1


async def test_connection_broken_after_tokens_is_a_dropped_stream() -> None:
    broken = sse(event("a"), event("b", index=2),
                 then_raise=httpx.RemoteProtocolError("incomplete chunked read"))
    handler = Recorder(broken)
    with pytest.raises(StreamDroppedError) as info:
        await collect(backend(handler))
    assert info.value.tokens_received == 2
    assert len(handler.requests) == 1


async def test_stream_ending_without_a_finish_is_a_dropped_stream() -> None:
    with pytest.raises(StreamDroppedError, match="without a finish reason"):
        await collect(backend(Recorder(sse(event("a")))))


async def test_an_event_that_is_not_json_is_a_backend_error_naming_it() -> None:
    with pytest.raises(BackendError, match=r"malformed stream event after 1 tokens: '\{oops'"):
        await collect(backend(Recorder(sse(event("a"), b"data:{oops\n\n", final()))))


async def test_leaving_the_block_closes_the_response_at_once() -> None:
    body = Chunks([event("a"), event("b", index=2), final()])
    tgi = backend(Recorder(httpx.Response(200, stream=body)))
    async with tgi.stream("Q", max_new_tokens=9, sampling=GREEDY) as tokens:
        first = await tokens.__anext__()
        assert not body.closed
    assert first.text == "a"
    assert body.closed


# --------------------------------------------------------------------------- auth and repr


async def test_api_key_is_sent_but_never_shown() -> None:
    secret = "sk-very-secret"
    handler = Recorder(httpx.Response(401, json={"error": "Unauthorized",
                                                 "error_type": "auth"}))
    tgi = backend(handler, api_key=secret)
    with pytest.raises(BackendStatusError) as info:
        await collect(tgi)
    assert handler.requests[0].headers["authorization"] == f"Bearer {secret}"
    assert secret not in repr(tgi)
    assert secret not in str(info.value)
    assert secret not in repr(info.value)


async def test_api_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTHINK_API_KEY", "env-key")
    handler = Recorder(sse(event("a"), final()))
    await collect(backend(handler))
    assert handler.requests[0].headers["authorization"] == "Bearer env-key"


async def test_no_auth_header_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECTHINK_API_KEY", raising=False)
    handler = Recorder(sse(event("a"), final()))
    await collect(backend(handler))
    assert "authorization" not in handler.requests[0].headers


def test_non_http_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="http"):
        TGIBackend("grpc://tgi:8080")


def test_implements_the_backend_protocol() -> None:
    backend = TGIBackend(URL)
    assert isinstance(backend, Backend)
    assert (backend.adds_bos_token, backend.supports_grammar) == (True, True)


def test_repr_names_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECTHINK_API_KEY", raising=False)
    assert repr(TGIBackend("http://tgi:8080/")) == "TGIBackend('http://tgi:8080')"


# --------------------------------------------------------------------------- other endpoints


INFO = {"model_id": "Qwen/Qwen2.5-7B-Instruct", "max_input_tokens": 4095,
        "max_total_tokens": 4096, "max_stop_sequences": 4, "version": "3.3.6"}


async def test_info_is_fetched_once() -> None:
    handler = Recorder(httpx.Response(200, json=INFO))
    tgi = backend(handler)
    first = await tgi.info()
    assert await tgi.info() is first
    assert first == ServerInfo("Qwen/Qwen2.5-7B-Instruct", 4095, 4096, 4, INFO)
    assert len(handler.requests) == 1


async def test_info_of_old_tgi_reads_max_input_length() -> None:
    old = {"model_id": "m", "max_input_length": 1000, "max_total_tokens": 2048}
    info = await backend(Recorder(httpx.Response(200, json=old))).info()
    assert info.max_input_tokens == 1000


async def test_health() -> None:
    assert await backend(Recorder(httpx.Response(200))).health() is True
    unhealthy = httpx.Response(503, json={"error": "unhealthy", "error_type": "healthcheck"})
    assert await backend(Recorder(unhealthy)).health() is False
    assert await backend(Recorder(httpx.ConnectError("refused"))).health() is False


async def test_count_tokens_posts_inputs_to_tokenize() -> None:
    simple = [{"id": i, "text": "t", "start": i, "stop": i + 1} for i in range(4)]
    handler = Recorder(httpx.Response(200, json=simple))
    assert await backend(handler).count_tokens("abcd") == 4
    assert (handler.requests[0].url.path, handler.body()) == ("/tokenize", {"inputs": "abcd"})


async def test_render_chat_uses_chat_tokenize() -> None:
    answer = {"templated_text": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
              "tokenize_response": []}
    handler = Recorder(httpx.Response(200, json=answer))
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    text = await backend(handler).render_chat([{"role": "user", "content": "hi"}], [tool])
    assert text == answer["templated_text"]
    assert handler.body() == {"model": "tgi", "messages": [{"role": "user", "content": "hi"}],
                              "tools": [tool]}


async def test_render_chat_is_none_without_the_endpoint() -> None:
    missing = httpx.Response(404, json={"error": "Not found", "error_type": "not_found"})
    assert await backend(Recorder(missing)).render_chat([{"role": "user", "content": "x"}]) is None


async def test_aclose_keeps_a_passed_client_open() -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(Recorder(httpx.Response(200)))
                                 ) as client:
        tgi = TGIBackend(URL, client=client)
        assert await tgi.health()
        await tgi.aclose()
        assert not client.is_closed
        assert await tgi.health()


def test_a_special_tokens_text_is_kept_only_when_the_format_needs_it() -> None:
    """Broken: harmony's or Mistral's markers (special tokens, whose text TGI streams with
    ``special: true``) are lost behind TGI, or the stop token's text leaks into the output."""
    channel = {"token": {"id": 200005, "text": "<|channel|>", "logprob": 0.0, "special": True},
               "generated_text": None, "details": None}
    stop = {"token": {"id": 200002, "text": "<|return|>", "logprob": 0.0, "special": True},
            "generated_text": "", "details": {"finish_reason": "eos_token",
                                              "generated_tokens": 2, "input_length": 5}}
    assert decode_stream_event(channel).text == ""
    kept = decode_stream_event(channel, keep_special=True)
    assert (kept.text, kept.special, kept.finish_reason) == ("<|channel|>", False, None)
    ended = decode_stream_event(stop, keep_special=True)
    assert (ended.text, ended.special, ended.finish_reason) == ("", True, "eos")
