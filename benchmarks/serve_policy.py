"""The "through ``specthink serve``" policy: an OpenAI-protocol client of a ``specthink serve``
process it starts itself (see :mod:`benchmarks.serve` for the benchmark)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.policies import Outcome, Policy, budget_for
from benchmarks.traces import TraceSpec, make_trace, messages_for
from specthink.backends._transport import LeanTransport

__all__ = ["LAYOUTS", "ServePolicy"]

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"default": 1, "workers-2": 2}
"""ServePolicy layouts: the number of ``specthink serve`` workers."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServePolicy(Policy):
    """An OpenAI-protocol client of a ``specthink serve`` process (paper preset, DeepSeek-R1
    template, as the engine policy), streaming with ``include_usage``."""

    name = "serve"
    streams_from = ("small", "target")

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
        body = {"model": "specthink", "messages": messages_for(trace), "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": budget or budget_for(self.trace, conversation)}
        started = time.monotonic()
        first: float | None = None
        reasoning: list[str] = []
        content: list[str] = []
        stats: dict[str, Any] = {}
        async with self._client.stream("POST", f"{self.url}/v1/chat/completions",
                                       json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"specthink serve: {chunk['error']['message']}")
                if chunk["choices"]:
                    delta = chunk["choices"][0]["delta"]
                    piece = delta.get("reasoning_content") or delta.get("content")
                    if piece:
                        if first is None:
                            first = time.monotonic()
                        (reasoning if "reasoning_content" in delta else content).append(piece)
                if "usage" in chunk:
                    stats = chunk["specthink"]
        finished = time.monotonic()
        takeovers = {k: v for k, v in stats["takeovers"].items() if v}
        requests = dict(stats["requests"])
        return Outcome(
            conversation=conversation, started=started, finished=finished, first_text=first,
            text="".join(reasoning) + "\x00" + "".join(content),
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
