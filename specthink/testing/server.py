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

This module is the server itself (lifecycle, test controls, endpoints); its parts live in
private modules: ``_wire`` (request bodies, TGI's validation, the JSON answers), ``_faults``,
``_accounting`` (latency model, prefix cache, request records), ``_generation`` (running one
request) and ``_streaming`` (event-stream responses).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from specthink.testing._accounting import LatencyModel, PrefixCache, RequestRecord
from specthink.testing._faults import OVERLOADED, STATUS_BODIES, Fault
from specthink.testing._faults import FaultKind as FaultKind
from specthink.testing._generation import Generation, RenderError, RenderToken, continuation
from specthink.testing._streaming import EventStream, StreamControl, Write
from specthink.testing._wire import (
    DONE,
    VERSION,
    CompletionRequest,
    GenerateRequest,
    Invalid,
    Job,
    Parameters,
    completion_answer,
    completion_chunk,
    completion_envelope,
    completion_prompt,
    error_body,
    error_response,
    generate_response,
    json_line,
    read_body,
    read_chat_body,
    render_chatml,
    simple_tokens,
    tgi_stream_event,
    validate,
)
from specthink.testing._wire import EOS_ID as EOS_ID
from specthink.testing._wire import EOS_TEXT as EOS_TEXT
from specthink.testing._wire import GENERATION_PATHS as GENERATION_PATHS
from specthink.testing._wire import TGIFinish as TGIFinish
from specthink.testing.models import TextModel, Tokenizer

__all__ = [
    "Fault",
    "LatencyModel",
    "LoopbackServer",
    "PrefixCache",
    "RequestRecord",
    "render_chatml",
]
# EOS_ID, EOS_TEXT, GENERATION_PATHS, TGIFinish and FaultKind are imported "as" themselves above:
# they were defined here before the split, and stay importable from here.


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
            # A closed transport releases its socket in a callback of the next loop turns; let
            # them run before the loop stops, or the sockets are left for the GC to warn about.
            for _ in range(3):
                await asyncio.sleep(0)

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

    def _connections(self) -> list[Any]:
        server = self._server
        return list(server.server_state.connections) if server is not None else []

    def _token_ids(self, text: str) -> list[int]:
        return [self.tokenizer.token_id(piece) for piece in self.tokenizer.tokenize(text)]

    def _validate(self, inputs: str, params: Parameters, *, streaming: bool) -> Job:
        prompt_ids, max_new_tokens = validate(
            inputs, params, streaming=streaming, tokenize=self._token_ids,
            max_input_tokens=self.max_input_tokens, max_total_tokens=self.max_total_tokens,
            max_stop_sequences=self.max_stop_sequences)
        tokens, finish = continuation(self.model, self.tokenizer, inputs, max_new_tokens,
                                      params.stop)
        return Job(inputs, prompt_ids, tokens, finish, max_new_tokens, params.reported_seed,
                   params.details)

    def _admit(self, path: str, prompt: str, params: Parameters, parameters: dict[str, Any],
               *, streaming: bool, done: bool = False) -> Generation | Response:
        """Record a generation request, then, as TGI: answer a status fault, take a concurrency
        permit (or answer "overloaded") and validate. ``done`` ends in-stream errors with
        ``[DONE]`` (OpenAI streams)."""
        record = self._new_record(path, prompt, parameters)
        fault = self._take_fault(path, streaming=streaming)
        if fault is not None:
            self._update(record, fault=fault)
            if fault.kind == "status":
                return self._status_fault(record, fault)
        if not self._acquire():
            if streaming:
                return self._in_band_error(record, *OVERLOADED, done=done, permit=False)
            self._update(record, status=429, error_type="overloaded", finished=time.monotonic())
            return error_response(429, *OVERLOADED)
        try:
            job = self._validate(prompt, params, streaming=streaming)
        except Invalid as exc:
            message = f"Input validation error: {exc.message}"
            if streaming:
                return self._in_band_error(record, message, exc.error_type, done=done)
            self._release()
            self._update(record, status=422, error_type=exc.error_type,
                         finished=time.monotonic())
            return error_response(422, message, exc.error_type)
        return Generation(record, job, fault, self._lock, self)

    async def _complete(self, generation: Generation) -> None:
        try:
            await generation.complete()
        finally:
            self._release()

    def _status_fault(self, record: RequestRecord, fault: Fault) -> JSONResponse:
        code = fault.status_code or 500
        message, error_type = STATUS_BODIES.get(code, (f"injected status {code}", "injected"))
        self._update(record, status=code, error_type=error_type, finished=time.monotonic())
        headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
        return error_response(code, message, error_type, headers)

    def _in_band_error(self, record: RequestRecord, message: str, error_type: str,
                       *, done: bool = False, permit: bool = True) -> EventStream:
        self._update(record, error_type=error_type)

        async def produce(write: Write, control: StreamControl) -> None:
            await write(json_line(error_body(message, error_type)))
            if done:
                await write(DONE)

        return EventStream(produce, self._control(record, permit=permit))

    def _token_stream(self, generation: Generation, render: RenderToken,
                      render_error: RenderError) -> EventStream:
        async def produce(write: Write, control: StreamControl) -> None:
            await generation.stream(write, control, render, render_error)

        return EventStream(produce, self._control(generation.record))

    def _control(self, record: RequestRecord, *, permit: bool = True) -> StreamControl:
        return StreamControl(record, self._lock, self._connections,
                             release=self._release if permit else None)

    @property
    def in_flight(self) -> int:
        """Generations holding a concurrency permit now (read by the latency model)."""
        return self._active

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

    async def _admit_generate(self, request: Request, path: str, *,
                              streaming: bool) -> tuple[Parameters, Generation] | Response:
        """Read a TGI generate request and admit it (see :meth:`_admit`)."""
        body = await read_body(request, GenerateRequest)
        if isinstance(body, Response):
            return body
        params = body.parameters
        admitted = self._admit(path, body.inputs, params, params.model_dump(exclude_unset=True),
                               streaming=streaming)
        return admitted if isinstance(admitted, Response) else (params, admitted)

    async def _generate_stream(self, request: Request) -> Response:
        admitted = await self._admit_generate(request, "/generate_stream", streaming=True)
        if isinstance(admitted, Response):
            return admitted
        params, generation = admitted
        job, full_text = generation.job, bool(params.return_full_text)
        return self._token_stream(
            generation, lambda index, token, last: tgi_stream_event(job, index, token, last,
                                                                    full_text=full_text),
            lambda message, kind: json_line(error_body(message, kind)))

    async def _generate(self, request: Request) -> Response:
        admitted = await self._admit_generate(request, "/generate", streaming=False)
        if isinstance(admitted, Response):
            return admitted
        params, generation = admitted
        await self._complete(generation)
        return generate_response(generation.job, params, self.tokenizer)

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
        return error_response(503, "unhealthy", "healthcheck")

    async def _tokenize(self, request: Request) -> Response:
        body = await read_body(request, GenerateRequest)
        if isinstance(body, Response):
            return body
        return JSONResponse(simple_tokens(self.tokenizer, body.inputs))

    async def _chat_tokenize(self, request: Request) -> Response:
        chat = read_chat_body(await request.body())
        if isinstance(chat, Response):
            return chat
        text = render_chatml(*chat)
        return JSONResponse({"tokenize_response": simple_tokens(self.tokenizer, text),
                             "templated_text": text})

    # ----------------------------------------------------------------- OpenAI endpoints

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": 0, "owned_by": self.model_id}]})

    async def _completions(self, request: Request) -> Response:
        body = await read_body(request, CompletionRequest)
        if isinstance(body, Response):
            return body
        prompt = completion_prompt(body)
        if isinstance(prompt, Response):
            return prompt
        admitted = self._admit("/v1/completions", prompt, body.to_parameters(),
                               body.model_dump(exclude_unset=True, exclude={"prompt"}),
                               streaming=body.stream, done=True)
        if isinstance(admitted, Response):
            return admitted
        job = admitted.job
        envelope = completion_envelope(self.model_id, int(time.time()))
        if not body.stream:
            await self._complete(admitted)
            return JSONResponse(completion_answer(envelope, job))
        return self._token_stream(
            admitted, lambda index, token, last: completion_chunk(envelope, job, token, last),
            lambda message, kind: json_line(error_body(message, kind)) + DONE)
