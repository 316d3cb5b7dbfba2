"""The Responses store (bounded by count and bytes, with a TTL), the setting that sizes or
turns it off (CLI option, environment, worker processes), and the translation of input items
into the chat request: an assistant turn's reasoning, text and calls kept together."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import typer
import uvicorn
from typer.testing import CliRunner

from specthink.serve import app as serve_app
from specthink.serve.cli import register
from specthink.serve.responses import messages_from_items
from specthink.serve.settings import ServeSettings
from specthink.serve.store import ResponseStore

from .conftest import Pair, Served, client


def response(number: int, text: str = "x") -> dict[str, Any]:
    return {"id": f"resp_{number}", "output": [{"type": "message", "role": "assistant",
                                                "content": [{"type": "output_text",
                                                             "text": text}]}]}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_store_keeps_the_newest_within_its_count_and_ttl() -> None:
    """Oldest out first past the count; an entry read after its TTL is gone. Failing: the
    store grows without bound, or serves a response past its lifetime."""
    clock = Clock()
    store = ResponseStore(2, ttl=10, clock=clock)
    for number in range(3):
        store.put(response(number), [{"role": "user", "content": f"q{number}"}])
    assert store.get("resp_0") is None and len(store) == 2
    kept = store.get("resp_2")
    assert kept is not None
    assert kept.conversation() == [{"role": "user", "content": "q2"}, *response(2)["output"]]
    clock.now += 10
    assert store.get("resp_1") is None and store.get("resp_2") is None and len(store) == 0


def test_store_byte_budget_and_delete() -> None:
    """The byte budget evicts the oldest, an entry larger than it is not kept; delete says
    whether it held the id."""
    store = ResponseStore(100, ttl=60, max_bytes=600)  # two entries of ~270 bytes
    store.put(response(1, "a" * 150), [])
    store.put(response(2, "b" * 150), [])
    store.put(response(3, "c" * 150), [])
    assert [store.get(f"resp_{n}") is not None for n in (1, 2, 3)] == [False, True, True]
    store.put(response(4, "d" * 700), [])
    assert store.get("resp_4") is None
    assert store.delete("resp_2") is True and store.delete("resp_2") is False
    assert ResponseStore(0, ttl=60).enabled is False


def test_a_reader_gets_its_own_copy() -> None:
    store = ResponseStore(4, ttl=60)
    store.put(response(1), [])
    first = store.get("resp_1")
    assert first is not None
    first.response["output"].clear()
    again = store.get("resp_1")
    assert again is not None and again.response["output"]


def serve_command() -> typer.Typer:
    app = typer.Typer()
    register(app)
    app.command("other")(lambda: None)
    return app


def test_store_options_reach_the_settings_and_the_workers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--responses-store / SPECTHINK_SERVE_RESPONSES_STORE and --responses-ttl reach the
    settings, and through the environment every --workers process."""
    built: list[ServeSettings] = []
    monkeypatch.setattr(serve_app, "create_app",
                        lambda settings, **options: built.append(settings) or object())
    monkeypatch.setattr(uvicorn, "run", lambda *args, **options: None)
    arguments = ["serve", "--small", "http://127.0.0.1:1", "--target", "http://127.0.0.1:2"]
    runner = CliRunner()
    env = {"SPECTHINK_SERVE_API_KEYS": None, "SPECTHINK_SERVE_RESPONSES_STORE": "0"}
    assert runner.invoke(serve_command(), arguments, env=env).exit_code == 0
    result = runner.invoke(serve_command(), [*arguments, "--responses-store", "7",
                                             "--responses-ttl", "30"], env=env)
    assert result.exit_code == 0, result.output
    assert [(s.responses_store, s.responses_ttl) for s in built] == [(0, 3600.0), (7, 30.0)]
    for name, value in built[1].to_environment().items():
        monkeypatch.setenv(name, value)
    assert ServeSettings.from_environment().responses_store == 7


def test_items_become_chat_turns() -> None:
    """reasoning + message + function_calls are one assistant turn (the reasoning as its
    reasoning_content), each output a tool message; developer is system."""
    messages = messages_from_items([
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "s"}],
         "content": [{"type": "reasoning_text", "text": "Call both."}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "b", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "A"},
        {"type": "function_call_output", "call_id": "c2", "output": [
            {"type": "input_text", "text": "B"}]},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text",
                                                        "text": "Only a summary."}]},
        {"type": "function_call", "call_id": "c3", "name": "a", "arguments": "{}"},
    ])
    assert messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Call both.",
         "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
             {"id": "c2", "type": "function",
              "function": {"name": "b", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "A"},
        {"role": "tool", "tool_call_id": "c2", "content": "B"},
        {"role": "assistant", "content": None, "reasoning_content": "Only a summary.",
         "tool_calls": [{"id": "c3", "type": "function",
                         "function": {"name": "a", "arguments": "{}"}}]},
    ]


THINKING_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m.content or '' }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""ChatML that renders an assistant turn's reasoning, as Qwen3's and DeepSeek's templates do."""


def test_reasoning_handed_back_reaches_the_template(pair: Pair,
                                                    serve: Callable[..., Served]) -> None:
    """A reasoning item sent back (as the Agents SDK and Codex do) reaches a template that
    renders the turn's reasoning. Failing: the previous turn's thinking is lost."""
    served = serve(pair, small_template=THINKING_CHATML, target_template=THINKING_CHATML)
    pair.reset()
    answer = client(served).responses.create(model="specthink", input=[
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "They greet me."}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
        {"role": "user", "content": "hello there"}])
    assert answer.output_text == "You said: hello there"
    assert ("<|im_start|>assistant\n<think>\nThey greet me.\n</think>\n\nHello!<|im_end|>"
            in pair.small.records[0].prompt)
