"""Fixtures of the server's tests: model-server pairs on loopback (``specthink.testing``) and
``specthink serve``'s app on 127.0.0.1 in a thread of this process, each stopped by its handle.

The pair's "model" answers from the rendered ChatML prompt, so both servers write the very same
text and a takeover changes who wrote a passage, not its words (as greedy decoding would)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import uvicorn

from specthink.serve import ServeSettings, create_app
from specthink.serve.metrics import ServeMetrics
from specthink.testing import LatencyModel, LoopbackServer
from specthink.testing.models import Continuation, last_user_message

CHATML_ASSISTANT = "<|im_start|>assistant\n"
_TOOLS = re.compile(r"<tools>\n(.*?)\n</tools>", re.DOTALL)
_SCHEMA = re.compile(r"conforms to this JSON schema, and nothing else:\n(.*?)<\|im_end\|>",
                     re.DOTALL)

REASONING = ("\nThe user asks {topic}.\n\nWait, let me think about what they need.\n\n"
             "I should check that the reply fits.\n")
"""Reasoning with a reflection and a verification after blank lines: rules 1 and 2 fire."""


def think(topic: str, decoy: str = "") -> str:
    return "<think>" + REASONING.format(topic=topic) + decoy + "</think>\n\n"


DECOY = ('Maybe <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
         " would do, but no.\n")
"""A tool call the model only considers while thinking: it must never be executed."""


def answer_for(prompt: str) -> str:
    """The whole answer to the conversation in ``prompt`` (ChatML, tools rendered Hermes-style)."""
    question = last_user_message(prompt)
    system = prompt.split("<|im_start|>user", 1)[0]
    if "<tool_response>" in question:
        result = question.split("<tool_response>", 1)[1].split("</tool_response>", 1)[0]
        return think("about a tool result") + f"The tool says: {result.strip()}"
    if schema := _SCHEMA.search(system):
        properties = json.loads(schema.group(1)).get("properties", {})
        filled = {name: ("Ada" if spec.get("type") == "string" else 36)
                  for name, spec in properties.items()}
        return think("for JSON") + json.dumps(filled)
    if tools := _TOOLS.search(system):
        names = [json.loads(line)["function"]["name"] for line in tools.group(1).splitlines()
                 if line.strip()]
        calls = "\n".join(
            "<tool_call>\n" + json.dumps({"name": name, "arguments": {"city": "Paris"}})
            + "\n</tool_call>" for name in names)
        return think("for the weather", DECOY) + calls
    if "list" in question:
        return think("for a list") + "One, two, three."
    return think(f"about {question[:40]!r}") + f"You said: {question}"


class ConversationModel:
    """Writes ``answer_for(prompt)``, resumed from wherever the assistant text stands."""

    def continuation(self, prompt: str) -> Continuation:
        answer = answer_for(prompt)
        written = prompt.rsplit(CHATML_ASSISTANT, 1)[-1]
        if answer.startswith(written):
            return Continuation(answer[len(written):], True)
        return Continuation("", True)


@dataclass
class Pair:
    small: LoopbackServer
    target: LoopbackServer

    def reset(self) -> None:
        self.small.reset()
        self.target.reset()

    def requests(self) -> int:
        """Requests of any kind the pair has recorded (generation requests)."""
        return len(self.small.records) + len(self.target.records)


class AppServer:
    """An ASGI app served by uvicorn on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app: Any, **config: Any) -> None:
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=0, lifespan="on", log_level="warning", http="h11",
            loop="asyncio", **config))
        self.thread = threading.Thread(target=self.server.run, name="specthink-serve",
                                       daemon=True)
        self.url = ""

    def start(self) -> AppServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("specthink serve did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@dataclass
class Served:
    """``specthink serve`` in front of a pair."""

    url: str
    pair: Pair
    settings: ServeSettings
    metrics: ServeMetrics

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


def settings_for(pair: Pair, **overrides: Any) -> ServeSettings:
    values: dict[str, Any] = {"small_url": pair.small.url, "target_url": pair.target.url,
                              "small_template": "chatml", "target_template": "chatml"}
    values.update(overrides)
    return ServeSettings.model_validate(values)


@contextmanager
def conversation_pair(latency: LatencyModel | None = None) -> Iterator[Pair]:
    """A small and a target server, both playing :class:`ConversationModel` (at ``latency``)."""
    with LoopbackServer(ConversationModel(), latency=latency, model_id="test/small") as small, \
            LoopbackServer(ConversationModel(), latency=latency,
                           model_id="test/target") as target:
        yield Pair(small, target)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """:func:`conversation_pair`, shared by a module's tests."""
    with conversation_pair() as servers:
        yield servers


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """``serve(pair, **settings)``: start the app in front of ``pair``."""
    started: list[AppServer] = []

    def start(pair: Pair, **overrides: Any) -> Served:
        settings = settings_for(pair, **overrides)
        metrics = ServeMetrics()
        server = AppServer(create_app(settings, metrics=metrics)).start()
        started.append(server)
        return Served(server.url, pair, settings, metrics)

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def served(pair: Pair) -> Iterator[Served]:
    """The app with default settings in front of the module's pair (records reset by
    ``fresh``)."""
    settings = settings_for(pair)
    metrics = ServeMetrics()
    server = AppServer(create_app(settings, metrics=metrics)).start()
    yield Served(server.url, pair, settings, metrics)
    server.stop()


@pytest.fixture
def fresh(served: Served) -> Served:
    """``served`` with the pair's records forgotten."""
    served.pair.reset()
    return served


_CLIENTS: list[openai.OpenAI] = []


def client(served: Served, **options: Any) -> openai.OpenAI:
    """An ``openai`` SDK client of ``served``, closed when the test ends."""
    options = {"api_key": "unused", "max_retries": 0, **options}
    sdk = openai.OpenAI(base_url=served.base_url, **options)
    _CLIENTS.append(sdk)
    return sdk


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()
