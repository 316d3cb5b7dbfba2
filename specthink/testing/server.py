"""A Text Generation Inference server on loopback whose "model" is a deterministic function of the
prompt (see :mod:`specthink.testing.models`).

It speaks TGI's wire format (validated against TGI's OpenAPI file by the test suite), plus
``/v1/completions``, over real sockets (uvicorn in a background thread), and adds what tests
and benchmarks need:

- a latency model (prefill per uncached prompt token, then a cost per token),
- a prefix cache matching exact token ids, counting reused vs. recomputed prompt tokens,
- fault injection (error statuses, in-stream error events, dropped connections, stalls),
- a record of every generation request, including whether the client hung up early.

Example::

    with LoopbackServer(ScriptedModel.single("Hello there.")) as server:
        backend = TGIBackend(server.url)
        ...
        assert server.records[0].finish_reason == "eos_token"

As in TGI, ``/generate_stream`` reports validation errors and overload *inside* a 200 stream
(``data:{"error": ..., "error_type": ...}``); ``/generate`` and non-streamed
``/v1/completions`` answer with an HTTP status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from specthink.testing.models import TextModel, Tokenizer

__all__ = [
    "Fault",
    "LatencyModel",
    "LoopbackServer",
    "PrefixCache",
    "RequestRecord",
    "render_chatml",
]

EOS_TEXT = "</s>"
EOS_ID = 2
VERSION = "3.3.6"
"""The TGI version whose wire format this server follows."""

GENERATION_PATHS = ("/generate_stream", "/generate", "/v1/completions")

TGIFinish = Literal["eos_token", "length", "stop_sequence"]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Seconds a request takes: ``per_request`` plus ``per_uncached_prompt_token`` for each
    prompt token not served from the prefix cache (prefill, before the first token), then
    ``per_token`` before each generated token."""

    per_request: float = 0.0
    per_uncached_prompt_token: float = 0.0
    per_token: float = 0.0

    def prefill_seconds(self, uncached_tokens: int) -> float:
        return self.per_request + self.per_uncached_prompt_token * uncached_tokens

    def service_seconds(self, uncached_tokens: int, generated_tokens: int) -> float:
        return self.prefill_seconds(uncached_tokens) + self.per_token * generated_tokens


FaultKind = Literal["status", "error_event", "drop", "stall"]

_STATUS_BODIES: dict[int, tuple[str, str]] = {
    422: ("Input validation error: injected fault", "validation"),
    424: ("Request failed during generation: injected fault", "generation"),
    429: ("Model is overloaded", "overloaded"),
    500: ("Incomplete generation", "incomplete_generation"),
    503: ("Model is not ready", "unhealthy"),
}
_OVERLOADED = ("Model is overloaded", "overloaded")
_ERROR_MESSAGES = {error_type: message for message, error_type in _STATUS_BODIES.values()}


@dataclass(frozen=True, slots=True)
class Fault:
    """Something going wrong on purpose. Build one with :meth:`status`, :meth:`error_event`,
    :meth:`drop` or :meth:`stall` and pass it to :meth:`LoopbackServer.inject`.

    Faults apply to the next matching generation requests in FIFO order, ``times`` requests
    each. Status faults match any generation request; the others match streamed ones, and act
    once ``after_tokens`` tokens have been sent (never if the answer is shorter). ``path``
    limits a fault to one endpoint.
    """

    kind: FaultKind
    times: int = 1
    status_code: int | None = None
    retry_after: float | None = None
    after_tokens: int = 0
    error_type: str = "generation"
    seconds: float = 0.0
    path: str | None = None

    @classmethod
    def status(cls, status_code: int, *, times: int = 1, retry_after: float | None = None,
               path: str | None = None) -> Fault:
        """Answer with ``status_code`` and TGI's ``{"error", "error_type"}`` body (and a
        ``Retry-After`` header when given)."""
        return cls("status", times, status_code=status_code, retry_after=retry_after, path=path)

    @classmethod
    def error_event(cls, *, after_tokens: int = 0, error_type: str = "generation",
                    times: int = 1, path: str | None = None) -> Fault:
        """Send an ``{"error", "error_type"}`` event inside the 200 stream, then end it."""
        return cls("error_event", times, after_tokens=after_tokens, error_type=error_type,
                   path=path)

    @classmethod
    def drop(cls, *, after_tokens: int = 0, times: int = 1, path: str | None = None) -> Fault:
        """Close the TCP connection mid-stream: the client sees an incomplete chunked body."""
        return cls("drop", times, after_tokens=after_tokens, path=path)

    @classmethod
    def stall(cls, *, after_tokens: int = 0, seconds: float, times: int = 1,
              path: str | None = None) -> Fault:
        """Pause ``seconds`` before token ``after_tokens + 1`` (a client read timeout fires)."""
        return cls("stall", times, after_tokens=after_tokens, seconds=seconds, path=path)

    def matches(self, path: str, streaming: bool) -> bool:
        if self.path is not None and self.path != path:
            return False
        return self.kind == "status" or streaming


