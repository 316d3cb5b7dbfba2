"""``specthink serve --backend`` and ``ServeSettings.backend``: every wire protocol the factory
knows, Ollama's serving a chat over loopback (``tests.ollama_support``), and a bad one refused
before anything starts."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from specthink.backends import kinds
from specthink.backends._factory import backend_class
from specthink.serve import ServeSettings, create_app
from specthink.serve import app as serve_app
from specthink.serve.app import build_backends
from specthink.serve.cli import register
from tests.ollama_support import ANSWER, MODELS, Ollama

from .conftest import AppServer

LOOPBACK = {"small_url": "http://127.0.0.1:1", "target_url": "http://127.0.0.1:2"}


@pytest.mark.parametrize("kind", kinds())
def test_every_kind_of_the_factory_is_a_backend(kind: str) -> None:
    """Broken: the settings keep their own list of protocols, so one that
    ``specthink.backends.create`` builds (``ollama``) is refused, or the wrong class is built."""
    small, target = build_backends(ServeSettings(**LOOPBACK, backend=kind))
    assert isinstance(small, backend_class(kind)) and isinstance(target, backend_class(kind))


def test_an_unknown_kind_names_the_valid_ones() -> None:
    """Broken: a typo in ``backend`` fails at the first request, or the error does not say
    which protocols there are."""
    with pytest.raises(ValidationError, match=f"unknown backend kind 'grpc'; choose one of "
                                              f"{', '.join(kinds())}"):
        ServeSettings(**LOOPBACK, backend="grpc")


def serve_command() -> typer.Typer:
    app = typer.Typer()
    register(app)
    app.command("other")(lambda: None)  # two commands: `serve` stays a subcommand
    return app


def test_the_command_takes_ollama_and_refuses_an_unknown_kind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: ``--backend ollama`` is a usage error, or a bad kind gets as far as serving."""
    import uvicorn

    built: list[ServeSettings] = []

    def recording(settings: ServeSettings, **options: Any) -> object:
        built.append(settings)
        return object()

    monkeypatch.setattr(serve_app, "create_app", recording)
    monkeypatch.setattr(uvicorn, "run", lambda *args, **options: None)
    runner = CliRunner()
    arguments = ["serve", "--small", LOOPBACK["small_url"], "--target", LOOPBACK["target_url"]]
    env = {"SPECTHINK_BACKEND": None, "SPECTHINK_SERVE_API_KEYS": None}

    accepted = runner.invoke(serve_command(), [*arguments, "--backend", "ollama",
                                               "--small-model", MODELS[0]], env=env)
    refused = runner.invoke(serve_command(), [*arguments, "--backend", "grpc"], env=env)

    assert accepted.exit_code == 0, accepted.output
    assert [(s.backend, s.small_model) for s in built] == [("ollama", MODELS[0])]
    assert refused.exit_code == 2
    assert f"choose one of {', '.join(kinds())}" in refused.output
    assert len(built) == 1


def test_a_chat_is_served_over_ollama(ollama: Ollama) -> None:
    """Broken: the app builds its backends with a fixed list of protocols, or the model names
    do not reach the servers."""
    settings = ServeSettings(small_url=ollama.url, target_url=ollama.url, backend="ollama",
                             small_model=MODELS[1], target_model=MODELS[0],
                             small_template="chatml", target_template="chatml")
    server = AppServer(create_app(settings)).start()
    try:
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
            "model": "specthink", "max_tokens": 16,
            "messages": [{"role": "user", "content": "Hi"}]})
    finally:
        server.stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == ANSWER
    assert ollama.models() == [MODELS[1]]
