"""An unknown rules preset is a ``ConfigError`` naming the presets on every surface, before any
request: the core's engine, request and settings, LangChain, LlamaIndex, ``specthink serve``
(settings, command, a request's ``specthink.rules``) and ``specthink ask``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from specthink import ChatRequest, SpeculativeThinker
from specthink.backends.tgi import TGIBackend
from specthink.errors import ConfigError
from specthink.rules import PRESETS
from specthink.settings import PairSettings
from specthink.testing.models import ScriptedModel
from specthink.testing.server import LoopbackServer

BOGUS = "bogus"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    model = ScriptedModel.single("Hello there.")
    with LoopbackServer(model) as small, LoopbackServer(model) as target:
        yield small, target


def _engine(small: str, target: str) -> Any:
    return SpeculativeThinker(small=TGIBackend(small), target=TGIBackend(target), rules=BOGUS)


def _request(small: str, target: str) -> Any:
    return ChatRequest.build([{"role": "user", "content": "Hi"}], rules=BOGUS)


def _settings(small: str, target: str) -> Any:
    return PairSettings(small_url=small, target_url=target, rules=BOGUS)


def _langchain(small: str, target: str) -> Any:
    from specthink_lc import ChatSpeculativeThinking

    return ChatSpeculativeThinking(small_url=small, target_url=target, rules=BOGUS)


def _llamaindex(small: str, target: str) -> Any:
    from specthink_li import SpeculativeThinkingLLM

    return SpeculativeThinkingLLM(small_url=small, target_url=target, rules=BOGUS)


def _serve_settings(small: str, target: str) -> Any:
    from specthink.serve.settings import ServeSettings

    return ServeSettings(small_url=small, target_url=target, rules=BOGUS)


SURFACES: dict[str, Callable[[str, str], Any]] = {
    "engine": _engine, "request": _request, "settings": _settings, "langchain": _langchain,
    "llamaindex": _llamaindex, "serve settings": _serve_settings}


@pytest.mark.parametrize("surface", SURFACES)
def test_an_unknown_preset_is_a_config_error_naming_the_presets(
        servers: tuple[LoopbackServer, LoopbackServer], surface: str) -> None:
    """Broken: a surface takes an unknown preset (or fails with a bare ValueError, as
    ``SpeculativeThinker(rules="bogus")`` did) instead of a ConfigError naming the presets
    and the field, or asks a server anything first."""
    small, target = servers
    with pytest.raises(ConfigError) as raised:
        SURFACES[surface](small.url, target.url)
    assert raised.value.field == "rules"
    assert all(name in str(raised.value) for name in PRESETS)
    assert small.calls == [] and target.calls == []


def test_the_environment_default_preset_is_checked_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: ``$SPECTHINK_RULES`` is not the default preset, or a bad one is not refused."""
    monkeypatch.setenv("SPECTHINK_RULES", "paper_instruct")
    assert PairSettings(small_url="http://a:1", target_url="http://b:1").rules == "paper_instruct"
    monkeypatch.setenv("SPECTHINK_RULES", BOGUS)
    with pytest.raises(ConfigError, match="paper_instruct"):
        PairSettings(small_url="http://a:1", target_url="http://b:1")


@pytest.mark.parametrize("command", ["ask", "serve"])
def test_the_commands_refuse_an_unknown_preset_before_any_request(
        servers: tuple[LoopbackServer, LoopbackServer], command: str) -> None:
    """Broken: ``specthink ask`` or ``specthink serve`` starts (asks a server) with an unknown
    preset instead of a usage error naming the presets."""
    from specthink.cli import app

    small, target = servers
    args = ["ask", "Hi"] if command == "ask" else ["serve"]
    result = CliRunner().invoke(app, [*args, "--small", small.url, "--target", target.url,
                                      "--rules", BOGUS], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert f"{BOGUS!r} is not a preset" in result.output and "paper_instruct" in result.output
    assert small.calls == [] and target.calls == []


def test_a_served_request_with_an_unknown_preset_is_a_400_naming_the_parameter(
        servers: tuple[LoopbackServer, LoopbackServer]) -> None:
    """Broken: a request's ``specthink.rules`` preset reaches the engine unchecked, or the 400
    does not name the parameter and the presets."""
    from starlette.testclient import TestClient

    from specthink.serve.app import create_app
    from specthink.serve.settings import ServeSettings

    small, target = servers
    settings = ServeSettings(small_url=small.url, target_url=target.url,
                             small_template="chatml", target_template="chatml")
    with TestClient(create_app(settings)) as client:
        small.reset()
        target.reset()
        response = client.post("/v1/chat/completions", json={
            "model": "specthink", "messages": [{"role": "user", "content": "Hi"}],
            "specthink": {"rules": BOGUS}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "specthink.rules" and "paper_instruct" in error["message"]
    assert small.calls == [] and target.calls == []


def test_an_unknown_backend_from_the_environment_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: ``$SPECTHINK_BACKEND`` is taken unchecked as the default protocol."""
    monkeypatch.setenv("SPECTHINK_BACKEND", "grpc")
    with pytest.raises(ConfigError, match="ollama, openai, tgi") as raised:
        PairSettings(small_url="http://a:1", target_url="http://b:1")
    assert raised.value.field == "backend"
