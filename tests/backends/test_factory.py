"""``specthink.backends.create`` and ``discover``: one options model for every protocol, bad
options refused before any request, and ``timeout`` meaning the read timeout everywhere."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from specthink import _constants
from specthink.backends import (
    BackendKind,
    BackendOptions,
    OpenAICompletionsBackend,
    SamplingParams,
    TGIBackend,
    create,
    discover,
    kind_of,
    kinds,
    takes_option,
)
from specthink.errors import BackendConnectionError, ConfigError
from specthink.testing import EchoModel, LoopbackServer
from tests.support import stream_tokens

Start = Callable[..., LoopbackServer]


def test_each_kind_builds_its_backend() -> None:
    """Broken: ``create`` builds the wrong protocol, or a kind is missing from the list."""
    assert {"tgi", "openai"} <= set(kinds())
    tgi = create("tgi", "http://127.0.0.1:1")
    openai = create("openai", "http://127.0.0.1:1", model="m")
    assert isinstance(tgi, TGIBackend) and kind_of(tgi) == "tgi"
    assert isinstance(openai, OpenAICompletionsBackend) and kind_of(openai) == "openai"
    assert openai.model == "m"


def test_an_unknown_kind_is_a_config_error_listing_the_kinds() -> None:
    """Broken: a typo in the kind fails late, or does not say what would be right."""
    with pytest.raises(ConfigError,
                       match=r"unknown backend kind 'vllm'; choose one of .*openai.*tgi"):
        create("vllm", "http://127.0.0.1:1")


def test_a_kind_field_takes_every_kind_and_names_them_for_another() -> None:
    """Broken: ``BackendKind`` (the adapters' and ``specthink serve``'s ``backend`` field) is a
    list of its own that lags the protocol modules, or its error does not say what is valid;
    or ``takes_option`` sends a model name to a protocol that refuses one."""
    from pydantic import BaseModel, ValidationError

    class Settings(BaseModel):
        backend: BackendKind

    assert [Settings(backend=kind).backend for kind in kinds()] == kinds()
    with pytest.raises(ValidationError, match=f"choose one of {', '.join(kinds())}"):
        Settings(backend="vllm")
    assert {kind: takes_option(kind, "model") for kind in kinds()} == {
        "ollama": True, "openai": True, "tgi": False}


@pytest.mark.parametrize(("options", "problem"), [
    ({"read_timeout": 0}, "read_timeout"),
    ({"connect_timeout": -1}, "connect_timeout"),
    ({"max_retries": -1}, "max_retries"),
    ({"timout": 3}, "timout"),
    ({"headers": {"Bad Name": "x"}}, "Bad Name"),
    ({"routing_headers": "X-Session-ID"}, "routing_headers"),
])
def test_bad_options_are_a_config_error_before_any_request(options: dict[str, Any],
                                                            problem: str) -> None:
    """Broken: a misspelt or out-of-range option is silently ignored or fails mid-request."""
    with pytest.raises(ConfigError, match=problem):
        create("tgi", "http://127.0.0.1:1", **options)


def test_a_model_name_for_tgi_is_refused() -> None:
    """Broken: ``model`` given to a TGI backend is silently dropped (the user expected it to
    select something)."""
    with pytest.raises(ConfigError, match="tgi backend takes no 'model'"):
        create("tgi", "http://127.0.0.1:1", model="m")


@pytest.mark.parametrize("kind", ["tgi", "openai", "ollama"])
def test_every_option_reaches_each_backend_and_a_misspelt_one_is_refused(kind: str) -> None:
    """Broken: the options the factory validates and the ones a backend's constructor takes
    (one ``HTTPOptions`` for every protocol) have drifted apart, so ``create`` refuses a
    documented option; or a backend built directly drops a misspelt keyword silently."""
    from specthink.backends._factory import backend_class

    every = {name: getattr(BackendOptions(), name) for name in BackendOptions.model_fields}
    every["model"] = "m"
    if kind == "tgi":
        del every["model"]
    backend = create(kind, "http://127.0.0.1:1", **every)
    assert isinstance(backend, backend_class(kind))
    with pytest.raises(TypeError, match="unexpected keyword argument 'timout'"):
        backend_class(kind)("http://127.0.0.1:1", timout=3)


def test_the_api_key_is_a_secret_in_the_options_and_the_backend(
        caplog: pytest.LogCaptureFixture) -> None:
    """Broken: the options model or the backend prints the key."""
    options = BackendOptions(api_key="sk-very-secret")
    backend = create("openai", "http://127.0.0.1:1", api_key="sk-very-secret")
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("%r %r %s", options, backend, options)
    assert "sk-very-secret" not in repr(options) + repr(backend) + caplog.text
    assert "api_key=***" in repr(backend)


@pytest.mark.parametrize("kind", ["tgi", "openai"])
async def test_extra_headers_go_with_every_request(kind: str, loopback_server: Start) -> None:
    """Broken: ``headers`` (a gateway's tenant header, say) is not sent, or not on /info."""
    server = loopback_server(EchoModel())
    backend = create(kind, server.url, headers={"X-Tenant": "team-a"})
    await stream_tokens(backend, "Hello there", max_new_tokens=4)
    assert server.calls
    assert all(call.headers.get("x-tenant") == "team-a" for call in server.calls)


async def test_a_passed_in_client_is_used_and_left_open(loopback_server: Start) -> None:
    """Broken: ``client`` is ignored, or closed under its owner's feet."""
    server = loopback_server(EchoModel(), model_id="test/m")
    sent: list[str] = []

    async def log(request: httpx.Request) -> None:
        sent.append(request.url.path)

    async with httpx.AsyncClient(event_hooks={"request": [log]}) as client:
        backend = create("tgi", server.url, client=client)
        assert (await backend.info()).model_id == "test/m"
        await backend.aclose()
        assert sent == ["/info"] and not client.is_closed


def test_timeout_means_the_read_timeout_everywhere() -> None:
    """Broken: ``timeout`` bounds connecting in one place and the gap between bytes in another
    (the backends' ``timeout=``, the factory, LangChain's ``timeout``/``request_timeout`` and
    LlamaIndex's ``timeout`` must all be the read timeout, with the connect default kept)."""
    from specthink_lc import ChatSpeculativeThinking
    from specthink_li import SpeculativeThinkingLLM

    url = "http://127.0.0.1:1"
    expected = (_constants.DEFAULT_CONNECT_TIMEOUT, 7.0, None)
    built = [
        TGIBackend(url, timeout=7.0),
        OpenAICompletionsBackend(url, timeout=7.0),
        create("tgi", url, read_timeout=7.0),
        create("openai", url, read_timeout=7.0),
        *ChatSpeculativeThinking(small_url=url, target_url=url, timeout=7.0)._build_backends(),
        *ChatSpeculativeThinking(small_url=url, target_url=url,
                                 request_timeout=7.0)._build_backends(),
    ]
    llm = SpeculativeThinkingLLM(small_url=url, target_url=url, timeout=7.0)
    built += [llm.thinker.small, llm.thinker.target]
    for backend in built:
        timeout = backend.timeout  # type: ignore[attr-defined]
        assert (timeout.connect, timeout.read, timeout.pool) == expected, backend


async def test_discover_finds_tgi_and_keeps_its_info(loopback_server: Start) -> None:
    """Broken: detection costs a second /info later, or takes TGI for an OpenAI server."""
    server = loopback_server(EchoModel(), model_id="test/tgi")
    backend = await discover(server.url, model="ignored-for-tgi")
    try:
        assert isinstance(backend, TGIBackend)
        assert (await backend.info()).model_id == "test/tgi"
    finally:
        await backend.aclose()
    assert len(server.calls_to("/info")) == 1


async def test_discover_takes_a_server_without_tgi_info_for_openai() -> None:
    """Broken: a vLLM or llama.cpp server (404 on /info) is not recognised as OpenAI."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "qwen"}]})
        return httpx.Response(404, json={"detail": "Not Found"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        backend = await discover("http://vllm.test", client=client, model="qwen")
        assert isinstance(backend, OpenAICompletionsBackend)
        assert backend.model == "qwen"


async def test_discover_of_a_server_that_is_down_says_so(unused_tcp_port: int) -> None:
    """Broken: a refused connection is taken for "not TGI" and the error surfaces later, as a
    confusing OpenAI one."""
    with pytest.raises(BackendConnectionError, match="cannot reach the server"):
        await discover(f"http://127.0.0.1:{unused_tcp_port}", max_retries=0)


@pytest.mark.parametrize("transport", ["lean", "httpx"])
async def test_both_transports_carry_a_stream(transport: str, loopback_server: Start) -> None:
    """Broken: ``transport="httpx"`` (the documented alternative to the lean transport) is
    ignored, or one of the two cannot stream."""
    from specthink.backends._transport import LeanTransport

    server = loopback_server(EchoModel())
    backend = create("tgi", server.url, transport=transport)
    try:
        async with backend.stream("Hello there", max_new_tokens=4,
                                  sampling=SamplingParams()) as tokens:
            assert [token async for token in tokens]
        [client] = backend._conn.clients()  # type: ignore[attr-defined]
        assert isinstance(client._transport, LeanTransport) is (transport == "lean")
    finally:
        await backend.aclose()


def test_an_unknown_transport_is_a_config_error() -> None:
    """Broken: a misspelt transport silently falls back to the default."""
    with pytest.raises(ConfigError, match="transport"):
        create("tgi", "http://127.0.0.1:1", transport="h2")
