"""What both HTTP backends send and cache, read from the loopback server's own records: the
routing key on every attempt of a stream, ``/info`` fetched once per backend, and length-limit
errors told apart from other validation errors."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from specthink import SpeculativeThinker
from specthink.backends import OpenAICompletionsBackend, SamplingParams, TGIBackend
from specthink.backends._httpbackend import HTTPBackend, routing_header_value
from specthink.errors import (
    BackendConnectionError,
    ConfigError,
    ContextLimitError,
    InStreamContextLimitError,
    InStreamError,
    RequestValidationError,
    error_from_response,
)
from specthink.testing import EchoModel, LoopbackServer
from specthink.testing.server import Fault

GREEDY = SamplingParams()
Start = Callable[..., LoopbackServer]
Make = Callable[..., HTTPBackend[Any]]

PATHS = {TGIBackend: "/generate_stream", OpenAICompletionsBackend: "/v1/completions"}
INFO_PATHS = {TGIBackend: "/info", OpenAICompletionsBackend: "/v1/models"}


@pytest.fixture(params=[TGIBackend, OpenAICompletionsBackend], ids=["tgi", "openai"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    cls: type[HTTPBackend[Any]] = request.param
    made: list[HTTPBackend[Any]] = []

    def build(server: LoopbackServer, **options: Any) -> HTTPBackend[Any]:
        options.setdefault("retry_backoff", 0.0)
        backend = cls(server.url, **options)
        made.append(backend)
        return backend

    yield build
    for backend in made:
        await backend.aclose()


async def collect(backend: HTTPBackend[Any], prompt: str = "Hello there", **options: Any) -> str:
    async with backend.stream(prompt, max_new_tokens=8, sampling=GREEDY, **options) as tokens:
        return "".join([token.text async for token in tokens])


def generation_records(server: LoopbackServer, backend: HTTPBackend[Any]) -> list[Any]:
    return [r for r in server.records if r.path == PATHS[type(backend)]]


# ---- the routing key ------------------------------------------------------------------------

async def test_the_routing_key_is_on_every_attempt_including_a_retry(
        make: Make, loopback_server: Start) -> None:
    """Broken: a retried request loses the routing key and a router may send it to a cold
    replica."""
    server = loopback_server(EchoModel())
    backend = make(server)
    server.inject(Fault.status(503))
    await collect(backend, routing_key="conv-1")
    records = generation_records(server, backend)
    assert [r.status for r in records] == [503, 200]
    assert [r.headers.get("x-session-id") for r in records] == ["conv-1", "conv-1"]


async def test_custom_routing_headers_all_carry_the_key(make: Make,
                                                        loopback_server: Start) -> None:
    """Broken: ``routing_headers`` is ignored, so ``smg --routing-key-headers`` sees nothing."""
    server = loopback_server(EchoModel())
    backend = make(server, routing_headers=("X-SMG-Routing-Key", "X-Session-ID"))
    await collect(backend, routing_key="conv-2")
    (record,) = generation_records(server, backend)
    assert record.headers["x-smg-routing-key"] == "conv-2"
    assert record.headers["x-session-id"] == "conv-2"


async def test_no_routing_header_without_a_key(make: Make, loopback_server: Start) -> None:
    """Broken: a request without a key carries an empty or stale routing header."""
    server = loopback_server(EchoModel())
    backend = make(server)
    await collect(backend, routing_key="first")
    await collect(backend)
    records = generation_records(server, backend)
    assert "x-session-id" in records[0].headers
    assert "x-session-id" not in records[1].headers


async def test_no_header_at_all_with_empty_routing_headers(make: Make,
                                                           loopback_server: Start) -> None:
    """Broken: ``routing_headers=()`` does not switch the headers off."""
    server = loopback_server(EchoModel())
    backend = make(server, routing_headers=())
    await collect(backend, routing_key="conv-3")
    (record,) = generation_records(server, backend)
    assert "conv-3" not in record.headers.values()


@pytest.mark.parametrize("names", ["X-Session-ID", ("X Session",), ("",), (7,)])
def test_bad_routing_headers_are_a_config_error(names: Any) -> None:
    """Broken: a bare string (which would be read letter by letter) or an invalid header name
    fails only at the first request, or not at all."""
    with pytest.raises(ConfigError, match="routing_headers"):
        TGIBackend("http://127.0.0.1:1", routing_headers=names)


async def test_an_empty_routing_key_is_refused_before_any_request() -> None:
    """Broken: an empty key is sent as a blank header."""
    key = ""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    backend = TGIBackend("http://tgi.test", client=client)
    with pytest.raises(ConfigError, match="routing_key"):
        await collect(backend, routing_key=key)
    assert sent == []
    await client.aclose()


ODD_KEYS = {"non-ascii": "utilisateur-é-中文-🙂", "100 KB": "k" * 100_000,
            "line break": "a\r\nX-Evil: 1", "space and percent": "user 7 %41",
            "posing as a hash": "sha256-0123"}


@pytest.mark.parametrize("key", list(ODD_KEYS.values()), ids=list(ODD_KEYS))
async def test_any_routing_key_is_sent_as_a_safe_stable_header(
        make: Make, loopback_server: Start, key: str) -> None:
    """Any string works as a routing key: it reaches the server as a short ASCII header value
    (the same one on every request, so a router's stickiness holds), never raw. Broken: a
    non-ASCII key is a UnicodeEncodeError (a 500 in serve), a 100 KB one a 502 from a router,
    a line break injects a header."""
    server = loopback_server()
    backend = make(server)
    await collect(backend, routing_key=key)
    await collect(backend, routing_key=key)
    await collect(backend, routing_key=key + "x")
    values = [r.headers["x-session-id"] for r in generation_records(server, backend)]
    assert values[0] == values[1] != values[2]
    assert values[0] == routing_header_value(key)
    assert re.fullmatch(r"sha256-[0-9a-f]{32}", values[0])
    assert all("x-evil" not in r.headers for r in server.records)


def test_plain_routing_keys_are_sent_unchanged() -> None:
    """Broken: session ids a router or a log shows (uuids, ``conv-42``) become opaque hashes."""
    for key in ("conv-42", uuid.uuid4().hex, "user@example.com", "a" * 128):
        assert routing_header_value(key) == key
    assert routing_header_value("a" * 129).startswith("sha256-")


# ---- /info, cached -------------------------------------------------------------------------

async def test_info_is_fetched_once_by_many_concurrent_first_callers(
        make: Make, loopback_server: Start) -> None:
    """Broken: every conversation of a burst asks /info (a thundering herd of round trips
    before the first token)."""
    server = loopback_server(EchoModel(), model_id="test/model")
    backend = make(server)
    infos = await asyncio.gather(*(backend.info() for _ in range(64)))
    assert {info.model_id for info in infos} == {"test/model"}
    assert len(server.calls_to(INFO_PATHS[type(backend)])) == 1


async def test_info_refresh_asks_the_server_again(make: Make, loopback_server: Start) -> None:
    """Broken: ``info(refresh=True)`` returns the stale cache, so a changed limit is never
    learned."""
    server = loopback_server(EchoModel(), max_input_tokens=100, max_total_tokens=200)
    backend = make(server)
    await backend.info()
    server.max_total_tokens = 300
    assert (await backend.info()).max_total_tokens in (200, None)
    refreshed = await backend.info(refresh=True)
    assert len(server.calls_to(INFO_PATHS[type(backend)])) == 2
    if isinstance(backend, TGIBackend):
        assert refreshed.max_total_tokens == 300
    assert await backend.info() is refreshed


async def test_info_once_per_backend_across_many_concurrent_conversations(
        loopback_server: Start) -> None:
    """Broken: each conversation fetches /info on its own (issue 17's first-token latency)."""
    small = loopback_server(EchoModel(), model_id="test/small")
    target = loopback_server(EchoModel(), model_id="test/target")
    thinker = SpeculativeThinker(small=TGIBackend(small.url), target=TGIBackend(target.url),
                                 small_template="chatml", target_template="chatml")
    try:
        questions = [[{"role": "user", "content": f"Question {n}?"}] for n in range(32)]
        await asyncio.gather(*(thinker.agenerate(q, max_new_tokens=8) for q in questions))
    finally:
        await thinker.aclose()
    assert len([r for r in small.records if r.path == "/generate_stream"]) >= 32
    for server in (small, target):
        assert len(server.calls_to("/info")) == 1


async def test_a_cancelled_first_caller_does_not_cancel_the_shared_fetch() -> None:
    """Broken: cancelling the conversation that started the /info request fails every other
    conversation waiting for it."""
    release = asyncio.Event()
    asked = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal asked
        asked += 1
        await release.wait()
        return httpx.Response(200, json={"model_id": "m", "max_total_tokens": 10})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    backend = TGIBackend("http://tgi.test", client=client)
    first = asyncio.ensure_future(backend.info())
    second = asyncio.ensure_future(backend.info())
    await asyncio.sleep(0.01)
    first.cancel()
    release.set()
    assert (await second).model_id == "m"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert asked == 1
    await client.aclose()


async def test_a_refused_connection_forgets_the_cached_info() -> None:
    """Broken: after the server went away (and may come back with other limits) the old
    /info is used for ever."""
    asked = {"/info": 0}
    refuse = True

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/info":
            asked["/info"] += 1
            return httpx.Response(200, json={"model_id": "m"})
        if refuse:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(500)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    backend = TGIBackend("http://tgi.test", client=client, max_retries=0)
    await backend.info()
    await backend.info()
    assert asked["/info"] == 1
    with pytest.raises(BackendConnectionError):
        await collect(backend)
    await backend.info()
    assert asked["/info"] == 2
    await client.aclose()


# ---- length limits ---------------------------------------------------------------------------

async def test_a_prompt_over_the_servers_limit_is_a_context_limit_error(
        make: Make, loopback_server: Start) -> None:
    """Broken: the engine cannot tell "the limits changed" from any other validation error,
    so it never refreshes /info and retries."""
    server = loopback_server(EchoModel(), max_input_tokens=3, max_total_tokens=100)
    backend = make(server)
    with pytest.raises(ContextLimitError) as raised:
        await collect(backend, "a prompt of many more than three tokens")
    # TGI reports it inside the 200 stream: it stays a InStreamError as before.
    assert isinstance(raised.value, InStreamContextLimitError)
    assert isinstance(raised.value, InStreamError)
    assert raised.value.error_type == "validation"
    assert raised.value.tokens_received == 0
    assert "[in-stream validation]" in str(raised.value)


async def test_other_validation_errors_are_not_context_limits(make: Make,
                                                              loopback_server: Start) -> None:
    """Broken: every validation error triggers a refresh-and-retry."""
    server = loopback_server(EchoModel())
    backend = make(server)
    with pytest.raises(InStreamError) as raised:
        await collect(backend, "")
    assert not isinstance(raised.value, ContextLimitError)


@pytest.mark.parametrize(("status", "payload"), [
    (422, {"error": "Input validation error: `inputs` must have less than 5 tokens. Given: 9",
           "error_type": "validation"}),
    (422, {"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 20. "
                    "Given: 9 `inputs` tokens and 16 `max_new_tokens`",
           "error_type": "validation"}),
    (400, {"object": "error", "type": "BadRequestError", "code": 400,
           "message": "This model's maximum context length is 4096 tokens. However, you "
                      "requested 5000 tokens"}),
    (400, {"error": {"message": "The decoder prompt (length 5000) is longer than the maximum "
                                "model length of 4096.", "type": "BadRequestError"}}),
    (400, {"error": {"message": "the request exceeds the available context size, try "
                                "increasing it", "type": "exceed_context_size_error"}}),
])
def test_length_limit_answers_map_to_context_limit_error(status: int,
                                                         payload: dict[str, Any]) -> None:
    """Broken: a server's "too long" answer is not recognised (TGI, vLLM, llama.cpp)."""
    error = error_from_response(status, payload, url="http://x")
    assert isinstance(error, ContextLimitError)
    assert isinstance(error, RequestValidationError)
    assert error.status_code == status


def test_a_422_about_something_else_stays_a_plain_validation_error() -> None:
    """Broken: any 422 looks like a limit change."""
    error = error_from_response(422, {"error": "`top_p` must be > 0.0",
                                      "error_type": "validation"})
    assert type(error) is RequestValidationError
    assert not isinstance(error_from_response(500, {"error": "maximum context length"}),
                          ContextLimitError)


async def test_the_servers_records_never_keep_the_api_key(make: Make,
                                                          loopback_server: Start) -> None:
    """Broken: a test that prints the server's records leaks the API key."""
    server = loopback_server(EchoModel())
    backend = make(server, api_key="sk-secret-value")
    await collect(backend, routing_key="conv-4")
    records = generation_records(server, backend)
    assert records and all("authorization" not in r.headers for r in records)
    assert all("sk-secret-value" not in str(call) for call in server.calls)
