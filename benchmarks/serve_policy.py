"""The "through ``specthink serve``" policies: an OpenAI-protocol client of a ``specthink serve``
process it starts itself, streaming chat completions (``serve``) or Responses
(``serve-responses``); see :mod:`benchmarks.serve` for the benchmark.

Both read the server-sent events with httpx alone; only a :class:`Wire` differs: the path, the
request body, and which event carries text, the statistics and the end."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
import orjson

from benchmarks.policies import Outcome, Policy, budget_for
from benchmarks.traces import TraceSpec, make_trace, messages_for
from specthink.backends._transport import LeanTransport

__all__ = ["CHAT", "LAYOUTS", "RESPONSES", "Read", "ServePolicy", "ServeResponsesPolicy", "Wire"]

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"default": 1, "workers-2": 2}
"""ServePolicy layouts: the number of ``specthink serve`` workers."""


@dataclass(frozen=True, slots=True)
class Read:
    """What one server-sent event's data carries for the benchmark."""

    kind: Literal["reasoning", "content"] | None = None
    text: str = ""
    stats: dict[str, Any] | None = None
    """The engine's statistics (the ``specthink`` object), on the event that carries them."""
    end: bool = False
    """The stream's last event: the answer is complete."""


@dataclass(frozen=True, slots=True)
class Wire:
    """The per-API part of :meth:`ServePolicy.run`."""

    path: str
    body: Callable[[list[dict[str, str]], int], dict[str, Any]]
    """The streamed request for the conversation's messages and token budget."""
    read: Callable[[str], Read]
    """One event's ``data:`` text; raises when the server reports a failure."""


def _chat_read(data: str) -> Read:
    if data == "[DONE]":
        return Read(end=True)
    chunk = orjson.loads(data)
    if "error" in chunk:
        raise RuntimeError(f"specthink serve: {chunk['error']['message']}")
    if "usage" in chunk:
        return Read(stats=chunk["specthink"])
    if chunk["choices"]:
        delta = chunk["choices"][0]["delta"]
        if delta.get("reasoning_content"):
            return Read("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            return Read("content", delta["content"])
    return Read()


CHAT = Wire(
    "/v1/chat/completions",
    lambda messages, budget: {"model": "specthink", "messages": messages, "stream": True,
                              "stream_options": {"include_usage": True}, "max_tokens": budget},
    _chat_read)
"""Chat completions with ``include_usage``: the statistics ride on the usage chunk, the end
is ``[DONE]``."""

_RESPONSES_TEXT: dict[str, Literal["reasoning", "content"]] = {
    "response.reasoning_text.delta": "reasoning", "response.output_text.delta": "content"}


def _responses_read(data: str) -> Read:
    event = orjson.loads(data)
    kind = event["type"]
    if kind in _RESPONSES_TEXT:
        return Read(_RESPONSES_TEXT[kind], event["delta"])
    if kind in ("response.completed", "response.incomplete"):  # incomplete: the budget ran out
        return Read(stats=event["response"]["specthink"], end=True)
    if kind in ("response.failed", "error"):
        error = event["response"]["error"] if kind == "response.failed" else event
        raise RuntimeError(f"specthink serve: {kind}: {error['message']}")
    return Read()


RESPONSES = Wire(
    "/v1/responses",
    # The chat messages are valid Responses input items (``type`` defaults to ``message``);
    # ``store`` is left at OpenAI's default (true), as the Responses clients send it.
    lambda messages, budget: {"model": "specthink", "input": messages, "stream": True,
                              "max_output_tokens": budget},
    _responses_read)
"""The Responses API: text in ``response.reasoning_text.delta`` and
``response.output_text.delta``, the statistics and the end in ``response.completed`` (or
``response.incomplete``, as chat's ``finish_reason: length``)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServePolicy(Policy):
    """An OpenAI-protocol client of a ``specthink serve`` process (paper preset, DeepSeek-R1
    template, as the engine policy), streaming chat completions with ``include_usage``."""

    name = "serve"
    streams_from = ("small", "target")
    wire: ClassVar[Wire] = CHAT

    def __init__(self, small_url: str, target_url: str, trace: TraceSpec, *,
                 layout: str = "default") -> None:
        super().__init__(small_url, target_url, trace, layout=layout)
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r} for serve: {sorted(LAYOUTS)}")
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-c", "from specthink.cli import main; main()", "serve",
                   "--small", small_url, "--target", target_url, "--port", str(port),
                   "--small-template", "deepseek-r1", "--target-template", "deepseek-r1",
                   "--max-tokens", "10000000", "--workers", str(LAYOUTS[layout])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        env.pop("SPECTHINK_SERVE_API_KEYS", None)
        self._process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        # The engine's own lean transport, so the client's cost per request is what the
        # in-process engine pays towards its model servers and only the server's cost differs.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=10, read=300, write=10, pool=None),
            transport=LeanTransport())
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self._process.poll() is not None:
                self._process.kill()
                raise RuntimeError("specthink serve did not start")
            time.sleep(0.05)

    async def run(self, conversation: int, budget: int | None = None) -> Outcome:
        trace = make_trace(self.trace, conversation)
        wire = self.wire
        body = wire.body(messages_for(trace), budget or budget_for(self.trace, conversation))
        started = time.monotonic()
        first: float | None = None
        finished: float | None = None
        texts: dict[str, list[str]] = {"reasoning": [], "content": []}
        stats: dict[str, Any] | None = None
        async with self._client.stream("POST", f"{self.url}{wire.path}", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                read = wire.read(line[6:])
                if read.kind is not None:
                    if first is None:
                        first = time.monotonic()
                    texts[read.kind].append(read.text)
                if read.stats is not None:
                    stats = read.stats
                if read.end:
                    finished = time.monotonic()
        if finished is None or stats is None:
            raise RuntimeError(f"specthink serve: {wire.path}'s stream ended before its end "
                               "event or without the statistics")
        takeovers = {k: v for k, v in stats["takeovers"].items() if v}
        requests = dict(stats["requests"])
        return Outcome(
            conversation=conversation, started=started, finished=finished, first_text=first,
            text="".join(texts["reasoning"]) + "\x00" + "".join(texts["content"]),
            small_tokens=int(stats["small_tokens"]),
            target_tokens=int(stats["target_tokens"])
            + int(stats["intervention_tokens"]),
            handoffs=sum(takeovers.get(r, 0) for r in ("rule1", "rule3", "begin",
                                                       "every_trigger")),
            takeovers=takeovers, requests=requests,
            discarded_tokens=int(stats["discarded_tokens"]),
            fallback=bool(stats["fallback"]),
            retries=sum(stats["retries"].values()))

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._process.poll() is None:
            self._process.terminate()
            try:
                await asyncio.to_thread(self._process.wait, 30)
            except subprocess.TimeoutExpired:
                self._process.kill()


class ServeResponsesPolicy(ServePolicy):
    """:class:`ServePolicy` streaming ``POST /v1/responses`` instead of chat completions."""

    name = "serve-responses"
    wire = RESPONSES
