"""Every error the server answers is an OpenAI error object with the status OpenAI uses; the
client's mistakes are found before any model server is asked (the pair's records stay empty)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from specthink.backends.tgi import TGIBackend
from specthink.serve import create_app
from specthink.testing import Fault, LatencyModel, LoopbackServer

from .conftest import (
    AppServer,
    ConversationModel,
    Pair,
    Served,
    client,
    conversation_pair,
    settings_for,
)
from .test_chat import HELLO

OK = {"model": "specthink", "messages": HELLO}


def post(served: Served, body: bytes | dict[str, Any], headers: dict[str, str] | None = None,
         ) -> httpx.Response:
    url = f"{served.base_url}/chat/completions"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json",
                                                      **(headers or {})}, timeout=30)
    return httpx.post(url, json=body, headers=headers, timeout=30)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error object of ``response``, checked to have OpenAI's four fields."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    return dict(error)


BAD_REQUESTS: list[tuple[str, bytes | dict[str, Any], str | None]] = [
    ("malformed JSON", b'{"model": "specthink", "messages": [', None),
    ("not an object", b'["specthink"]', None),
    ("no messages", {"model": "specthink"}, "messages"),
    ("empty messages", {**OK, "messages": []}, "messages"),
    ("unknown role", {**OK, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("an image", {**OK, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]}, "messages"),
    ("n above 1", {**OK, "n": 2}, "n"),
    ("logprobs", {**OK, "logprobs": True}, "logprobs"),
    ("top_logprobs", {**OK, "top_logprobs": 3}, "top_logprobs"),
    ("logit_bias", {**OK, "logit_bias": {"42": 5}}, "logit_bias"),
    ("audio output", {**OK, "modalities": ["text", "audio"]}, "modalities"),
    ("an unknown field", {**OK, "frobnicate": True}, "frobnicate"),
    ("temperature out of range", {**OK, "temperature": 3}, "temperature"),
    ("top_p zero", {**OK, "top_p": 0}, "top_p"),
    ("max_tokens zero", {**OK, "max_tokens": 0}, "max_tokens"),
    ("max_tokens above the limit", {**OK, "max_tokens": 10**6}, "max_tokens"),
    ("too many stop sequences", {**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("a tool without a name", {**OK, "tools": [{"type": "function", "function": {}}]},
     "tools"),
    ("tool_choice naming no offered tool", {**OK, "tools": [
        {"type": "function", "function": {"name": "a"}}], "tool_choice": {
        "type": "function", "function": {"name": "b"}}}, "tool_choice"),
    ("tool_choice required without tools", {**OK, "tool_choice": "required"}, "tool_choice"),
    ("an unknown response_format", {**OK, "response_format": {"type": "xml"}},
     "response_format"),
    ("an unknown rules preset", {**OK, "specthink": {"rules": "fastest"}}, "specthink.rules"),
    ("an invalid rules field", {**OK, "specthink": {"rules": {"n1": 0}}},
     "specthink.rules.n1"),
    ("an unknown specthink option", {**OK, "specthink": {"turbo": True}}, "specthink.turbo"),
    ("include_usage not a bool", {**OK, "stream_options": {"include_usage": "maybe"}},
     "stream_options.include_usage"),
    # ~1,000 levels, under orjson's 1,024: each once ended in a RecursionError (a 500).
    ("tool parameters nested 1,000 deep",
     b'{"model": "specthink", "messages": [{"role": "user", "content": "hi"}], "tools": '
     b'[{"type": "function", "function": {"name": "f", "parameters": '
     + b'{"a": [' * 498 + b"1" + b"]}" * 498 + b"}}]}", "tools"),
    ("a json_schema nested 1,000 deep",
     b'{"model": "specthink", "messages": [{"role": "user", "content": "hi"}], '
     b'"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
     + b'{"properties": {"a": ' * 497 + b"{}" + b"}}" * 497 + b"}}}", "response_format"),
]


@pytest.mark.parametrize(("case", "body", "param"), BAD_REQUESTS,
                         ids=[case for case, _, _ in BAD_REQUESTS])
def test_bad_request_is_a_400_naming_the_field_before_any_upstream_request(
        fresh: Served, case: str, body: bytes | dict[str, Any], param: str | None) -> None:
    """Failing: the server forwards a request it cannot honour (or silently ignores a field)
    instead of answering 400 with the field in ``param``."""
    error = error_of(post(fresh, body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fresh.pair.requests() == 0, "a model server was asked"


def test_unknown_model_is_a_404(fresh: Served) -> None:
    error = error_of(post(fresh, {**OK, "model": "gpt-4o"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-4o" in error["message"] and "specthink" in error["message"]
    assert fresh.pair.requests() == 0


def test_unknown_path_and_method_are_error_objects(fresh: Served) -> None:
    error_of(httpx.get(f"{fresh.base_url}/completions", timeout=10), 404)
    error_of(httpx.get(f"{fresh.base_url}/chat/completions", timeout=10), 405)
    error_of(httpx.get(f"{fresh.base_url}/models/other", timeout=10), 404)


def test_body_over_the_limit_is_a_413(pair: Pair, serve: Callable[..., Served]) -> None:
    served = serve(pair, max_body_bytes=2048)
    pair.reset()
    big = {**OK, "messages": [{"role": "user", "content": "x" * 4096}]}
    assert error_of(post(served, big), 413)["code"] == "request_too_large"
    # Without a Content-Length (chunked), the limit holds while reading.
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "specthink", "messages": [{"role": "user", "content": "'
        yield b"x" * 4096
        yield b'"}]}'
    chunked = httpx.post(f"{served.base_url}/chat/completions", content=chunks(), timeout=30,
                         headers={"content-type": "application/json"})
    error_of(chunked, 413)
    assert pair.requests() == 0
    assert post(served, OK).status_code == 200


KEYS = ("key-one-7f3a", "key-two-91bc")


def test_api_keys_401_without_or_with_a_wrong_key_and_the_key_is_never_echoed(
        pair: Pair, serve: Callable[..., Served], caplog: pytest.LogCaptureFixture) -> None:
    """--api-key: every key is accepted, a missing or wrong one is a 401 before anything else
    (no upstream request), and no key appears in an answer or a log line."""
    served = serve(pair, api_keys=KEYS)
    pair.reset()
    caplog.set_level(logging.DEBUG)
    wrong = "key-one-7f3b"
    for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": KEYS[0]},
                    {"Authorization": f"Basic {KEYS[0]}"}):
        response = post(served, {**OK, "model": "nope"}, headers)
        error = error_of(response, 401)
        assert error["type"] == "authentication_error"
        assert wrong not in response.text and KEYS[0] not in response.text
        assert response.headers["www-authenticate"] == "Bearer"
    error_of(httpx.get(f"{served.base_url}/models", timeout=10), 401)
    assert pair.requests() == 0
    for key in KEYS:
        sdk = client(served, api_key=key)
        assert sdk.chat.completions.create(model="specthink", messages=HELLO).choices
        assert [m.id for m in sdk.models.list()] == ["specthink"]
    with pytest.raises(openai.AuthenticationError):
        client(served, api_key=wrong).models.list()
    # Probes and scrapers need no key.
    assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{served.url}/metrics", timeout=10).status_code == 200
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert not any(key in logged for key in (*KEYS, wrong))


@pytest.fixture
def slow_pair() -> Iterator[Pair]:
    with conversation_pair(LatencyModel(per_token=0.02)) as servers:
        yield servers


async def test_over_max_concurrency_is_a_429_without_an_upstream_request(
        slow_pair: Pair, serve: Callable[..., Served]) -> None:
    """--max-concurrency 1: while one stream runs, the next request is refused at once with
    429 and Retry-After; when the stream is done, requests are served again."""
    served = serve(slow_pair, max_concurrency=1)
    async with openai.AsyncOpenAI(base_url=served.base_url, api_key="x",
                                  max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(model="specthink", messages=HELLO,
                                                   stream=True)
        first = await anext(aiter(stream))
        assert first.choices[0].delta.role == "assistant"
        requests_before = slow_pair.requests()
        async with httpx.AsyncClient(timeout=30) as raw:
            response = await raw.post(f"{served.base_url}/chat/completions", json=OK)
        error = error_of(response, 429)
        assert error["type"] == "rate_limit_error"
        assert response.headers["retry-after"] == "1"
        assert slow_pair.requests() == requests_before
        async for _ in stream:
            pass
        # The finished request leaves the count just after its last byte: on a loaded machine
        # the next request can still meet it, so it is asked again (bounded) while refused.
        for _ in range(100):
            try:
                again = await sdk.chat.completions.create(model="specthink", messages=HELLO,
                                                          max_tokens=3)
                break
            except openai.RateLimitError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("still refused 5 s after the stream ended")
        assert again.choices[0].finish_reason == "length"


def test_small_server_down_is_a_503_naming_it(pair: Pair,
                                              serve: Callable[..., Served]) -> None:
    """The small server refuses connections: 503 that says it was the small model server, in
    whole answers and before a stream starts (a real status, not a 200 with an error)."""
    with LoopbackServer(ConversationModel()) as gone:
        url = gone.url
    served = serve(pair, small_url=url)
    for stream in (False, True):
        error = error_of(post(served, {**OK, "stream": stream}), 503)
        assert error["type"] == "upstream_unavailable" and error["code"] == "small_server_error"
        assert "small model server" in error["message"]


def test_target_down_with_raise_is_a_503_naming_it_and_fallback_answers(
        pair: Pair, serve: Callable[..., Served]) -> None:
    """on_target_error=raise: a target that is down is a 503 naming the target; the default
    (fallback) answers from the small model alone and says so in the statistics."""
    with LoopbackServer(ConversationModel()) as gone:
        url = gone.url
    raising = serve(pair, target_url=url, on_target_error="raise")
    error = error_of(post(raising, OK), 503)
    assert error["code"] == "target_server_error" and "target model server" in error["message"]
    falling_back = serve(pair, target_url=url)
    with pytest.warns(Warning):  # the engine warns that the small model continues alone
        answer = post(falling_back, OK)
    assert answer.status_code == 200
    assert answer.json()["specthink"]["fallback"] is True
    assert answer.json()["choices"][0]["message"]["content"] == "You said: hello there"


def test_small_server_failing_is_a_502_naming_it(fresh: Served) -> None:
    """A generation error inside the small server's stream before any text: 502 naming it."""
    fresh.pair.small.inject(Fault.error_event(error_type="generation", times=5))
    error = error_of(post(fresh, OK), 502)
    assert error["type"] == "upstream_error" and error["code"] == "small_server_error"
    assert "small model server" in error["message"]


