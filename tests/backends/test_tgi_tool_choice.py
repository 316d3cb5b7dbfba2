"""TGI's ``tool_choice`` through ``/chat_tokenize``: the accepted forms, what reaches the
server, and what the server renders for each (issue 13, item 4)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from specthink.backends import TGIBackend
from specthink.backends.tgi import tgi_tool_choice
from specthink.errors import ConfigError, RequestValidationError
from specthink.testing import LoopbackServer, ScriptedModel

ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
MUL = {"type": "function", "function": {"name": "mul", "parameters": {"type": "object"}}}
USER = [{"role": "user", "content": "2*3?"}]


@pytest.mark.parametrize(("given", "sent"), [
    ("auto", "auto"), ("none", "none"), ("required", "required"), ("any", "required"),
    ("mul", {"type": "function", "function": {"name": "mul"}}),
    ({"type": "function", "function": {"name": "mul"}},
     {"type": "function", "function": {"name": "mul"}}),
    ({"name": "mul"}, {"type": "function", "function": {"name": "mul"}}),
])
def test_tool_choice_forms(given: Any, sent: Any) -> None:
    """LangChain's "any" is TGI's "required"; a name goes in TGI's typed form. If this fails,
    TGI offers its no_tool pseudo-function where the caller required a tool."""
    assert tgi_tool_choice(given) == sent


@pytest.mark.parametrize("bad", ["", {"type": "function"}, {"function": {"name": 3}}, 5])
def test_malformed_tool_choice_fails_before_any_request(bad: Any) -> None:
    """If this fails, a malformed choice reaches TGI as a 422 or, worse, as a tool name."""
    with pytest.raises(ConfigError, match="tool_choice"):
        tgi_tool_choice(bad)


async def test_render_chat_sends_tool_choice_only_with_tools() -> None:
    """If this fails, TGI never learns the choice, or gets one without tools."""
    bodies: list[Any] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"templated_text": "x", "tokenize_response": []})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        backend = TGIBackend("http://tgi.test", client=client)
        await backend.render_chat(USER, [ADD], tool_choice="any")
        await backend.render_chat(USER, tool_choice="required")
        await backend.render_chat(USER, [ADD])
    assert bodies[0]["tool_choice"] == "required"
    assert "tool_choice" not in bodies[1] and "tools" not in bodies[1]
    assert "tool_choice" not in bodies[2]


def offered(text: str) -> list[str]:
    return [json.loads(line)["function"]["name"] for line in text.splitlines()
            if line.startswith('{"type": "function"')]


@pytest.mark.parametrize(("tool_choice", "names"), [
    ("auto", ["add", "mul", "no_tool"]), ("any", ["add", "mul"]), ("required", ["add", "mul"]),
    ("mul", ["mul"]), ("none", []),
])
async def test_the_server_renders_what_the_choice_allows(
        loopback_server: Callable[..., LoopbackServer], tool_choice: str,
        names: list[str]) -> None:
    """Against the loopback TGI: no_tool only with "auto"; a name renders that tool only."""
    server = loopback_server(ScriptedModel.single("x"))
    backend = TGIBackend(server.url)
    try:
        text = await backend.render_chat(USER, [ADD, MUL], tool_choice=tool_choice)
    finally:
        await backend.aclose()
    assert text is not None and offered(text) == names


async def test_a_name_not_among_the_tools_is_tgis_tool_error(
        loopback_server: Callable[..., LoopbackServer]) -> None:
    """TGI answers 422 ``tool_error``; if this fails, the caller gets a prompt for a tool that
    does not exist."""
    server = loopback_server(ScriptedModel.single("x"))
    backend = TGIBackend(server.url, retry_backoff=0.0)
    try:
        with pytest.raises(RequestValidationError) as info:
            await backend.render_chat(USER, [ADD], tool_choice="divide")
    finally:
        await backend.aclose()
    assert (info.value.status_code, info.value.error_type) == (422, "tool_error")
