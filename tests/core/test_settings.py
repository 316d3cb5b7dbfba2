"""``PairSettings``: the pair's settings declared once, with environment defaults, building the
engine."""

from __future__ import annotations

import json

import pytest

from specthink import SpeculativeThinker, TakeoverRules
from specthink.backends.openai import OpenAICompletionsBackend
from specthink.backends.tgi import TGIBackend
from specthink.errors import ConfigError
from specthink.settings import PairSettings, SettingsError

URLS = {"small_url": "http://127.0.0.1:9", "target_url": "http://127.0.0.1:10"}


def test_the_environment_fills_what_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: a ``SPECTHINK_*`` variable is not the default of its setting."""
    monkeypatch.setenv("SPECTHINK_SMALL_URL", "http://small.env:1")
    monkeypatch.setenv("SPECTHINK_TARGET_URL", "http://target.env:2")
    monkeypatch.setenv("SPECTHINK_BACKEND", "openai")
    monkeypatch.setenv("SPECTHINK_SMALL_MODEL", "Qwen/Qwen3-1.7B")
    monkeypatch.setenv("SPECTHINK_TARGET_MODEL", "Qwen/Qwen3-32B")
    monkeypatch.setenv("SPECTHINK_API_KEY", "sk-env")
    settings = PairSettings()
    assert (settings.small_url, settings.target_url, settings.backend) == (
        "http://small.env:1", "http://target.env:2", "openai")
    assert (settings.small_model, settings.target_model) == ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-32B")
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "sk-env"
    assert PairSettings(small_url="http://given:3").small_url == "http://given:3"


def test_a_missing_url_names_the_setting_and_its_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: a missing URL is not a ConfigError saying where to set it."""
    monkeypatch.delenv("SPECTHINK_TARGET_URL", raising=False)
    with pytest.raises(ConfigError, match=r"target_url= \(or \$SPECTHINK_TARGET_URL\)") as raised:
        PairSettings(small_url="http://a:1")
    assert raised.value.field == "target_url"


async def test_build_makes_the_engine_the_settings_describe() -> None:
    """Broken: ``build()`` drops a setting on the way to the backends or the engine (the read
    timeout, retries, key, routing headers, rules, templates, on_target_error), or sends a
    model name to a protocol that takes none."""
    settings = PairSettings(**URLS, backend="tgi", small_model="ignored-by-tgi",
                            rules="paper_instruct", small_template="chatml",
                            on_target_error="raise", api_key="sk-secret", timeout=7.0,
                            max_retries=0, routing_headers=("X-Conversation",))
    thinker = settings.build()
    try:
        assert isinstance(thinker, SpeculativeThinker)
        assert isinstance(thinker.small, TGIBackend) and isinstance(thinker.target, TGIBackend)
        assert thinker.rules == TakeoverRules.paper_instruct()
        assert thinker.on_target_error == "raise"
        assert thinker.small_template == "chatml" and thinker.target_template == "auto"
        for backend in (thinker.small, thinker.target):
            assert backend.timeout.read == 7.0
            assert backend.routing_headers == ("X-Conversation",)
            assert "api_key=***" in repr(backend)
    finally:
        await thinker.aclose()
    openai = PairSettings(**URLS, backend="openai", small_model="s", target_model="t",
                          response_template="think-hermes").build()
    try:
        assert isinstance(openai.small, OpenAICompletionsBackend)
        assert isinstance(openai.target, OpenAICompletionsBackend)
        assert (openai.small.model, openai.target.model) == ("s", "t")
    finally:
        await openai.aclose()


def test_the_key_is_never_shown_or_serialised() -> None:
    """Broken: the API key reaches ``repr`` or a serialised form (LlamaIndex's callbacks log
    ``to_dict()``; ``specthink serve`` hands settings to workers as JSON)."""
    settings = PairSettings(**URLS, api_key="sk-very-secret")
    for text in (repr(settings), str(settings.model_dump()), settings.model_dump_json()):
        assert "sk-very-secret" not in text


def test_rules_survive_a_json_round_trip() -> None:
    """Broken: settings with ``TakeoverRules`` (not a preset name) cannot be handed to a worker
    process as JSON and read back."""
    rules = TakeoverRules.paper().model_copy(update={"n1": 7})
    settings = PairSettings(**URLS, rules=rules)
    again = PairSettings(**json.loads(settings.model_dump_json()))
    assert again.rules == rules
    assert PairSettings(**URLS, rules="paper").model_dump()["rules"] == "paper"


async def test_settings_for_some_roles_need_only_their_urls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: settings for one model alone (``specthink eval --mode small``) still demand the
    other role's URL, or building that role's backend does not say which URL is missing, or a
    needed URL is no longer required."""
    monkeypatch.delenv("SPECTHINK_SMALL_URL", raising=False)
    monkeypatch.delenv("SPECTHINK_TARGET_URL", raising=False)
    alone = PairSettings.for_roles(["small"], small_url=URLS["small_url"], rules="paper_instruct")
    assert alone.rules == "paper_instruct"
    backend = alone.build_backend("small")
    try:
        assert isinstance(backend, TGIBackend) and backend.url == URLS["small_url"]
    finally:
        await backend.aclose()
    with pytest.raises(ConfigError, match="target_url") as raised:
        alone.build_backend("target")
    assert raised.value.field == "target_url"
    with pytest.raises(ConfigError, match=r"small_url= \(or \$SPECTHINK_SMALL_URL\)") as missing:
        PairSettings.for_roles(["small"], target_url=URLS["target_url"])
    assert missing.value.field == "small_url"
    # What the commands print: the core's message alone, not pydantic's report around it.
    assert isinstance(missing.value, SettingsError)
    assert missing.value.reason == "no small_url: pass small_url= (or $SPECTHINK_SMALL_URL)"
    with pytest.raises(ConfigError, match="paper_instruct") as bad:
        PairSettings.for_roles(["small"], small_url=URLS["small_url"], rules="bogus")
    assert bad.value.field == "rules"


async def test_detect_backend_asks_the_server_with_the_settings_options() -> None:
    """Broken: ``--backend auto`` (``detect_backend``) does not pick TGI for a server whose
    ``/info`` names a model, or drops the settings' key or timeout on the way."""
    from specthink.testing.models import ScriptedModel
    from specthink.testing.server import LoopbackServer

    with LoopbackServer(ScriptedModel.single("Hi.")) as server:
        settings = PairSettings.for_roles(["target"], target_url=server.url, backend="openai",
                                          api_key="sk-secret", timeout=7.0)
        backend = await settings.detect_backend("target")
        try:
            assert isinstance(backend, TGIBackend)
            assert backend.timeout.read == 7.0 and "api_key=***" in repr(backend)
        finally:
            await backend.aclose()
        assert [call.path for call in server.calls] == ["/info"]
