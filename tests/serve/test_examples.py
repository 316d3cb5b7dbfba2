"""examples/serve_openai.py runs against the server on loopback, so it cannot rot."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest

from .conftest import Served


def test_serve_openai_example(fresh: Served, example: Callable[[str], ModuleType],
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = example("serve_openai").main(fresh.base_url, "hello there", max_retries=0)
    assert out["answer"] == out["streamed"] == "You said: hello there"
    assert "Wait, let me think" in out["reasoning"] and out["stats"]["target_tokens"] > 0
    printed = capsys.readouterr().out
    assert "answer: You said: hello there" in printed and "target share" in printed
