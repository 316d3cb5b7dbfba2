"""A tiny Ollama server on loopback (``specthink.testing`` speaks TGI and OpenAI, not Ollama's
``/api/generate``): the backend's own tests and the adapters' ``backend="ollama"`` tests run
against it. Import it as ``tests.ollama_support``."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ANSWER = "Hello there."
"""What the server writes by default, one word per line."""

MODELS = ("qwen3:0.6b", "qwen3:8b")
"""The models ``/api/tags`` lists (the first is a backend's default model)."""


@dataclass
class Ollama:
    """What the in-test server answers: ``words`` streamed one per line, then a ``done`` line
    (unless ``drop_after`` cuts the stream), or an error line, or an error status."""

    words: list[str] = field(default_factory=lambda: ["Hello", " there", "."])
    drop_after: int | None = None
    error_line: str | None = None
    status_error: tuple[int, str] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    async def generate(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.status_error is not None:
            code, message = self.status_error
            return JSONResponse({"error": message}, status_code=code)
        limit = body["options"]["num_predict"]
        words = self.words[:limit]

        async def lines() -> AsyncIterator[bytes]:
            if self.error_line is not None:
                yield json.dumps({"error": self.error_line}).encode() + b"\n"
                return
            for index, word in enumerate(words):
                if self.drop_after is not None and index == self.drop_after:
                    raise RuntimeError("the server dies mid-stream")
                yield json.dumps({"model": body["model"], "response": word,
                                  "done": False}).encode() + b"\n"
                await asyncio.sleep(0)
            reason = "length" if len(words) < len(self.words) else "stop"
            yield json.dumps({"model": body["model"], "response": "", "done": True,
                              "done_reason": reason, "prompt_eval_count": 7,
                              "eval_count": len(words)}).encode()  # no final newline

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [{"name": name, "model": name} for name in MODELS]})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": "0.5.7"})

    def models(self) -> list[str]:
        """The model of each generation request, in order."""
        return [request["model"] for request in self.requests]


@contextmanager
def ollama_server() -> Iterator[Ollama]:
    """An :class:`Ollama` served by uvicorn on 127.0.0.1 (a free port) in a thread, stopped
    when the block ends."""
    state = Ollama()
    app = Starlette(routes=[Route("/api/generate", state.generate, methods=["POST"]),
                            Route("/api/tags", state.tags, methods=["GET"]),
                            Route("/api/version", state.version, methods=["GET"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off",
                                           log_level="critical", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.01)
    try:
        assert server.started, "the in-test Ollama server did not start"
        state.url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
