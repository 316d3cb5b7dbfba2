"""The ASGI application of ``specthink serve`` (Starlette): routes, the API-key check, the body
limit, the concurrency limit, and a response that cancels the engine when the client hangs up.

``create_app(settings)`` builds it; ``app_from_environment()`` is the factory uvicorn's worker
processes call (``--workers``), reading the settings the CLI left in the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from specthink.backends.base import Backend
from specthink.engine import SpeculativeThinker
from specthink.errors import BackendError, ConfigError
from specthink.serve import _http, errors
from specthink.serve.errors import APIError
from specthink.serve.metrics import (
    CONTENT_TYPE_LATEST,
    ServeMetrics,
    multiprocess,
    multiprocess_dir,
)
from specthink.serve.protocol import ChunkWriter, parse_request
from specthink.serve.responses import (
    EventWriter,
    ResponsesCall,
    input_items_page,
    not_found,
    parse_responses_request,
    prepare_response,
    response_events,
)
from specthink.serve.serving import ChatCall, prepare, stream_events, whole_answer
from specthink.serve.settings import ServeSettings
from specthink.serve.store import ResponseStore
from specthink.trace import Result

__all__ = ["app_from_environment", "build_backends", "create_app"]

logger = logging.getLogger("specthink.serve")

WARM_UP_SECONDS = 20.0
"""How long start-up waits for the model servers' limits and templates (``warm_up``) before
serving anyway."""

JSON = "application/json"
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


INSTRUCT_HINT = (
    "the small model's chat template opens no reasoning (%s), and the rules (mode 'reasoning', "
    "as the default 'paper') hand over only inside one: if the small model does not reason "
    "(an instruct model), no takeover will happen; serve it with --rules paper_instruct "
    "(SPECTHINK_RULES=paper_instruct), where the target writes the opening. A model that "
    "writes %s itself (Qwen3) needs nothing.")
THINKING_OFF_HINT = (
    "the small model's chat template closes the reasoning before the model writes (its "
    "thinking switch is off), and the rules (mode 'reasoning', as the default 'paper') hand "
    "over only inside one: no takeover will happen; leave the thinking on (template_kwargs) or "
    "serve it with --rules paper_instruct (SPECTHINK_RULES=paper_instruct), where the target "
    "writes the opening.")


async def _suggest_instruct_rules(thinker: SpeculativeThinker) -> None:
    """Warn, once at start, when the reasoning rules meet a small model that will not reason:
    its prompt opens no reasoning, and its output format does not say the model opens one
    itself (``OutputFormat.model_opens_reasoning``: harmony, Mistral ``[THINK]``, Gemma 4
    write their opener; a template with the thinking switched off closes it in the prompt).

    A suggestion rather than a switch: the default format cannot tell an instruct model from a
    hybrid one that opens its reasoning itself, and handing a hybrid's opening to the target
    would change what it answers."""
    from specthink import prompts

    if thinker.rules.mode != "reasoning":
        return
    try:
        prompt = await prompts.render_prompt(thinker.templates["small"], [
            {"role": "user", "content": "Hello"}], None, thinker.small)
    except (BackendError, ConfigError):
        return  # the first request reports it
    output_format = thinker.output_format
    if output_format.opened_by(prompt) or output_format.model_opens_reasoning(prompt):
        return
    if output_format.template is not None and output_format.template.closes_reasoning(prompt):
        logger.warning(THINKING_OFF_HINT)
    else:
        opening = output_format.reasoning.open
        logger.warning(INSTRUCT_HINT, opening, opening)


def build_backends(settings: ServeSettings) -> tuple[Backend, Backend]:
    """The two model servers' backends, from the core's one factory."""
    return settings.build_backends()


def _json(body: dict[str, Any] | bytes, status: int = 200,
          headers: dict[str, str] | None = None) -> Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content, status_code=status, media_type=JSON, headers=headers)


def _error(error: APIError) -> Response:
    return _json(error.json(), error.status, error.headers)


class _State:
    """What the routes share: settings, metrics, the engines, the requests in flight."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.thinker: SpeculativeThinker | None = None
        self.in_flight = 0
        self.created = int(time.time())
        self.store = ResponseStore(settings.responses_store, settings.responses_ttl)
        self._keys = tuple(key.get_secret_value().encode() for key in settings.api_keys)

    def authorized(self, request: Request) -> bool:
        if not self._keys:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        offered = given.strip().encode()
        # Every key is compared, in constant time each, so neither the time nor an early exit
        # tells how close a guess came or which key matched.
        matches = [hmac.compare_digest(offered, key) for key in self._keys]
        return any(matches)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class _EndsStreams(Protocol):
    """What ends a stream already under way with an error: the chat chunks' and the Responses
    API events' writers alike."""

    def error(self, error: APIError) -> bytes: ...

    def done(self) -> bytes: ...


