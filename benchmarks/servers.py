"""Loopback TGI servers in child processes, so that the client's CPU time is measured apart
from theirs.

Each child runs a :class:`~specthink.testing.server.LoopbackServer` playing one role of the
traces and answers a few commands over a pipe: change the latency model, forget records and
cached prefixes, and hand back a compact summary of every generation request (the prompts stay
in the child; only their lengths and whether each extends the previous one come back).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import selectors
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

from benchmarks.traces import (
    SmallTraceModel,
    TargetTraceModel,
    TraceSpec,
    conversation_of,
    make_trace,
)
from specthink.testing.server import CallRecord, LatencyModel, LoopbackServer, RequestRecord

__all__ = ["RecordSummary", "ServerPair", "ServerProcess", "ServerSpec", "by_conversation",
           "summarize"]

Role = Literal["small", "target"]


@dataclass(frozen=True, slots=True)
class ServerSpec:
    role: Role
    trace: TraceSpec
    latency: LatencyModel
    max_input_tokens: int = 60_000
    max_total_tokens: int = 64_000


@dataclass(frozen=True, slots=True)
class RecordSummary:
    """One generation request as the server saw it, without its prompt text."""

    role: Role
    conversation: int
    path: str
    prompt_tokens: int
    cached_prompt_tokens: int
    tokens_sent: int
    finish_reason: str | None
    disconnected: bool
    started: float
    finished: float | None
    service_seconds: float
    previous_prompt_tokens: int | None
    """Prompt tokens of the previous request of the same conversation to this server."""
    extends_previous: bool | None
    """This prompt extends (or repeats) that previous prompt textually, so the prefix cache can
    serve all of it."""
    replica: int = 0
    """Which replica of its pool served it (scale-out runs tag it; one server per role is 0)."""

    @property
    def generated_text_tokens(self) -> int:
        """Tokens sent, without the closing end-of-sequence token."""
        return self.tokens_sent - (1 if self.finish_reason == "eos_token" else 0)


def summarize(role: Role, records: list[RequestRecord]) -> list[RecordSummary]:
    """Compact summaries of ``records``, each compared with the previous request of its
    conversation."""
    previous: dict[int, RequestRecord] = {}
    out = []
    for record in sorted(records, key=lambda r: r.id):
        conversation = conversation_of(record.prompt)
        before = previous.get(conversation)
        out.append(RecordSummary(
            role=role, conversation=conversation, path=record.path,
            prompt_tokens=record.prompt_tokens, cached_prompt_tokens=record.cached_prompt_tokens,
            tokens_sent=record.tokens_sent, finish_reason=record.finish_reason,
            disconnected=record.disconnected, started=record.started, finished=record.finished,
            service_seconds=record.service_seconds,
            previous_prompt_tokens=None if before is None else before.prompt_tokens,
            extends_previous=None if before is None else record.prompt.startswith(before.prompt)))
        previous[conversation] = record
    return out


def _precise_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """An event loop policy whose loops wait with ``select``.

    epoll (asyncio's default) sleeps in whole milliseconds, rounding each wait up, so a server
    sleeping 5.45 ms per token would really take ~6 ms and charge the difference to "overhead".
    ``select`` waits in microseconds; with a few hundred sockets its scan is cheap.
    """

    class Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return asyncio.SelectorEventLoop(selectors.SelectSelector())

    return Policy()


def _model(role: Role, trace: TraceSpec) -> SmallTraceModel | TargetTraceModel:
    return SmallTraceModel(trace) if role == "small" else TargetTraceModel(trace)


def _serve(spec: ServerSpec, conn: Connection) -> None:
    """The child process: serve until told to stop."""
    asyncio.set_event_loop_policy(_precise_loop_policy())
    server = LoopbackServer(_model(spec.role, spec.trace), latency=spec.latency,
                            model_id=f"bench/{spec.role}",
                            max_input_tokens=spec.max_input_tokens,
                            max_total_tokens=spec.max_total_tokens,
                            max_concurrent_requests=100_000, cache_capacity=None)
    server.start()
    conn.send(server.url)
    try:
        while True:
            command, argument = conn.recv()
            if command == "latency":
                server.latency = argument
                conn.send(None)
            elif command == "trace":
                trace, conversations = argument
                # Generated now, not inside the first request of each conversation, where it
                # would count as the server's time.
                for conversation in conversations:
                    make_trace(trace, conversation)
                server.model = _model(spec.role, trace)
                conn.send(None)
            elif command == "reset":
                server.reset()
                conn.send(None)
            elif command == "records":
                conn.send(summarize(spec.role, server.records))
            elif command == "calls":
                conn.send(server.calls)
            elif command == "stop":
                break
    except EOFError:  # the parent went away
        pass
    finally:
        server.stop()
        conn.close()


def _server_context() -> multiprocessing.context.ForkServerContext:
    """Servers are forked from multiprocessing's fork server, a fresh process that imports
    this module once: each server then starts in milliseconds, where a spawned one imports
    the web stack and specthink anew (about a CPU second each, many seconds for a pool of
    replicas on 2 cores). Forked from that clean process, not from the client, a server
    inherits none of the client's threads, loops or sockets."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # no effect once the fork server runs
    return context


class ServerProcess:
    """A loopback server for one role in a child process; use it as a context manager."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.url = ""
        context = _server_context()
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(spec, child), daemon=True,
                                        name=f"bench-{spec.role}-server")
        self._child_conn = child

    def start(self) -> ServerProcess:
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Start the child without waiting for it to listen."""
        self._process.start()
        self._child_conn.close()

    def wait_ready(self) -> ServerProcess:
        if not self._conn.poll(60):
            self._process.kill()
            raise RuntimeError(f"the {self.spec.role} server did not start within 60 s")
        self.url = self._conn.recv()
        return self

    def _call(self, command: str, argument: Any = None) -> Any:
        self._conn.send((command, argument))
        return self._conn.recv()

    def set_latency(self, latency: LatencyModel) -> None:
        self._call("latency", latency)

    def set_trace(self, trace: TraceSpec, conversations: Iterable[int] = ()) -> None:
        """Play the traces of ``trace`` from the next request on (``conversations``' traces
        generated beforehand)."""
        self._call("trace", (trace, tuple(conversations)))

    def reset(self) -> None:
        """Forget records and cached prefixes (each policy starts with a cold cache)."""
        self._call("reset")

    def records(self) -> list[RecordSummary]:
        records: list[RecordSummary] = self._call("records")
        return records

    def calls(self) -> list[CallRecord]:
        """Every request so far, generation or not (``/info``, ``/chat_tokenize``, ...)."""
        calls: list[CallRecord] = self._call("calls")
        return calls

    def stop(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=15)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        self._conn.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerPair:
    """The small and the target server, started together (each takes a few seconds to import
    its web stack) and configured together."""

    def __init__(self, trace: TraceSpec) -> None:
        zero = LatencyModel()
        self.small = ServerProcess(ServerSpec("small", trace, zero))
        self.target = ServerProcess(ServerSpec("target", trace, zero))

    def __enter__(self) -> ServerPair:
        self.small.launch()
        self.target.launch()
        try:
            self.small.wait_ready()
            self.target.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.small.stop()
        self.target.stop()

    def prepare(self, trace: TraceSpec, small: LatencyModel, target: LatencyModel,
                conversations: Iterable[int] = ()) -> None:
        """Traces and latencies for the next cell; records and cached prefixes forgotten."""
        for server, latency in ((self.small, small), (self.target, target)):
            server.set_trace(trace, conversations)
            server.set_latency(latency)
            server.reset()

    def records(self) -> list[RecordSummary]:
        return self.small.records() + self.target.records()


def by_conversation(records: list[RecordSummary]) -> dict[int, list[RecordSummary]]:
    grouped: dict[int, list[RecordSummary]] = defaultdict(list)
    for record in records:
        grouped[record.conversation].append(record)
    return grouped