def test_failure_after_the_stream_began_is_an_error_event_then_done(fresh: Served) -> None:
    """The status line is out: the failure arrives as an error event and [DONE]; the SDK
    raises APIError rather than ending quietly with a cut answer."""
    fresh.pair.small.inject(Fault.error_event(error_type="generation", after_tokens=3,
                                              times=5))
    with httpx.stream("POST", f"{fresh.base_url}/chat/completions",
                      json={**OK, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and "small model server" in lines[-2]
    fresh.pair.small.inject(Fault.error_event(error_type="generation", after_tokens=3,
                                              times=5))
    with pytest.raises(openai.APIError, match="small model server"):
        for _ in client(fresh).chat.completions.create(model="specthink", messages=HELLO,
                                                       stream=True):
            pass


class BrokenBackend(TGIBackend):
    """A backend with a bug: its stream raises an exception no one expects."""

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals /home/app/engine.py line 42")


def test_a_bug_is_a_500_with_a_reference_and_no_traceback(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected exception: 500 with a reference to the server log, never the traceback or
    the exception's text; the log has it."""
    settings = settings_for(pair)
    server = AppServer(create_app(settings, backends=(BrokenBackend(pair.small.url),
                                                      TGIBackend(pair.target.url)))).start()
    try:
        served = Served(server.url, pair, settings, None)  # type: ignore[arg-type]
        for stream in (False, True):
            response = post(served, {**OK, "stream": stream})
            error = error_of(response, 500)
            assert error["type"] == "server_error" and "reference" in error["message"]
            assert "secret" not in response.text and "engine.py" not in response.text
    finally:
        server.stop()
    assert any("secret internals" in str(record.exc_info) for record in caplog.records
               if record.exc_info)


URL_SECRET = "s3cr3t-in-the-url"


def test_model_server_url_secrets_never_reach_bodies_or_logs(
        pair: Pair, serve: Callable[..., Served], caplog: pytest.LogCaptureFixture) -> None:
    """A model-server URL with credentials and a query key: the 503 bodies (whole and before a
    stream), the fallback's statistics and every log line name the server with both redacted.
    Broken: ``http://user:secret@host/?key=secret`` is echoed to every client and the logs."""
    caplog.set_level(logging.DEBUG)
    pair.reset()  # faults other tests left
    with LoopbackServer(ConversationModel()) as gone:
        port = gone.url.rsplit(":", 1)[1]
    url = f"http://user:{URL_SECRET}@127.0.0.1:{port}/?key={URL_SECRET}"
    small_down = serve(pair, small_url=url)
    bodies = []
    for stream in (False, True):
        response = post(small_down, {**OK, "stream": stream})
        error = error_of(response, 503)
        assert f"http://***@127.0.0.1:{port}/?***" in error["message"]
        bodies.append(response.text)
    falling_back = serve(pair, target_url=url)
    with pytest.warns(Warning) as warned:
        answer = post(falling_back, OK)
    assert answer.status_code == 200 and answer.json()["specthink"]["fallback"] is True
    bodies.append(answer.text)
    logged = [record.getMessage() + str(record.exc_info) for record in caplog.records]
    assert logged and all(URL_SECRET not in text for text in [*bodies, *logged])
    assert all(URL_SECRET not in str(warning.message) for warning in warned)


def test_redact_url_hides_userinfo_and_query_and_backends_repr_uses_it() -> None:
    """Broken: ``repr`` of a backend, or a config error about its URL, shows the password."""
    from specthink.errors import redact_url

    url = f"https://me:{URL_SECRET}@models.example:8443/v1?api_key={URL_SECRET}#frag"
    assert redact_url(url) == "https://***@models.example:8443/v1?***"
    assert redact_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert URL_SECRET not in repr(TGIBackend(f"http://u:{URL_SECRET}@127.0.0.1:9"))
    with pytest.raises(ValueError) as refused:
        TGIBackend(f"ftp://u:{URL_SECRET}@127.0.0.1:9")
    assert URL_SECRET not in str(refused.value)


def test_a_client_hanging_up_mid_upload_is_a_499_without_a_traceback(
        pair: Pair, serve: Callable[..., Served], caplog: pytest.LogCaptureFixture) -> None:
    """A client that closes its connection halfway through the body is counted as 499 (nginx's
    "client closed request"), never as a 500 with a traceback. Broken: every hang-up looks
    like a server bug in the metrics and the logs."""
    pair.reset()  # faults other tests left
    served = serve(pair)
    host, port = served.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                         b'{"model": "specthink", "messages": [')

    def counted(status: str) -> float:
        value = served.metrics.registry.get_sample_value("specthink_serve_requests_total",
                                                         {"status": status})
        return value or 0.0

    def wait_until_counted(status: str, times: int) -> None:
        """A request is counted once its answer has gone out, so just after the client saw it."""
        for _ in range(300):
            if counted(status) >= times:
                return
            time.sleep(0.02)

    wait_until_counted("499", 3)
    assert counted("499") == 3
    assert post(served, OK).status_code == 200  # and it serves on
    wait_until_counted("200", 1)
    statuses = {sample.labels["status"]: sample.value
                for metric in served.metrics.requests.collect()
                for sample in metric.samples if sample.name.endswith("_total")}
    assert statuses["499"] == 3 and statuses["200"] >= 1, statuses
    assert not any(status.startswith("5") for status in statuses), statuses
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
