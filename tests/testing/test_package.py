"""``specthink.testing`` serves the models without the ``testing`` extra, and says what to
install when the server is asked for without it."""

from __future__ import annotations

import sys

import pytest

import specthink.testing
from specthink.testing import server


def test_server_names_are_the_server_modules() -> None:
    assert specthink.testing.LoopbackServer is server.LoopbackServer
    assert specthink.testing.Fault is server.Fault
    assert set(specthink.testing.__all__) >= {"LoopbackServer", "ScriptedModel", "Tokenizer"}


def test_server_without_the_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "specthink.testing.server")
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ImportError, match=r"pip install 'specthink\[testing\]'"):
        _ = specthink.testing.LoopbackServer
    assert specthink.testing.ScriptedModel.single("x").continuation("").text == "x"


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = specthink.testing.Nope  # type: ignore[attr-defined]
