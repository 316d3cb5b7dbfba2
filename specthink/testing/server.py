"""An inference server on loopback whose "model" is a deterministic function of the prompt (see
:mod:`specthink.testing.models`).

It speaks TGI's wire format by default (validated against TGI's OpenAPI file by the test suite),
or the endpoints of vLLM, llama.cpp's server or llama-cpp-python's server (``flavor``), each
with ``/v1/completions``, over real sockets (uvicorn in a background thread), and adds what
tests and benchmarks need:

- a latency model (prefill per uncached prompt token, then a cost per token),
- a prefix cache matching exact token ids, counting reused vs. recomputed prompt tokens,
- fault injection (error statuses, in-stream error events, dropped connections, stalls),
- a record of every generation request, including whether the client hung up early, and a
  record of every request of any kind (:attr:`LoopbackServer.calls`),
- a chat template of the served model's family (:mod:`specthink.testing._templates`) behind the
  flavor's template endpoints, and the BOS its tokenizer adds to a raw prompt.

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
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specthink.testing import _dialects
from specthink.testing._accounting import (
    CallRecord,
    LatencyModel,
    PrefixCache,
    RequestRecord,
    recorded_headers,
)
from specthink.testing._dialects import FLAVORS, Flavor, Served
from specthink.testing._faults import OVERLOADED, STATUS_BODIES, Fault
from specthink.testing._generation import Generation, RenderError, RenderToken, continuation
from specthink.testing._streaming import EventStream, StreamControl, Write
from specthink.testing._templates import (
    CHAT_TEMPLATES,
    AnyServerTemplate,
    JinjaChatTemplate,
    TemplateName,
    TokenStrings,
    Vocabulary,
    template_for_model,
)
from specthink.testing._wire import (
    DONE,
    GENERATION_PATHS,
    LLAMA_CPP_RENDERED,
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
from specthink.testing.models import TextModel, Tokenizer

__all__ = [
    "CallRecord",
    "Fault",
    "LatencyModel",
    "LoopbackServer",
    "PrefixCache",
    "RequestRecord",
    "render_chatml",
]


class LoopbackServer:
    """A TGI-protocol (or vLLM, llama.cpp, llama-cpp-python) server on 127.0.0.1 serving
    ``model``.

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
    - ``chat_template`` names the served model's template (``"chatml"``, ``"qwen3"`` whose
      generation prompt opens ``<think>``, ``"deepseek-r1"``, ``"llama3"``); by default the one
      ``model_id`` implies (DeepSeek-R1, Qwen3, Llama 3, else ChatML). A template with a BOS
      text (DeepSeek-R1, Llama 3) makes the tokenizer prepend that BOS to every raw prompt, as
      the real servers do (vLLM: unless ``add_special_tokens`` is false); records show the
      result in :attr:`RequestRecord.model_input`. A :class:`JinjaChatTemplate` serves a
      model's real Jinja template instead, with its special and stop tokens: the model's
      output is cut into those tokens, vLLM's ``/v1/completions`` leaves special tokens out of
      the text unless ``skip_special_tokens`` is false, and a stop token ends the generation
      without ever being in the text.
    - ``token_strings``: how vLLM's ``return_token_strs`` spells tokens (``"byte-level"`` BPE,
      or ``"sentencepiece"``).

    Endpoints of every flavor: ``/v1/completions`` (streamed or not) and ``/v1/models``; then

    - ``"tgi"`` (the default): ``/generate_stream``, ``/generate``, ``/info``, ``/health``,
      ``/tokenize`` and ``/chat_tokenize`` (with TGI's ``tool_choice``);
    - ``"vllm"``: ``/health``, ``/tokenize`` (a ``prompt``, or ``messages`` through the chat
      template) and ``/detokenize``; ``/v1/models`` reports ``max_model_len``;
    - ``"llamacpp"``: ``/health``, ``/props``, ``/tokenize``, ``/detokenize`` and
      ``/apply-template``;
    - ``"llama-cpp-python"``: ``/extras/tokenize``, ``/extras/tokenize/count`` and
      ``/extras/detokenize`` (no template endpoint: a 404, as the real one).

    Generation requests are kept in :attr:`records`, every request in :attr:`calls`; faults are
    queued with :meth:`inject`; :meth:`reset` forgets all three and the cache.
    """

    def __init__(self, model: TextModel, *, tokenizer: Tokenizer | None = None,
                 latency: LatencyModel | None = None, model_id: str = "specthink/scripted",
                 max_input_tokens: int = 4096, max_total_tokens: int = 8192,
                 max_stop_sequences: int = 4, max_concurrent_requests: int = 1024,
                 cache_capacity: int | None = 1_000_000, host: str = "127.0.0.1",
                 port: int = 0, flavor: Flavor = "tgi",
                 chat_template: TemplateName | JinjaChatTemplate | None = None,
                 token_strings: TokenStrings = "byte-level") -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}; got {flavor!r}")
        if isinstance(chat_template, str) and chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)}; "
                             f"got {chat_template!r}")
        if token_strings not in ("byte-level", "sentencepiece"):
            raise ValueError(f"token_strings must be 'byte-level' or 'sentencepiece'; "
                             f"got {token_strings!r}")
        self.model = model
        self.flavor: Flavor = flavor
        self.template: AnyServerTemplate = (
            chat_template if isinstance(chat_template, JinjaChatTemplate)
            else CHAT_TEMPLATES[chat_template] if chat_template is not None
            else template_for_model(model_id))
        """The served model's chat template (its ``bos_token`` is what the tokenizer adds)."""
        self.token_strings: TokenStrings = token_strings
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
        self.vocabulary = Vocabulary(self.tokenizer)
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._calls: list[CallRecord] = []
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
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            *self._flavor_routes(),
        ])

    def _flavor_routes(self) -> list[Route]:
        if self.flavor == "tgi":
            return [
                Route("/generate_stream", self._generate_stream, methods=["POST"]),
                Route("/generate", self._generate, methods=["POST"]),
                Route("/info", self._info, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/chat_tokenize", self._chat_tokenize, methods=["POST"]),
            ]
        if self.flavor == "vllm":
            return [
                Route("/health", self._health, methods=["GET"]),
                Route("/tokenize", self._dialect(_dialects.vllm_tokenize), methods=["POST"]),
                Route("/detokenize", self._dialect(_dialects.vllm_detokenize),
                      methods=["POST"]),
            ]
        if self.flavor == "llamacpp":
            return [
                Route("/health", self._health, methods=["GET"]),
                Route("/props", self._props, methods=["GET"]),
                Route("/tokenize", self._dialect(_dialects.llamacpp_tokenize),
                      methods=["POST"]),
                Route("/detokenize", self._dialect(_dialects.llamacpp_detokenize),
                      methods=["POST"]),
                Route("/apply-template", self._dialect(_dialects.llamacpp_apply_template),
                      methods=["POST"]),
            ]
        return [
            Route("/extras/tokenize", self._dialect(_dialects.python_tokenize),
                  methods=["POST"]),
            Route("/extras/tokenize/count", self._dialect(
                lambda body, served: _dialects.python_tokenize(body, served, count=True)),
                  methods=["POST"]),
            Route("/extras/detokenize", self._dialect(_dialects.python_detokenize),
                  methods=["POST"]),
        ]

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
        config = uvicorn.Config(self._logging_calls(self.app), host=self.host, port=self.port,
                                lifespan="off", http="h11", loop="asyncio", log_level="warning",
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
        """Queue faults for the next matching generation requests (FIFO); a status fault whose
        ``path`` is another endpoint (``/info``, ``/tokenize``, ...) answers that endpoint's."""
        with self._lock:
            self._faults.extend([fault, fault.times] for fault in faults)

    @property
    def records(self) -> list[RequestRecord]:
        """A snapshot of every generation request so far, oldest first."""
        with self._lock:
            return [dataclasses.replace(record) for record in self._records]

    @property
    def calls(self) -> list[CallRecord]:
        """A snapshot of every request so far (``/info``, ``/tokenize``, ... and generations),
        in order of arrival: what a client asked of this server, e.g. before its first
        generation request."""
        with self._lock:
            return [dataclasses.replace(call) for call in self._calls]

    def calls_to(self, path: str) -> list[CallRecord]:
        """The requests so far to ``path``."""
        return [call for call in self.calls if call.path == path]

    @property
    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return [fault for fault, _ in self._faults]

    def reset(self) -> None:
        """Forget records, calls, cached prefixes and pending faults."""
        with self._lock:
            self._records.clear()
            self._calls.clear()
            self._faults.clear()
            self.cache.clear()

    # ----------------------------------------------------------------- plumbing

    @property
    def served(self) -> Served:
        """What the flavor's tokenizer and template endpoints serve."""
        return Served(self.model_id, self.template, self.tokenizer, self.vocabulary,
                      self.max_total_tokens, self.token_strings)

    def _dialect(self, endpoint: Callable[[Any, Served], _dialects.Answer],
                 ) -> Callable[[Request], Awaitable[Response]]:
        """A route for one of the other servers' JSON endpoints."""
        async def route(request: Request) -> Response:
            try:
                body = json.loads(await request.body())
            except ValueError:
                body = None
            status, answer = endpoint(body, self.served)
            return JSONResponse(answer, status_code=status)

        return route

    def _take_fault(self, path: str, streaming: bool, *,
                    auxiliary: bool = False) -> Fault | None:
        """The next fault for a request to ``path``; for an ``auxiliary`` endpoint (not a
        generation), only a status fault naming that path."""
        with self._lock:
            for entry in self._faults:
                fault = entry[0]
                if auxiliary and (fault.path != path or fault.kind != "status"):
                    continue
                if fault.matches(path, streaming):
                    entry[1] -= 1
                    if entry[1] <= 0:
                        self._faults.remove(entry)
                    return fault  # type: ignore[no-any-return]
        return None

    def _logging_calls(self, app: ASGIApp) -> ASGIApp:
        """``app``, keeping a :class:`CallRecord` of each HTTP request before it is served, and
        its status once the answer starts."""
        async def logged(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope["path"]
            generation = path in GENERATION_PATHS
            call = CallRecord(scope["method"], path, recorded_headers(scope["headers"]),
                              time.monotonic(), generation)
            with self._lock:
                self._calls.append(call)

            async def record_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    call.status = message["status"]
                await send(message)

            fault = None if generation else self._take_fault(path, False, auxiliary=True)
            if fault is not None:  # /info, /tokenize, ... answering a status fault
                await _fault_response(fault)(scope, receive, record_status)
                return
            await app(scope, receive, record_status)

        return logged

    def _new_record(self, path: str, prompt: str, parameters: dict[str, Any],
                    headers: dict[str, str], model_input: str) -> RequestRecord:
        with self._lock:
            record = RequestRecord(self._next_id, path, prompt, parameters, time.monotonic(),
                                   headers=headers, model_input=model_input)
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

    def _validate(self, inputs: str, model_input: str, params: Parameters, *,
                  streaming: bool) -> Job:
        bos = model_input[:len(model_input) - len(inputs)]
        prompt_ids, max_new_tokens = validate(
            inputs, params, streaming=streaming,
            tokenize=lambda text: self._token_ids(bos + text),
            max_input_tokens=self.max_input_tokens, max_total_tokens=self.max_total_tokens,
            max_stop_sequences=self.max_stop_sequences)
        tokens, finish = continuation(self.model, self.tokenizer, model_input, max_new_tokens,
                                      params.stop, special_tokens=self.template.special_tokens,
                                      stop_tokens=self.template.stop_tokens)
        return Job(inputs, prompt_ids, tokens, finish, max_new_tokens, params.reported_seed,
                   params.details)

    def _admit(self, request: Request, path: str, prompt: str, params: Parameters,
               parameters: dict[str, Any], *, streaming: bool, done: bool = False,
               add_bos: bool = True) -> Generation | Response:
        """Record a generation request, then, as TGI: answer a status fault, take a concurrency
        permit (or answer "overloaded") and validate. ``done`` ends in-stream errors with
        ``[DONE]`` (OpenAI streams); ``add_bos`` prepends the tokenizer's BOS, as every server
        does to a raw prompt."""
        model_input = (self.template.bos_token if add_bos else "") + prompt
        record = self._new_record(path, prompt, parameters,
                                  recorded_headers(request.scope["headers"]), model_input)
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
            job = self._validate(prompt, model_input, params, streaming=streaming)
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
        response = _fault_response(fault)
        _, error_type = _fault_body(fault)
        self._update(record, status=response.status_code, error_type=error_type,
                     finished=time.monotonic())
        return response

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
        admitted = self._admit(request, path, body.inputs, params,
                               params.model_dump(exclude_unset=True), streaming=streaming)
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
        # TGI tokenizes with special tokens, as /generate does: BOS first where the model
        # has one.
        bos = self.template.bos_token
        head = [{"id": self.tokenizer.token_id(bos), "text": bos, "start": 0, "stop": 0}]
        inputs = body.inputs

        def answer() -> bytes:
            tokens = (head if bos else []) + simple_tokens(self.tokenizer, inputs)
            return json.dumps(tokens, separators=(",", ":")).encode()

        # Off the event loop, as TGI's tokenizer workers are: a long prompt's tokenization
        # does not hold up the streams this server is writing meanwhile.
        return Response(await asyncio.to_thread(answer), media_type="application/json")

    async def _chat_tokenize(self, request: Request) -> Response:
        chat = read_chat_body(await request.body())
        if isinstance(chat, Response):
            return chat
        text = self.template.render(*chat)
        return JSONResponse({"tokenize_response": simple_tokens(self.tokenizer, text),
                             "templated_text": text})

    # ----------------------------------------------------------------- OpenAI endpoints

    async def _models(self, request: Request) -> Response:
        return JSONResponse(_dialects.models_answer(self.flavor, self.served,
                                                    self.max_concurrent_requests))

    async def _props(self, request: Request) -> Response:
        return JSONResponse(_dialects.llamacpp_props(self.served, self.max_concurrent_requests))

    async def _completions(self, request: Request) -> Response:
        body = await read_body(request, CompletionRequest)
        if isinstance(body, Response):
            return body
        prompt = completion_prompt(body)
        if isinstance(prompt, Response):
            return prompt
        admitted = self._admit(request, "/v1/completions", prompt, body.to_parameters(),
                               body.model_dump(exclude_unset=True, exclude={"prompt"}),
                               streaming=body.stream, done=True,
                               add_bos=body.add_special_tokens or self.flavor != "vllm")
        if isinstance(admitted, Response):
            return admitted
        job = admitted.job
        job.keep_special = self.flavor == "vllm" and not body.skip_special_tokens
        if self.flavor == "llamacpp":
            job.preserved = LLAMA_CPP_RENDERED | frozenset(body.preserved_tokens or ())
        elif self.flavor == "llama-cpp-python":
            job.preserved = LLAMA_CPP_RENDERED  # its libllama's vocabulary; nothing else kept
        if self.flavor != "tgi":
            return await self._openai_completion(admitted, body)
        envelope = completion_envelope(self.model_id, int(time.time()))
        if not body.stream:
            await self._complete(admitted)
            return JSONResponse(completion_answer(envelope, job))
        return self._token_stream(
            admitted, lambda index, token, last: completion_chunk(envelope, job, token, last),
            lambda message, kind: json_line(error_body(message, kind)) + DONE)

    async def _openai_completion(self, admitted: Generation,
                                 body: CompletionRequest) -> Response:
        """vLLM's and llama.cpp's completions: OpenAI's finish reasons, the usage in a chunk of
        its own when asked for (llama-cpp-python's server never sends it in a stream)."""
        job = admitted.job
        envelope = _dialects.openai_envelope(self.model_id, int(time.time()))
        if not body.stream:
            await self._complete(admitted)
            return JSONResponse(_dialects.openai_completion_answer(envelope, job))
        usage = body.include_usage and self.flavor != "llama-cpp-python"
        return self._token_stream(
            admitted, lambda index, token, last: _dialects.openai_completion_chunk(
                envelope, job, token, last, include_usage=usage),
            _dialects.openai_error_event)


def _fault_body(fault: Fault) -> tuple[str, str]:
    """The TGI ``(error, error_type)`` a status fault answers with."""
    code = fault.status_code or 500
    return STATUS_BODIES.get(code, (f"injected status {code}", "injected"))


def _fault_response(fault: Fault) -> JSONResponse:
    """A status fault's answer (with a ``Retry-After`` header when it has one)."""
    headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
    return error_response(fault.status_code or 500, *_fault_body(fault), headers)
