"""Fixtures shared by the whole suite: TGI-protocol servers and an Ollama server on loopback
(real sockets), stopped when the test ends."""

from __future__ import annotations

import importlib.util
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from specthink.testing import EchoModel, LoopbackServer, TextModel
from tests.support import ServerPair


@pytest.fixture
def loopback_server() -> Iterator[Callable[..., LoopbackServer]]:
    """Start a :class:`LoopbackServer`: ``loopback_server(model, **options)``; EchoModel if no
    model is given."""
    started: list[LoopbackServer] = []

    def start(model: TextModel | None = None, **options: Any) -> LoopbackServer:
        server = LoopbackServer(model or EchoModel(), **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def loopback_pair(loopback_server: Callable[..., LoopbackServer]) -> Callable[..., ServerPair]:
    """Start a small and a target server: ``loopback_pair(small_model, target_model, **options)``
    (options apply to both; ``model_id`` defaults to "test/small" and "test/target")."""

    def start(small_model: TextModel | None = None, target_model: TextModel | None = None,
              **options: Any) -> ServerPair:
        small = loopback_server(small_model, **{"model_id": "test/small", **options})
        target = loopback_server(target_model, **{"model_id": "test/target", **options})
        return ServerPair(small, target)

    return start


@pytest.fixture
def ollama() -> Iterator[Any]:
    """A :class:`tests.ollama_support.Ollama` server on loopback (it needs the ``server``
    extra's starlette and uvicorn, imported only by the tests that use it)."""
    from tests.ollama_support import ollama_server

    with ollama_server() as state:
        yield state


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts TCP connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="session")
def example() -> Callable[[str], ModuleType]:
    """Import ``examples/<name>.py`` (the folder is not a package), for smoke tests that run
    each example's ``main`` against loopback servers so the examples cannot rot."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def example_urls(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """URLs of two loopback servers, small and target, both serving the module's ``MODEL``."""
    model = request.module.MODEL
    with LoopbackServer(model, model_id="test/small") as small, \
            LoopbackServer(model, model_id="test/target") as target:
        yield small.url, target.url
