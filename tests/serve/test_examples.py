"""examples/serve_openai.py and serve_agents.py run against the server on loopback, so they
cannot rot."""

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


def test_serve_agents_example(fresh: Served, example: Callable[[str], ModuleType],
                              capsys: pytest.CaptureFixture[str]) -> None:
    """examples/serve_agents.py: the Agents SDK's tool loop and a previous_response_id turn
    through the Responses API."""
    out = example("serve_agents").main(fresh.base_url, max_retries=0)
    assert out["agent"] == "The tool says: Sunny, 24 C in Paris"
    assert out["answer"] == "You said: hello there" and out["follow_up"] == "You said: thanks"
    assert "Wait, let me think" in out["reasoning"]
    assert "agent: The tool says" in capsys.readouterr().out