class _ChatResponse(Response):
    """Runs one chat request while it watches for the client hanging up: a disconnect cancels
    the engine, which closes both model servers' streams (that is how they learn to stop)."""

    def __init__(self, state: _State, call: ChatCall, started: float) -> None:
        self.state = state
        self.call = call
        self.started = started
        self.background = None
        self.status = 200
        self._writer: _EndsStreams | None = None
        """Set once the stream's status line is out: an error must then be a chunk."""
        self._started = False
        self._ended = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._started = True
            elif not message.get("more_body", False):
                self._ended = True
            await send(message)

        work = asyncio.ensure_future(self._run(sending))
        hung_up = asyncio.ensure_future(_disconnected(receive))
        try:
            try:
                await asyncio.wait((work, hung_up), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                # uvicorn cancels the requests still running when --drain-timeout ends (and
                # would log the CancelledError as a crash): the answer ends as a proper one.
                await self._cut_at_shutdown(send, work)
                return
            if not work.done():
                self.status = 499  # nginx's "client closed request", for the metrics only
                work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
        finally:
            for task in (work, hung_up):
                task.cancel()
            await asyncio.gather(work, hung_up, return_exceptions=True)
            state = self.state
            state.in_flight -= 1
            metrics = state.metrics
            metrics.in_flight.dec()
            metrics.requests.labels(str(self.status)).inc()
            metrics.duration.observe(time.perf_counter() - self.started)

    async def _cut_at_shutdown(self, send: Send, work: asyncio.Future[None]) -> None:
        """End the answer in flight with an error (a 503, or an error chunk and ``[DONE]`` in a
        stream already under way) after stopping the engine, which closes both model
        servers' streams. The cancellation is consumed: this is the request's last act."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        if self._ended or (self._started and self._writer is None):
            return
        error = APIError(503, "The server is shutting down: the answer was cut when its drain "
                              "timeout ended; send the request again.", type="server_error",
                         code="server_shutting_down")
        self.status = error.status
        writer = self._writer
        with contextlib.suppress(OSError, RuntimeError):  # the client may be gone as well
            if writer is None:
                await self._send_error(send, error)
            else:
                await send({"type": "http.response.body",
                            "body": writer.error(error) + writer.done()})

    async def _run(self, send: Send) -> None:
        if self.call.stream:
            await self._stream(send)
            return
        try:
            result = await self._result()
        except Exception as exc:
            await self._send_error(send, self._failed(exc))
            return
        self._observe(result)
        body = orjson.dumps(self._whole(result))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", JSON.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _result(self) -> Result:
        return await self.call.result()

    def _whole(self, result: Result) -> dict[str, Any]:
        """The whole answer's JSON object."""
        return whole_answer(self.call, result, self.state.settings)

    async def _stream(self, send: Send) -> None:
        events = self.call.events()
        try:
            try:
                # Waiting for the engine's first event before the status line makes a failure
                # before any text (a model server down, a prompt too long) a real HTTP status.
                first = await anext(events)
            except Exception as exc:
                await self._send_error(send, self._failed(exc))
                return
            writer = ChunkWriter(self.state.settings.model_name,
                                 self.state.settings.reasoning_field)
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            self._writer = writer
            await send({"type": "http.response.body", "body": writer.role(), "more_body": True})
            metrics = self.state.metrics
            started = self.started

            def first_text() -> None:
                metrics.time_to_first_token.observe(time.perf_counter() - started)

            result: Result | None = None
            try:
                async for data, result in stream_events(self.call, first, events, writer,
                                                        first_text):
                    await send({"type": "http.response.body", "body": data,
                                "more_body": result is None})
            except Exception as exc:
                error = self._failed(exc)
                await send({"type": "http.response.body",
                            "body": writer.error(error) + writer.done()})
                return
            if result is not None:
                self._observe(result)
        finally:
            await events.aclose()

    def _failed(self, exc: BaseException) -> APIError:
        if isinstance(exc, BackendError):
            self.state.metrics.upstream_failed(exc.role)
        error = errors.from_exception(exc)
        self.status = error.status
        return error

    async def _send_error(self, send: Send, error: APIError) -> None:
        body = error.json()
        headers = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _observe(self, result: Result) -> None:
        self.state.metrics.observe_statistics(result.stats)


class _ResponsesResponse(_ChatResponse):
    """A ``POST /v1/responses`` answer: the chat path's engine run and hang-up handling, with
    the Responses API's response object or event stream, kept in the store when asked."""

    def __init__(self, state: _State, call: ResponsesCall, started: float) -> None:
        super().__init__(state, call.chat, started)
        self.responses = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.state.metrics.responses.labels(str(self.status)).inc()

    async def _result(self) -> Result:
        return await self.responses.result()

    def _whole(self, result: Result) -> dict[str, Any]:
        answer = self.responses.whole(result)
        self.responses.keep(self.state.store, answer)
        return answer

    async def _stream(self, send: Send) -> None:
        events = self.call.events()
        try:
            try:
                first = await anext(events)  # a failure before any text is a real status
            except Exception as exc:
                await self._send_error(send, self._failed(exc))
                return
            writer = EventWriter(self.responses)
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            self._writer = writer
            await send({"type": "http.response.body", "body": writer.start(), "more_body": True})
            metrics, started = self.state.metrics, self.started

            def first_text() -> None:
                metrics.time_to_first_token.observe(time.perf_counter() - started)

            result: Result | None = None
            try:
                async for data, result in response_events(self.responses, first, events,
                                                          writer, first_text):
                    await send({"type": "http.response.body", "body": data,
                                "more_body": result is None})
            except Exception as exc:
                await send({"type": "http.response.body",
                            "body": writer.error(self._failed(exc)) + writer.done()})
            if result is not None:
                self._observe(result)
            if writer.final is not None:
                self.responses.keep(self.state.store, writer.final)
        finally:
            await events.aclose()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (or the response is complete)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def create_app(settings: ServeSettings, *, backends: tuple[Backend, Backend] | None = None,
               metrics: ServeMetrics | None = None, freeze_heap: bool = False) -> Starlette:
    """The application. ``backends`` replaces the two built from the settings (tests,
    embedding); they are closed when the application shuts down either way.

    ``freeze_heap`` (what ``specthink serve`` asks for, never an embedding application's
    default): once started, everything alive is moved out of the cyclic collector's sight
    (``gc.freeze()``), so a full collection under load walks the requests' objects only, not
    the start-up heap of modules, classes and settings; undone at shutdown. As gunicorn's
    and Instagram's servers do: it belongs to the process that owns the heap.
    """
    state = _State(settings, metrics or ServeMetrics())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        small, target = backends or build_backends(settings)
        thinker = settings.build(backends=(small, target))
        thinker.on_request = state.metrics.upstream_attempt  # every attempt, as it goes out
        state.thinker = thinker
        try:
            await asyncio.wait_for(thinker.warm_up(), WARM_UP_SECONDS)
        except (BackendError, ConfigError, TimeoutError) as exc:
            # Model servers often start after this one (compose, a rollout): not fatal.
            logger.warning("the model servers could not be asked at start (%s); the first "
                           "request asks again", exc or "no answer in time")
        else:
            await _suggest_instruct_rules(thinker)
        if freeze_heap:  # after the warm-up, whose connections and templates live on
            gc.collect()  # start-up garbage is freed, not frozen
            gc.freeze()
        try:
            yield
        finally:
            if freeze_heap:
                gc.unfreeze()
            state.thinker = None
            await thinker.aclose()
            if multiprocess_dir() is not None:
                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def ready(model: str) -> SpeculativeThinker:
        """The engine, once the request names the served model and the server is up."""
        if model != settings.model_name:
            raise errors.model_not_found(model, settings.model_name)
        thinker = state.thinker
        if thinker is None:
            raise APIError(503, "The server is starting or stopping.",
                           type="upstream_unavailable", code="not_ready")
        return thinker

    def admit() -> None:
        """Room for one more request in this worker (``--max-concurrency``), else a 429."""
        limit = settings.max_concurrency
        if limit is not None and state.in_flight >= limit:
            raise errors.too_busy(limit)
        state.in_flight += 1
        state.metrics.in_flight.inc()

    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        try:
            if not state.authorized(request):
                raise errors.unauthorized()
            chat = parse_request(await _read_body(request, settings.max_body_bytes))
            thinker = ready(chat.model)
            session = request.headers.get("x-session-id") or chat.user
            call = prepare(chat, settings, thinker, session_id=session)
            admit()
        except Exception as exc:
            error = errors.from_exception(exc)  # a bug here is a 500 like anywhere else
            state.metrics.requests.labels(str(error.status)).inc()
            return _error(error)
        return _ChatResponse(state, call, started)

    async def responses(request: Request) -> Response:
        started = time.perf_counter()
        try:
            if not state.authorized(request):
                raise errors.unauthorized()
            asked = parse_responses_request(await _read_body(request, settings.max_body_bytes))
            thinker = ready(asked.model)
            session = (request.headers.get("x-session-id") or asked.prompt_cache_key
                       or asked.user)
            call = prepare_response(asked, state.store, lambda chat: prepare(
                chat, settings, thinker, session_id=session))
            admit()
        except Exception as exc:
            error = errors.from_exception(exc)
            state.metrics.requests.labels(str(error.status)).inc()
            state.metrics.responses.labels(str(error.status)).inc()
            return _error(error)
        return _ResponsesResponse(state, call, started)

    async def stored_response(request: Request) -> Response:
        if not state.authorized(request):
            return _error(errors.unauthorized())
        response_id = request.path_params["response_id"]
        if request.method == "DELETE":
            if not state.store.delete(response_id):
                return _error(not_found(response_id, "response_id"))
            return _json({"id": response_id, "object": "response", "deleted": True})
        stored = state.store.get(response_id)
        if stored is None:
            return _error(not_found(response_id, "response_id"))
        return _json(stored.response)

    async def input_items(request: Request) -> Response:
        if not state.authorized(request):
            return _error(errors.unauthorized())
        response_id = request.path_params["response_id"]
        stored = state.store.get(response_id)
        if stored is None:
            return _error(not_found(response_id, "response_id"))
        try:
            return _json(input_items_page(stored.input_items, request.query_params))
        except APIError as exc:
            return _error(exc)

    def _model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": state.created,
                "owned_by": "specthink"}

    async def models(request: Request) -> Response:
        if not state.authorized(request):
            return _error(errors.unauthorized())
        return _json({"object": "list", "data": [_model_card()]})

    async def model(request: Request) -> Response:
        if not state.authorized(request):
            return _error(errors.unauthorized())
        name = request.path_params["name"]
        if name != settings.model_name:
            return _error(errors.model_not_found(name, settings.model_name))
        return _json(_model_card())

    async def health(request: Request) -> Response:
        ready = state.thinker is not None
        return _json({"status": "ok" if ready else "starting"}, 200 if ready else 503)

    async def prometheus(request: Request) -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            error = APIError(404, f"No route {request.url.path}.", type="not_found_error",
                             code="unknown_url")
        else:
            error = APIError(exc.status_code, str(exc.detail), code="method_not_allowed"
                             if exc.status_code == 405 else None)
        return _error(error)

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(errors.from_exception(exc))

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/responses/{response_id}", stored_response, methods=["GET", "DELETE"]),
            Route("/v1/responses/{response_id}/input_items", input_items, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{name:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )


def header_limits(settings: ServeSettings) -> _http.HeaderLimits:
    """The request-head limits of the settings, for :func:`specthink.serve._http.configure`."""
    return _http.HeaderLimits(max_bytes=settings.max_header_bytes,
                              timeout=settings.header_timeout)


def app_from_environment() -> Starlette:
    """The factory each ``--workers`` process calls (``uvicorn ... --factory``); it also sets
    the worker's request-head limits (its HTTP protocol reads them)."""
    settings = ServeSettings.from_environment()
    _http.configure(header_limits(settings))
    return create_app(settings, freeze_heap=True)