@dataclass(slots=True)
class RequestRecord:
    """One generation request as the server saw it."""

    id: int
    path: str
    prompt: str
    parameters: dict[str, Any]
    started: float
    """``time.monotonic()`` when the request arrived."""
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    """Prompt tokens served from the prefix cache; the rest were recomputed."""
    max_new_tokens: int = 0
    tokens_sent: int = 0
    """Generated tokens written to the socket (the final special token included)."""
    finish_reason: str | None = None
    """TGI's finish reason once the answer is complete; ``None`` if it was cut short."""
    status: int = 200
    error_type: str | None = None
    """Set when the request failed: an error status, or an error event inside the stream."""
    fault: Fault | None = None
    disconnected: bool = False
    """The client closed the connection before the answer was complete."""
    finished: float | None = None
    service_seconds: float = 0.0
    """What the latency model charged (stalls excluded)."""

    @property
    def recomputed_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_prompt_tokens


class PrefixCache:
    """Exact token-id prefix matching, as TGI v3 and vLLM's prefix caching: a hash chain over
    token ids, one entry per prefix, least recently used evicted beyond ``capacity``."""

    def __init__(self, capacity: int | None = 1_000_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, None] = OrderedDict()

    @staticmethod
    def chain(ids: Iterable[int], start: int = 0) -> list[int]:
        hashes = []
        h = start
        for token_id in ids:
            h = hash((h, token_id))
            hashes.append(h)
        return hashes

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading tokens are cached."""
        matched = 0
        for h in hashes:
            if h not in self._entries:
                break
            self._entries.move_to_end(h)
            matched += 1
        return matched

    def add(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self._entries[h] = None
            self._entries.move_to_end(h)
        if self.capacity is not None:
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------- requests


class _Invalid(Exception):
    """A request TGI would reject (its message follows TGI's validation.rs)."""

    def __init__(self, message: str, error_type: str = "validation") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


class _Parameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = True
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: dict[str, Any] | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None


class _GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: _Parameters = Field(default_factory=_Parameters)


class _CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str | list[str]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stream: bool = False
    suffix: str | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass(slots=True)
class _Job:
    """A validated generation: the prompt's token ids and the tokens the model will write."""

    prompt: str
    prompt_ids: list[int]
    tokens: list[tuple[str, int, bool]]
    """(text, id, special) for each token to send."""
    finish: TGIFinish
    max_new_tokens: int
    seed: int | None
    details: bool = True


def _json_line(payload: Any) -> bytes:
    # TGI (axum) writes "data:" with no space, compact JSON, and a blank line after each event.
    return b"data:" + json.dumps(payload, ensure_ascii=False,
                                 separators=(",", ":")).encode() + b"\n\n"


def _error_body(message: str, error_type: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


def render_chatml(messages: Sequence[Mapping[str, Any]],
                  tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """ChatML with the generation prompt; tools go into the system turn, Hermes/Qwen style.

    Like TGI 3.3, only ``role`` and ``content`` of each message are kept.
    """
    turns = [(str(m.get("role", "user")), _content_text(m.get("content"))) for m in messages]
    out = []
    if tools:
        system = "You are a helpful assistant."
        if turns and turns[0][0] == "system":
            system = turns.pop(0)[1]
        listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        out.append(
            f"<|im_start|>system\n{system}\n\n# Tools\n\nYou may call one or more functions to "
            "assist with the user query.\n\nYou are provided with function signatures within "
            f"<tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\nFor each function call, "
            "return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call><|im_end|>\n")
    out.extend(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def _content_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


# --------------------------------------------------------------------------- streaming


class _EventStream(Response):
    """A ``text/event-stream`` response that notices a client hanging up at once (not only at
    the next write) and records it."""

    media_type = "text/event-stream"

    def __init__(self, produce: Callable[[Callable[[bytes], Awaitable[None]], _StreamControl],
                                         Awaitable[None]],
                 control: _StreamControl) -> None:
        # No Response.__init__: it would render an empty body and send Content-Length: 0.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._produce = produce
        self._control = control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        control = self._control
        control.client = tuple(scope.get("client") or ())
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})

        async def write(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async with anyio.create_task_group() as group:
            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                control.gone.set()
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self._produce(write, control)
                if not control.dropped:
                    control.complete = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                control.on_close()
                group.cancel_scope.cancel()


@dataclass(eq=False)
class _StreamControl:
    record: RequestRecord
    lock: threading.Lock
    connections: Callable[[], Iterable[Any]]
    client: tuple[Any, ...] = ()
    gone: anyio.Event = field(default_factory=anyio.Event)
    release: Callable[[], None] | None = None
    """Gives the request's concurrency permit back when the stream ends."""
    complete: bool = False
    dropped: bool = False

    def on_close(self) -> None:
        with self.lock:
            self.record.finished = time.monotonic()
            if not self.complete and not self.dropped:
                self.record.disconnected = True
        if self.release is not None:
            self.release()

    async def drop_connection(self) -> None:
        """Close this request's TCP connection and wait until uvicorn has noticed."""
        self.dropped = True
        for protocol in self.connections():
            if getattr(protocol, "client", None) == self.client:
                protocol.transport.close()
                break
        else:  # pragma: no cover - uvicorn internals changed; let uvicorn close it instead
            raise RuntimeError("injected drop: connection not found")
        with anyio.move_on_after(5.0):
            await self.gone.wait()


# --------------------------------------------------------------------------- the server


class LoopbackServer:
    """A TGI-protocol server on 127.0.0.1 serving ``model``.

    Use it as a context manager (``with`` or ``async with``) or call :meth:`start` and
    :meth:`stop`; ``url`` is known once started (``port=0`` picks a free port).

    - ``tokenizer`` splits prompts and answers into tokens (the model's text is cut into tokens
      by it, and ``max_new_tokens`` counts them).
    - ``latency`` is charged with ``asyncio.sleep``: prefill before the first token, then per
      token. Nothing is charged by default.
    - ``max_input_tokens``, ``max_total_tokens``, ``max_stop_sequences`` are validated as TGI
      does and reported by ``/info``; ``max_concurrent_requests`` generations may run at once,
      the next ones are "overloaded" (in the stream for ``/generate_stream``, 429 otherwise).
    - ``cache_capacity`` bounds the prefix cache (token prefixes, least recently used evicted).

    Endpoints: ``/generate_stream``, ``/generate``, ``/info``, ``/health``, ``/tokenize``,
    ``/chat_tokenize`` (ChatML, see :func:`render_chatml`), ``/v1/completions`` (streamed or
    not) and ``/v1/models``. Generation requests are kept in :attr:`records`; faults are queued
    with :meth:`inject`; :meth:`reset` forgets both and the cache.
    """

    def __init__(self, model: TextModel, *, tokenizer: Tokenizer | None = None,
                 latency: LatencyModel | None = None, model_id: str = "specthink/scripted",
                 max_input_tokens: int = 4096, max_total_tokens: int = 8192,
                 max_stop_sequences: int = 4, max_concurrent_requests: int = 1024,
                 cache_capacity: int | None = 1_000_000, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.model = model
        self.tokenizer = tokenizer or Tokenizer()
        self.latency = latency or LatencyModel()
        self.model_id = model_id
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.max_stop_sequences = max_stop_sequences
        self.max_concurrent_requests = max_concurrent_requests
        self.host = host
        self.port = port
        self.healthy = True
        """Set to False to make ``/health`` answer 503."""
        self.cache = PrefixCache(cache_capacity)
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._faults: list[list[Any]] = []  # [fault, remaining times]
        self._next_id = 1
        self._active = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self.app = Starlette(routes=[
            Route("/generate_stream", self._generate_stream, methods=["POST"]),
            Route("/generate", self._generate, methods=["POST"]),
            Route("/info", self._info, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/tokenize", self._tokenize, methods=["POST"]),
            Route("/chat_tokenize", self._chat_tokenize, methods=["POST"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ])

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if not self._started.is_set():
            raise RuntimeError("the server is not running: call start() or use `with`")
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self._started.is_set() else "stopped"
        return f"LoopbackServer({self.model_id!r}, {where})"

    def start(self) -> LoopbackServer:
        """Start serving in a background thread; returns once the socket listens."""
        if self._thread is not None:
            return self
        self._started.clear()
        self._startup_error = None
        self._thread = threading.Thread(target=self._run, name=f"loopback-{self.model_id}",
                                        daemon=True)
        self._thread.start()
        self._started.wait(timeout=30)
        if self._startup_error is not None or not self._started.is_set():
            self._thread.join(timeout=5)
            self._thread = None
            raise RuntimeError(f"loopback server failed to start: {self._startup_error}")
        return self

    def stop(self) -> None:
        """Close every connection (streams in flight break) and stop the thread."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        self._thread = None
        self._started.clear()

    def serve_forever(self) -> None:
        """Run in the foreground until interrupted (``python -m specthink.testing``)."""
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> LoopbackServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # pragma: no cover - reported by start()
            self._startup_error = exc
            self._started.set()

    async def _serve(self) -> None:
        config = uvicorn.Config(self.app, host=self.host, port=self.port, lifespan="off",
                                http="h11", loop="asyncio", log_level="warning",
                                access_log=False, backlog=4096)
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # uvicorn's own serve() polls for shutdown every 0.1 s and sleeps 0.1 s more while
        # stopping; driving startup and a quick shutdown directly keeps tests fast.
        await server.startup()
        self.port = server.servers[0].sockets[0].getsockname()[1]
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            for listener in server.servers:
                listener.close()
            for connection in list(server.server_state.connections):
                connection.transport.close()
            tasks = list(server.server_state.tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for listener in server.servers:
                await listener.wait_closed()

    # ----------------------------------------------------------------- test controls

    def inject(self, *faults: Fault) -> None:
        """Queue faults for the next matching generation requests (FIFO)."""
        with self._lock:
            self._faults.extend([fault, fault.times] for fault in faults)

    @property
    def records(self) -> list[RequestRecord]:
        """A snapshot of every generation request so far, oldest first."""
        with self._lock:
            return [dataclasses.replace(record) for record in self._records]

    @property
    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return [fault for fault, _ in self._faults]

    def reset(self) -> None:
        """Forget records, cached prefixes and pending faults."""
        with self._lock:
            self._records.clear()
            self._faults.clear()
            self.cache.clear()

    # ----------------------------------------------------------------- plumbing

    def _take_fault(self, path: str, streaming: bool) -> Fault | None:
        with self._lock:
            for entry in self._faults:
                fault = entry[0]
                if fault.matches(path, streaming):
                    entry[1] -= 1
                    if entry[1] <= 0:
                        self._faults.remove(entry)
                    return fault  # type: ignore[no-any-return]
        return None

    def _new_record(self, path: str, prompt: str, parameters: dict[str, Any]) -> RequestRecord:
        with self._lock:
            record = RequestRecord(self._next_id, path, prompt, parameters, time.monotonic())
            self._next_id += 1
            self._records.append(record)
        return record

    def _update(self, record: RequestRecord, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(record, name, value)

    def _connections(self) -> Iterable[Any]:
        server = self._server
        return list(server.server_state.connections) if server is not None else []

    def _token_ids(self, text: str) -> list[int]:
        return [self.tokenizer.token_id(piece) for piece in self.tokenizer.tokenize(text)]

    def _validate(self, inputs: str, params: _Parameters, *, streaming: bool) -> _Job:
        """TGI's validation (router/src/validation.rs), in its order and with its messages."""
        if streaming and (params.best_of or 1) != 1:
            raise _Invalid("`best_of` != 1 is not supported when streaming tokens")
        if streaming and params.decoder_input_details:
            raise _Invalid("`decoder_input_details` == true is not supported when streaming "
                           "tokens")
        if params.temperature is not None and params.temperature <= 0:
            raise _Invalid("`temperature` must be strictly positive")
        if params.repetition_penalty is not None and params.repetition_penalty <= 0:
            raise _Invalid("`repetition_penalty` must be strictly positive")
        if params.frequency_penalty is not None and not -2.0 <= params.frequency_penalty <= 2.0:
            raise _Invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if params.top_p is not None and not 0.0 < params.top_p < 1.0:
            raise _Invalid("`top_p` must be > 0.0 and < 1.0")
        if params.typical_p is not None and not 0.0 < params.typical_p < 1.0:
            raise _Invalid("`typical_p` must be > 0.0 and < 1.0")
        if params.top_k is not None and params.top_k <= 0:
            raise _Invalid("`top_k` must be strictly positive")
        if params.max_new_tokens is not None and params.max_new_tokens <= 0:
            raise _Invalid("`max_new_tokens` must be strictly positive")
        if len(params.stop) > self.max_stop_sequences:
            raise _Invalid(f"`stop` supports up to {self.max_stop_sequences} stop sequences. "
                           f"Given: {len(params.stop)}")
        if not inputs:
            raise _Invalid("`inputs` cannot be empty")
        prompt_ids = self._token_ids(inputs)
        input_length = len(prompt_ids)
        max_new_tokens = params.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = min(max(self.max_total_tokens - input_length, 0), 1024)
        if input_length + max_new_tokens > self.max_total_tokens:
            raise _Invalid(f"`inputs` tokens + `max_new_tokens` must be <= "
                           f"{self.max_total_tokens}. Given: {input_length} `inputs` tokens and "
                           f"{max_new_tokens} `max_new_tokens`")
        if input_length > self.max_input_tokens:
            raise _Invalid(f"`inputs` must have less than {self.max_input_tokens} tokens. "
                           f"Given: {input_length}")
        tokens, finish = self._continuation(inputs, max_new_tokens, params.stop)
        sampling = params.do_sample or any(
            v is not None for v in (params.temperature, params.top_k, params.top_p,
                                    params.typical_p))
        seed = params.seed if params.seed is not None else (0 if sampling else None)
        return _Job(inputs, prompt_ids, tokens, finish, max_new_tokens, seed, params.details)

    def _continuation(self, prompt: str, max_new_tokens: int,
                      stop: Sequence[str]) -> tuple[list[tuple[str, int, bool]], TGIFinish]:
        answer = self.model.continuation(prompt)
        tokens: list[tuple[str, int, bool]] = []
        text = ""
        for piece in self.tokenizer.tokenize(answer.text):
            if len(tokens) >= max_new_tokens:
                return tokens, "length"
            tokens.append((piece, self.tokenizer.token_id(piece), False))
            text += piece
            if any(s and text.endswith(s) for s in stop):
                return tokens, "stop_sequence"
        if len(tokens) >= max_new_tokens or not answer.eos:
            # A continuation without end-of-sequence ends as if the budget ran out.
            return tokens, "length"
        tokens.append((EOS_TEXT, EOS_ID, True))
        return tokens, "eos_token"

    def _prefill(self, record: RequestRecord, job: _Job) -> tuple[list[int], float]:
        """Look the prompt up in the prefix cache; returns the hash chain and prefill seconds."""
        hashes = PrefixCache.chain(job.prompt_ids)
        with self._lock:
            matched = self.cache.match(hashes)
            # Like TGI and vLLM, the last prompt token is always recomputed (its logits are
            # needed for the first new token).
            cached = min(matched, max(len(hashes) - 1, 0))
            self.cache.add(hashes[matched:])
            record.prompt_tokens = len(hashes)
            record.cached_prompt_tokens = cached
            record.max_new_tokens = job.max_new_tokens
        seconds = self.latency.prefill_seconds(len(hashes) - cached)
        return hashes, seconds

    async def _run_tokens(self, record: RequestRecord, job: _Job, fault: Fault | None,
                          write: Callable[[bytes], Awaitable[None]], control: _StreamControl,
                          render: Callable[[int, tuple[str, int, bool], bool], bytes],
                          render_error: Callable[[str, str], bytes]) -> None:
        """Prefill, then send each token with the latency model, applying ``fault``."""
        hashes, prefill = self._prefill(record, job)
        head = hashes[-1] if hashes else 0
        service = prefill
        if prefill > 0:
            await asyncio.sleep(prefill)
        last = len(job.tokens) - 1
        for index, token in enumerate(job.tokens):
            if fault is not None and fault.after_tokens == index:
                if fault.kind == "error_event":
                    message = _ERROR_MESSAGES.get(fault.error_type,
                                                  f"injected {fault.error_type} error")
                    self._update(record, error_type=fault.error_type, service_seconds=service)
                    await write(render_error(message, fault.error_type))
                    return
                if fault.kind == "drop":
                    self._update(record, service_seconds=service)
                    await control.drop_connection()
                    return
                if fault.kind == "stall":
                    await asyncio.sleep(fault.seconds)
            # Yield to the loop even without latency, so 256 streams share it fairly.
            await asyncio.sleep(self.latency.per_token)
            service += self.latency.per_token
            await write(render(index, token, index == last))
            _, token_id, special = token
            with self._lock:
                record.tokens_sent += 1
                record.service_seconds = service
                if not special:
                    head = hash((head, token_id))
                    self.cache.add((head,))
        self._update(record, finish_reason=job.finish, service_seconds=service)

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        try:
            raw = await request.body()
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise _Invalid(f"Failed to deserialize the JSON body into the target type: "
                           f"{_first_error(exc)}") from exc

    @staticmethod
    def _error(status: int, message: str, error_type: str,
               headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(_error_body(message, error_type), status_code=status,
                            headers=dict(headers or {}))

    def _overloaded(self, record: RequestRecord) -> JSONResponse:
        self._update(record, status=429, error_type="overloaded", finished=time.monotonic())
        return self._error(429, *_OVERLOADED)

    def _status_fault(self, record: RequestRecord, fault: Fault) -> JSONResponse:
        code = fault.status_code or 500
        message, error_type = _STATUS_BODIES.get(code, (f"injected status {code}", "injected"))
        self._update(record, status=code, error_type=error_type, finished=time.monotonic())
        headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
        return self._error(code, message, error_type, headers)

    def _in_band_error(self, record: RequestRecord, message: str, error_type: str,
                       *, done: bool = False, permit: bool = True) -> _EventStream:
        self._update(record, error_type=error_type)

        async def produce(write: Callable[[bytes], Awaitable[None]],
                          control: _StreamControl) -> None:
            await write(_json_line(_error_body(message, error_type)))
            if done:
                await write(b"data:[DONE]\n\n")

        return _EventStream(produce, self._control(record, permit=permit))

    def _control(self, record: RequestRecord, *, permit: bool = True) -> _StreamControl:
        return _StreamControl(record, self._lock, self._connections,
                              release=self._release if permit else None)

    def _acquire(self) -> bool:
        """A concurrency permit, as TGI's ``max_concurrent_requests`` (false when full)."""
        with self._lock:
            if self._active >= self.max_concurrent_requests:
                return False
            self._active += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

    # ----------------------------------------------------------------- TGI endpoints

    async def _generate_stream(self, request: Request) -> Response:
        path = "/generate_stream"
        try:
            body: _GenerateRequest = await self._body(request, _GenerateRequest)
        except _Invalid as exc:
            return self._error(422, exc.message, exc.error_type)
        record = self._new_record(path, body.inputs,
                                  body.parameters.model_dump(exclude_unset=True))
        fault = self._take_fault(path, streaming=True)
        if fault is not None:
            self._update(record, fault=fault)
            if fault.kind == "status":
                return self._status_fault(record, fault)
        if not self._acquire():
            return self._in_band_error(record, *_OVERLOADED, permit=False)
        try:
            job = self._validate(body.inputs, body.parameters, streaming=True)
        except _Invalid as exc:
            return self._in_band_error(record, f"Input validation error: {exc.message}",
                                       exc.error_type)
        generated: list[str] = []

        def render(index: int, token: tuple[str, int, bool], last: bool) -> bytes:
            text, token_id, special = token
            if not special:
                generated.append(text)
            event: dict[str, Any] = {
                "index": index + 1,
                "token": {"id": token_id, "text": text, "logprob": 0.0, "special": special},
                "top_tokens": [],
                "generated_text": None,
                "details": None,
            }
            if last:
                full = "".join(generated)
                if body.parameters.return_full_text:
                    full = job.prompt + full
                event["generated_text"] = full
                if job.details:
                    event["details"] = {"finish_reason": job.finish,
                                        "generated_tokens": len(job.tokens),
                                        "input_length": len(job.prompt_ids), "seed": job.seed}
            return _json_line(event)

        async def produce(write: Callable[[bytes], Awaitable[None]],
                          control: _StreamControl) -> None:
            await self._run_tokens(record, job, fault, write, control, render,
                                   lambda message, kind: _json_line(_error_body(message, kind)))

        return _EventStream(produce, self._control(record))

    async def _generate(self, request: Request) -> Response:
        path = "/generate"
        try:
            body: _GenerateRequest = await self._body(request, _GenerateRequest)
        except _Invalid as exc:
            return self._error(422, exc.message, exc.error_type)
        record = self._new_record(path, body.inputs,
                                  body.parameters.model_dump(exclude_unset=True))
        fault = self._take_fault(path, streaming=False)
        if fault is not None:
            self._update(record, fault=fault)
            return self._status_fault(record, fault)
        if not self._acquire():
            return self._overloaded(record)
        try:
            job = self._validate(body.inputs, body.parameters, streaming=False)
        except _Invalid as exc:
            self._release()
            self._update(record, status=422, error_type=exc.error_type,
                         finished=time.monotonic())
            return self._error(422, f"Input validation error: {exc.message}", exc.error_type)
        try:
            await self._complete(record, job)
        finally:
            self._release()
        text = "".join(t for t, _, special in job.tokens if not special)
        if body.parameters.return_full_text:
            text = job.prompt + text
        answer: dict[str, Any] = {"generated_text": text}
        if job.details or body.parameters.decoder_input_details:
            prefill = []
            if body.parameters.decoder_input_details:
                prefill = [{"id": i, "text": t, "logprob": None}
                           for t, i in zip(self.tokenizer.tokenize(job.prompt), job.prompt_ids,
                                           strict=True)]
            answer["details"] = {
                "finish_reason": job.finish,
                "generated_tokens": len(job.tokens),
                "seed": job.seed,
                "prefill": prefill,
                "tokens": [{"id": i, "text": t, "logprob": 0.0, "special": s}
                           for t, i, s in job.tokens],
            }
        return JSONResponse(answer, headers={"x-prompt-tokens": str(len(job.prompt_ids)),
                                             "x-generated-tokens": str(len(job.tokens))})

    async def _complete(self, record: RequestRecord, job: _Job) -> None:
        """A non-streamed generation: the latency model's time, then everything at once."""
        hashes, prefill = self._prefill(record, job)
        service = prefill + self.latency.per_token * len(job.tokens)
        if service > 0:
            await asyncio.sleep(service)
        head = hashes[-1] if hashes else 0
        with self._lock:
            self.cache.add(PrefixCache.chain((i for _, i, s in job.tokens if not s), head))
            record.tokens_sent = len(job.tokens)
            record.finish_reason = job.finish
            record.service_seconds = service
            record.finished = time.monotonic()

    async def _info(self, request: Request) -> Response:
        return JSONResponse({
            "model_id": self.model_id,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_best_of": 2,
            "max_stop_sequences": self.max_stop_sequences,
            "max_input_tokens": self.max_input_tokens,
            "max_total_tokens": self.max_total_tokens,
            "validation_workers": 2,
            "max_client_batch_size": 4,
            "router": "specthink-loopback",
            "version": VERSION,
            "sha": None,
            "docker_label": None,
        })

    async def _health(self, request: Request) -> Response:
        if self.healthy:
            return Response(status_code=200)
        return self._error(503, "unhealthy", "healthcheck")

    def _simple_tokens(self, text: str) -> list[dict[str, Any]]:
        out = []
        position = 0
        for piece in self.tokenizer.tokenize(text):
            start = text.find(piece, position)
            start = position if start < 0 else start
            position = start + len(piece)
            out.append({"id": self.tokenizer.token_id(piece), "text": piece, "start": start,
                        "stop": position})
        return out

    async def _tokenize(self, request: Request) -> Response:
        try:
            body: _GenerateRequest = await self._body(request, _GenerateRequest)
        except _Invalid as exc:
            return self._error(422, exc.message, exc.error_type)
        return JSONResponse(self._simple_tokens(body.inputs))

    async def _chat_tokenize(self, request: Request) -> Response:
        try:
            raw = json.loads(await request.body())
        except ValueError:
            return self._error(422, "Failed to parse the request body as JSON", "validation")
        messages = raw.get("messages") if isinstance(raw, dict) else None
        tools = raw.get("tools") if isinstance(raw, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return self._error(422, "Failed to deserialize the JSON body into the target type: "
                               "missing field `messages`", "validation")
        if tools is not None and not isinstance(tools, list):
            return self._error(422, "`tools` must be a list", "validation")
        text = render_chatml(messages, tools)
        return JSONResponse({"tokenize_response": self._simple_tokens(text),
                             "templated_text": text})

    # ----------------------------------------------------------------- OpenAI endpoints

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": 0, "owned_by": self.model_id}]})

    async def _completions(self, request: Request) -> Response:
        path = "/v1/completions"
        try:
            body: _CompletionRequest = await self._body(request, _CompletionRequest)
        except _Invalid as exc:
            return self._error(422, exc.message, exc.error_type)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.suffix is not None:
            return self._error(422, "Suffix is not supported and can be achieved by "
                               "preprocessing the prompt.", "suffix not supported")
        if len(prompts) != 1:
            return self._error(422, "the loopback server serves exactly one prompt per request",
                               "batch size exceeded")
        prompt = prompts[0]
        # As TGI: temperature 0 means greedy, anything else samples; 100 tokens by default.
        greedy = body.temperature == 0.0
        params = _Parameters(
            max_new_tokens=body.max_tokens if body.max_tokens is not None else 100,
            do_sample=not greedy, temperature=None if greedy else body.temperature,
            top_p=body.top_p, seed=body.seed, stop=body.stop or [],
            repetition_penalty=body.repetition_penalty,
            frequency_penalty=body.frequency_penalty)
        record = self._new_record(path, prompt, body.model_dump(exclude_unset=True,
                                                                exclude={"prompt"}))
        fault = self._take_fault(path, streaming=body.stream)
        if fault is not None:
            self._update(record, fault=fault)
            if fault.kind == "status":
                return self._status_fault(record, fault)
        if not self._acquire():
            if body.stream:
                return self._in_band_error(record, *_OVERLOADED, done=True, permit=False)
            return self._overloaded(record)
        try:
            job = self._validate(prompt, params, streaming=body.stream)
        except _Invalid as exc:
            message = f"Input validation error: {exc.message}"
            if body.stream:
                return self._in_band_error(record, message, exc.error_type, done=True)
            self._release()
            self._update(record, status=422, error_type=exc.error_type,
                         finished=time.monotonic())
            return self._error(422, message, exc.error_type)
        created = int(time.time())
        envelope = {"object": "text_completion", "id": "", "created": created,
                    "model": self.model_id, "system_fingerprint": f"{VERSION}-native"}
        if not body.stream:
            try:
                await self._complete(record, job)
            finally:
                self._release()
            text = "".join(t for t, _, special in job.tokens if not special)
            return JSONResponse({
                **envelope,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": "stop" if job.finish == "eos_token" else job.finish}],
                "usage": _usage(len(job.prompt_ids), len(job.tokens)),
            })

        def render(index: int, token: tuple[str, int, bool], last: bool) -> bytes:
            # TGI sends the final token's text as is (e.g. "</s>") with its own finish reason
            # ("eos_token"), and an empty finish reason before.
            choice = {"index": 0, "text": token[0], "logprobs": None,
                      "finish_reason": job.finish if last else ""}
            chunk: dict[str, Any] = {**envelope, "choices": [choice]}
            if last:
                chunk["usage"] = _usage(len(job.prompt_ids), len(job.tokens))
            data = _json_line(chunk)
            return data + b"data:[DONE]\n\n" if last else data

        async def produce(write: Callable[[bytes], Awaitable[None]],
                          control: _StreamControl) -> None:
            await self._run_tokens(
                record, job, fault, write, control, render,
                lambda message, kind: _json_line(_error_body(message, kind)) + b"data:[DONE]\n\n")

        return _EventStream(produce, self._control(record))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ())) or "body"
    return f"{where}: {error.get('msg', 'invalid')}"
