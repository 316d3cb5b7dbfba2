"""Time to first token under a burst: ``specthink bench --ttft --out docs/benchmarks``.

Every client answers the same conversations against the same two loopback TGI servers (child
processes, :class:`~benchmarks.servers.ServerPair`), with a latency model that makes the
first token cost what a GPU's would (by default 10 ms per request and 40 ms per small-model
token, nothing for ``/info`` or a render). Each conversation ends at its first chunk with text:
what is measured is the time from the call to that chunk, and nothing after it competes for
the client's CPU.

Clients (:data:`CLIENTS`): specthink through LangChain's ``astream`` and directly through
``SpeculativeThinker.astream`` (the server's ``/chat_tokenize`` as the template, the default, or
a template known client-side), and two floors: bare httpx (one ``httpx.AsyncClient`` per
conversation, the prompt rendered beforehand, ``/generate_stream`` read line by line) and a bare
asyncio socket (a hand-written HTTP/1.1 request). Two more socket clients render inside the
call, one of them starting its TCP connect before rendering: the most that pre-opening a
connection while the request is prepared can save.

Levels: 1 conversation (repeated one after another, so the median is a figure rather than a
sample), 16 and 256 started at once; for a burst the clock starts when all are started (the
users' view: the last conversation started waits for the first ones' client work too). Each
cell (a client at a level) runs in a fresh client process that first answers one warm-up
conversation, as a running service would have; cells are interleaved round by round, so a
busy machine slows every client of a round alike, and the report gives ratios within rounds.

The servers' :class:`~specthink.testing.server.CallRecord` list says what each conversation
asked before its first generation request: the warm-up is a client's first conversation ever,
the solo conversations of level 1 are the later ones, and a burst gives the count per
conversation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import errno
import gc
import json
import math
import multiprocessing
import os
import platform
import socket
import statistics
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import httpx

from benchmarks.servers import ServerPair
from benchmarks.traces import TraceSpec, make_trace, messages_for
from specthink.backends import SamplingParams, create
from specthink.backends.tgi import generate_parameters
from specthink.engine import SpeculativeThinker
from specthink.prompts import CHATML
from specthink.testing.server import CallRecord, LatencyModel
from specthink.trace import Event, TextEvent

if TYPE_CHECKING:
    from langchain_core.messages import BaseMessageChunk

__all__ = ["CLIENTS", "TTFTCell", "TTFTConfig", "TTFTResult", "run_ttft", "targets",
           "to_json", "to_markdown", "write_ttft"]

Progress = Callable[[str], None]

BUDGET = 4096
"""max_new_tokens of every client's request (the engine's default)."""
WARMUP = 0
"""The warm-up conversation's number (never measured)."""
GENERATION = "/generate_stream"


# --------------------------------------------------------------------------- the clients


class Client(ABC):
    """Answers a conversation up to its first text. ``setup`` (not timed) is what a client may
    have done beforehand; ``first_text`` returns the ``time.monotonic()`` of the first chunk
    with text and closes everything it opened."""

    name: ClassVar[str]
    label: ClassVar[str]

    def __init__(self, small_url: str, target_url: str, trace: TraceSpec) -> None:
        self.small_url = small_url
        self.target_url = target_url
        self.trace = trace

    def setup(self, conversation: int) -> Any:
        return None

    @abstractmethod
    async def first_text(self, conversation: int, prepared: Any) -> float:
        """Time of the first chunk with text."""

    async def aclose(self) -> None:  # noqa: B027 - most clients own nothing between calls
        pass


class _EngineClient(Client):
    template = "auto"

    def __init__(self, small_url: str, target_url: str, trace: TraceSpec) -> None:
        super().__init__(small_url, target_url, trace)
        self.thinker = SpeculativeThinker(
            small=create("tgi", small_url), target=create("tgi", target_url), rules="paper",
            small_template=self.template, target_template=self.template)

    async def first_text(self, conversation: int, prepared: Any) -> float:
        messages = messages_for(make_trace(self.trace, conversation))
        events = cast(AsyncGenerator[Event, None],
                      self.thinker.astream(messages, max_new_tokens=BUDGET))
        async with aclosing(events):
            async for event in events:
                if isinstance(event, TextEvent) and event.text:
                    return time.monotonic()
        raise RuntimeError("the engine wrote no text")

    async def aclose(self) -> None:
        await self.thinker.aclose()


class EngineClient(_EngineClient):
    name = "engine"
    label = ("specthink engine (`SpeculativeThinker.astream`), default template (`auto`: the "
             "server's, learnt from its `/chat_tokenize`)")


class EngineClientTemplate(_EngineClient):
    name = "engine-chatml"
    label = "specthink engine, template known client-side (ChatML)"
    template = "chatml"


class _LangChainClient(Client):
    template = "auto"

    def __init__(self, small_url: str, target_url: str, trace: TraceSpec) -> None:
        super().__init__(small_url, target_url, trace)
        from specthink_lc import ChatSpeculativeThinking

        self.model = ChatSpeculativeThinking(
            small_url=small_url, target_url=target_url, backend="tgi", max_tokens=BUDGET,
            small_template=self.template, target_template=self.template)

    async def first_text(self, conversation: int, prepared: Any) -> float:
        from langchain_core.messages import HumanMessage

        question = make_trace(self.trace, conversation).question
        chunks = cast("AsyncGenerator[BaseMessageChunk, None]",
                      self.model.astream([HumanMessage(question)]))
        async with aclosing(chunks):
            async for chunk in chunks:
                if isinstance(chunk.content, str) and chunk.content:
                    return time.monotonic()
        raise RuntimeError("LangChain astream yielded no text")

    async def aclose(self) -> None:
        await self.model.aclose()


class LangChainClient(_LangChainClient):
    name = "langchain"
    label = ("specthink through LangChain `astream`, default template (`auto`: the server's, "
             "learnt from its `/chat_tokenize`)")


class LangChainClientTemplate(_LangChainClient):
    name = "langchain-chatml"
    label = "specthink through LangChain `astream`, template known client-side (ChatML)"
    template = "chatml"


def _prompt(trace: TraceSpec, conversation: int) -> str:
    # The servers serve ChatML (their model id implies no other template), so this is the
    # prompt their /chat_tokenize renders.
    return CHATML.render_text(messages_for(make_trace(trace, conversation)))


def _body(prompt: str) -> bytes:
    return json.dumps({"inputs": prompt, "parameters": generate_parameters(
        BUDGET, SamplingParams())}).encode()


def _has_text(line: bytes | str) -> bool:
    """A ``data:`` line of ``/generate_stream`` carrying a non-special token with text."""
    token = json.loads(line[5:])["token"]
    return not token["special"] and bool(token["text"])


class HttpxClient(Client):
    """Bare httpx, as a caller without specthink would write it: one client per conversation
    (made beforehand, plain HTTP so no certificates are loaded), the prompt rendered
    beforehand, the stream read line by line."""

    name = "httpx"
    label = "bare httpx, one `AsyncClient` per conversation, prompt pre-rendered"

    def setup(self, conversation: int) -> Any:
        client = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0), verify=False)
        return client, _body(_prompt(self.trace, conversation))

    async def first_text(self, conversation: int, prepared: Any) -> float:
        client, body = prepared
        async with client, client.stream(
                "POST", self.small_url + GENERATION, content=body,
                headers={"Content-Type": "application/json"}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:") and _has_text(line):
                    return time.monotonic()
        raise RuntimeError("the stream carried no text")


class _SocketClient(Client):
    """A hand-written HTTP/1.1 request over asyncio streams: no HTTP library at all."""

    def _address(self) -> tuple[str, int]:
        url = httpx.URL(self.small_url)
        return url.host, url.port or 80

    def _request(self, body: bytes) -> bytes:
        host = self._address()[0].encode()
        return (b"POST /generate_stream HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\n\r\n%s" % (host, len(body), body))

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> float:
        try:
            writer.write(request)
            while line := await reader.readline():
                # Chunk sizes and blank lines fall through; every event is one line.
                if line.startswith(b"data:") and _has_text(line):
                    return time.monotonic()
        finally:
            writer.close()
        raise RuntimeError("the stream carried no text")


class SocketClient(_SocketClient):
    name = "socket"
    label = "bare asyncio socket, hand-written request, prompt pre-rendered"

    def setup(self, conversation: int) -> Any:
        return self._request(_body(_prompt(self.trace, conversation)))

    async def first_text(self, conversation: int, prepared: Any) -> float:
        reader, writer = await asyncio.open_connection(*self._address())
        return await self._read(reader, writer, prepared)


class SocketRenderClient(_SocketClient):
    name = "socket-render"
    label = "bare socket, prompt rendered in the call, then connect"

    async def first_text(self, conversation: int, prepared: Any) -> float:
        request = self._request(_body(_prompt(self.trace, conversation)))
        reader, writer = await asyncio.open_connection(*self._address())
        return await self._read(reader, writer, request)


class SocketPreopenClient(_SocketClient):
    """The TCP handshake is started (a non-blocking ``connect``) before the prompt is rendered,
    so the kernel and the server's accept run while the client renders."""

    name = "socket-preopen"
    label = "bare socket, connect started before rendering in the call"

    async def first_text(self, conversation: int, prepared: Any) -> float:
        address = self._address()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect_ex(address)
            request = self._request(_body(_prompt(self.trace, conversation)))
            state = sock.connect_ex(address)
            if state not in (0, errno.EISCONN):
                await asyncio.get_running_loop().sock_connect(sock, address)
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        return await self._read(reader, writer, request)


CLIENTS: dict[str, type[Client]] = {client.name: client for client in (
    LangChainClient, LangChainClientTemplate, EngineClient, EngineClientTemplate, HttpxClient,
    SocketClient, SocketRenderClient, SocketPreopenClient)}
"""Every client the TTFT bench knows, in report order."""

TARGET_CLIENT = "langchain"
"""The row the issue's targets are about: specthink as a LangChain user calls it."""
FLOOR_CLIENT = "httpx"


# --------------------------------------------------------------------------- one cell


@dataclass(frozen=True, slots=True)
class CellSpec:
    client: str
    conversations: tuple[int, ...]
    burst: bool
    """All at once (the clock starts once all are started), or one after another."""
    small_url: str
    target_url: str
    trace: TraceSpec
    gc_freeze: bool = False
    """``gc.freeze()`` after the warm-up, as a service may do once started."""


class _GCPauses:
    """The cyclic garbage collector's pauses while installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def __enter__(self) -> _GCPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


@dataclass(slots=True)
class Conversation:
    number: int
    started: float
    first_text: float | None
    finished: float


@dataclass(slots=True)
class CellRun:
    """What the client process measured (``time.monotonic``, shared with the servers)."""

    warmup: Conversation | None
    conversations: list[Conversation]
    burst_started: float
    cpu_seconds: float
    errors: list[str] = field(default_factory=list)
    gc_pauses: list[tuple[int, float]] = field(default_factory=list)
    """(generation, seconds) of every collection while the conversations ran."""


async def _one(client: Client, number: int, prepared: Any) -> Conversation:
    started = time.monotonic()
    first = await client.first_text(number, prepared)
    return Conversation(number, started, first, time.monotonic())


async def _cell(spec: CellSpec) -> CellRun:
    client = CLIENTS[spec.client](spec.small_url, spec.target_url, spec.trace)
    errors: list[str] = []
    try:
        warmup = await _one(client, WARMUP, client.setup(WARMUP))
        prepared = {n: client.setup(n) for n in spec.conversations}
        gc.collect()
        if spec.gc_freeze:
            gc.freeze()
        cpu = time.process_time()
        burst_started = time.monotonic()
        done: list[Conversation | BaseException]
        with _GCPauses() as collector:
            if spec.burst:
                done = list(await asyncio.gather(
                    *(_one(client, n, prepared[n]) for n in spec.conversations),
                    return_exceptions=True))
            else:
                done = []
                for n in spec.conversations:
                    try:
                        done.append(await _one(client, n, prepared[n]))
                    except Exception as exc:  # reported; the cell goes on
                        done.append(exc)
        cpu = time.process_time() - cpu
    finally:
        if spec.gc_freeze:
            gc.unfreeze()
        await client.aclose()
    errors += ["".join(traceback.format_exception(r)) for r in done
               if isinstance(r, BaseException)]
    return CellRun(warmup, [r for r in done if isinstance(r, Conversation)], burst_started,
                   cpu, errors, collector.pauses)


def run_cell(spec: CellSpec) -> CellRun:
    for number in (WARMUP, *spec.conversations):
        make_trace(spec.trace, number)  # the harness's work, not the client's
    return asyncio.run(_cell(spec))


def run_cell_in_child(spec: CellSpec) -> CellRun:
    with ProcessPoolExecutor(max_workers=1,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_cell, spec).result()


# --------------------------------------------------------------------------- figures


def percentile(values: Sequence[float], share: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    at = (len(ordered) - 1) * share
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


@dataclass(frozen=True, slots=True)
class Requests:
    """Non-generation requests of one conversation (or the mean of several), per server."""

    small_before: float
    """On the small server before the conversation's first generation request."""
    target_before: float
    """On the target server, arrived before that first generation request."""
    small_total: float
    target_total: float
    """In the whole conversation (up to its first text)."""
    paths_before: tuple[str, ...] = ()
    """``server:/path`` of those before the first generation request (one conversation)."""


def _window_requests(calls: dict[str, list[CallRecord]], start: float,
                     end: float) -> Requests:
    inside = {role: [c for c in calls[role] if start <= c.started <= end]
              for role in ("small", "target")}
    generation = min((c.started for c in inside["small"] if c.generation), default=end)
    before = {role: [c for c in inside[role] if not c.generation and c.started < generation]
              for role in inside}
    return Requests(
        small_before=len(before["small"]), target_before=len(before["target"]),
        small_total=sum(not c.generation for c in inside["small"]),
        target_total=sum(not c.generation for c in inside["target"]),
        paths_before=tuple(f"{role}:{c.path}" for role in ("small", "target")
                           for c in sorted(before[role], key=lambda c: c.started)))


def _mean_requests(items: Sequence[Requests]) -> Requests | None:
    if not items:
        return None
    return Requests(small_before=statistics.fmean(r.small_before for r in items),
                    target_before=statistics.fmean(r.target_before for r in items),
                    small_total=statistics.fmean(r.small_total for r in items),
                    target_total=statistics.fmean(r.target_total for r in items),
                    paths_before=items[0].paths_before)


@dataclass(slots=True)
class TTFTCell:
    """One client at one level in one round."""

    client: str
    conversations: int
    round: int
    ttft_ms: list[float]
    """Per conversation: ms from the call (a burst: from when all were started) to the first
    text."""
    ttft_own_call_ms: list[float]
    """The same from each conversation's own call."""
    arrival_ms: list[float]
    """When each generation request reached the small server, ms after the call (a burst:
    after the burst started): client work, earlier requests and connecting."""
    first: Requests | None
    """The client's first conversation ever (its warm-up)."""
    later: Requests | None
    """A later conversation: exact for one conversation at a time; in a burst only the totals
    per conversation (``*_before`` is NaN)."""
    cpu_seconds: float
    """Client CPU time per conversation."""
    errors: int
    gc_full: int = 0
    """Full (generation 2) collections while the conversations ran."""
    gc_ms: float = 0.0
    """Time spent in all collections while the conversations ran."""

    def p(self, share: float) -> float:
        return percentile(self.ttft_ms, share)


def cell_figures(spec: CellSpec, run: CellRun, calls: dict[str, list[CallRecord]],
                 round_number: int) -> TTFTCell:
    """The figures of a cell from what the client measured and what the servers recorded."""
    ms = 1000.0
    first = None
    if run.warmup is not None:
        first = _window_requests(calls, run.warmup.started, run.warmup.finished)
    if spec.burst:
        t0 = run.burst_started
        ttft = [(c.first_text - t0) * ms for c in run.conversations if c.first_text]
        arrivals = [(c.started - t0) * ms for c in calls["small"]
                    if c.generation and c.started >= t0]
        end = max((c.finished for c in run.conversations), default=t0)
        n = max(len(run.conversations), 1)
        whole = _window_requests(calls, t0, end)
        # Which conversation a render belongs to is not recorded, so in a burst only the
        # totals per conversation are known.
        later: Requests | None = Requests(math.nan, math.nan, whole.small_total / n,
                                          whole.target_total / n)
    else:
        ttft = [(c.first_text - c.started) * ms for c in run.conversations if c.first_text]
        arrivals = []
        solo = []
        for conversation in run.conversations:
            generations = [c.started for c in calls["small"] if c.generation
                           and conversation.started <= c.started <= conversation.finished]
            if generations:
                arrivals.append((min(generations) - conversation.started) * ms)
            solo.append(_window_requests(calls, conversation.started, conversation.finished))
        later = _mean_requests(solo)
    own = [(c.first_text - c.started) * ms for c in run.conversations if c.first_text]
    level = len(spec.conversations) if spec.burst else 1
    return TTFTCell(spec.client, level, round_number, ttft, own, arrivals, first, later,
                    run.cpu_seconds / len(spec.conversations), len(run.errors),
                    gc_full=sum(1 for generation, _ in run.gc_pauses if generation == 2),
                    gc_ms=sum(seconds for _, seconds in run.gc_pauses) * ms)


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True, slots=True)
class TTFTConfig:
    levels: tuple[int, ...] = (1, 16, 256)
    clients: tuple[str, ...] = tuple(CLIENTS)
    rounds: int = 3
    solo_repeats: int = 20
    """Conversations one after another at level 1, per round."""
    per_request: float = 0.010
    per_token: float = 0.040
    """Latency of the small server's tokens (the target's too: it writes none here)."""
    seed: int = 0
    gc_freeze: bool = False
    """Every client process calls ``gc.freeze()`` after its warm-up (see ``CellSpec``)."""
    isolate: bool = True
    """Each cell in a fresh client process (``False``: in this one, for tests)."""

    def __post_init__(self) -> None:
        unknown = set(self.clients) - set(CLIENTS)
        if not self.clients:
            raise ValueError(f"no clients; choose from {list(CLIENTS)}")
        if unknown:
            raise ValueError(f"unknown clients {sorted(unknown)}; choose from {list(CLIENTS)}")
        if not self.levels or min(self.levels) < 1:
            raise ValueError("levels must be at least one conversation each")
        if self.rounds < 1 or self.solo_repeats < 1:
            raise ValueError("at least one round and one solo conversation")

    @classmethod
    def quick(cls) -> TTFTConfig:
        """Seconds: two small levels, one round, near-zero latency (a smoke run)."""
        return cls(levels=(1, 4), rounds=1, solo_repeats=2, per_request=0.0, per_token=0.001)

    @property
    def latency(self) -> LatencyModel:
        return LatencyModel(per_request=self.per_request, per_token=self.per_token)


@dataclass(slots=True)
class TTFTResult:
    config: TTFTConfig
    started: str
    machine: dict[str, str]
    cells: list[TTFTCell] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def pooled(self, client: str, level: int) -> list[float]:
        return [v for c in self.cells if (c.client, c.conversations) == (client, level)
                for v in c.ttft_ms]

    def cells_of(self, client: str, level: int) -> list[TTFTCell]:
        return [c for c in self.cells if (c.client, c.conversations) == (client, level)]

    def ratio(self, client: str, level: int, share: float,
              floor: str = FLOOR_CLIENT) -> float | None:
        """Median over rounds of (client's percentile / floor's percentile) in that round."""
        ratios = []
        for cell in self.cells_of(client, level):
            other = [c for c in self.cells_of(floor, level) if c.round == cell.round]
            if other and other[0].ttft_ms and cell.ttft_ms:
                ratios.append(cell.p(share) / other[0].p(share))
        return statistics.median(ratios) if ratios else None

    def difference(self, client: str, level: int, share: float = 0.5,
                   floor: str = FLOOR_CLIENT) -> float | None:
        """Median over rounds of (client's percentile - floor's), ms."""
        diffs = []
        for cell in self.cells_of(client, level):
            other = [c for c in self.cells_of(floor, level) if c.round == cell.round]
            if other and other[0].ttft_ms and cell.ttft_ms:
                diffs.append(cell.p(share) - other[0].p(share))
        return statistics.median(diffs) if diffs else None


def _machine() -> dict[str, str]:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": str(os.cpu_count()),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def _server_calls(servers: ServerPair) -> dict[str, list[CallRecord]]:
    return {"small": servers.small.calls(), "target": servers.target.calls()}


def run_ttft(config: TTFTConfig, progress: Progress = lambda message: None) -> TTFTResult:
    """Every client at every level, ``rounds`` times, interleaved."""
    started = time.monotonic()
    trace = TraceSpec(config.seed, paragraphs=5)
    result = TTFTResult(config=config, machine=_machine(),
                        started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    progress("starting the loopback servers")
    with ServerPair(trace) as servers:
        for round_number in range(config.rounds):
            for level in config.levels:
                solo = level == 1
                numbers = tuple(range(1, 1 + (config.solo_repeats if solo else level)))
                # A different order every round: no client always runs on a cooler machine.
                shift = round_number % len(config.clients)
                order = config.clients[shift:] + config.clients[:shift]
                for name in order:
                    progress(f"round {round_number + 1}/{config.rounds}: {level} "
                             f"conversation(s), {name}")
                    servers.prepare(trace, config.latency, config.latency, (WARMUP, *numbers))
                    spec = CellSpec(name, numbers, not solo, servers.small.url,
                                    servers.target.url, trace, config.gc_freeze)
                    run = run_cell_in_child(spec) if config.isolate else run_cell(spec)
                    result.errors.extend(run.errors)
                    result.cells.append(cell_figures(spec, run, _server_calls(servers),
                                                     round_number))
    result.machine["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- the report


def _ms(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |",
            "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(header))) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    measured: str
    met: bool | None
    aim: str


def targets(result: TTFTResult) -> list[Target]:
    """The issue's targets, for the LangChain client (as a user calls specthink)."""
    out: list[Target] = []
    levels = result.config.levels
    burst = max(levels)
    have = set(result.config.clients)
    if TARGET_CLIENT in have and FLOOR_CLIENT in have:
        if burst > 1:
            ratio = result.ratio(TARGET_CLIENT, burst, 0.95)
            out.append(Target(
                f"TTFT p95 at {burst} conversations ≤ bare httpx's (aim 0.6×)", _x(ratio),
                None if ratio is None else ratio <= 1.0,
                "met" if ratio is not None and ratio <= 0.6 else "not reached"))
        if 1 in levels:
            diff = result.difference(TARGET_CLIENT, 1)
            out.append(Target(
                "TTFT at 1 conversation within 5 ms of bare httpx (aim 2 ms), medians",
                f"{_ms(diff)} ms", None if diff is None else diff <= 5.0,
                "met" if diff is not None and diff <= 2.0 else "not reached"))
    for name, limit in ((TARGET_CLIENT, 1.0), ("langchain-chatml", 0.0), ("engine-chatml", 0.0)):
        later = [c.later for c in result.cells if c.client == name and c.conversations == 1
                 and c.later is not None]
        if not later:
            continue
        small = statistics.fmean(r.small_before for r in later)
        both = statistics.fmean(r.small_before + r.target_before for r in later)
        out.append(Target(
            f"non-generation requests before a later conversation's first generation request "
            f"on the small server (the critical path), {name} (≤ {limit:g})", _ms(small, 2),
            small <= limit, ""))
        out.append(Target(
            f"the same, both servers, by arrival (the target is prepared once the small "
            f"model's first token is handled), {name} (≤ {limit:g})", _ms(both, 2),
            both <= limit, ""))
    return out


def _command(config: TTFTConfig) -> str:
    return ("specthink bench --ttft" + (" --ttft-gc-freeze" if config.gc_freeze else "")
            + " --out docs/benchmarks")


def to_markdown(result: TTFTResult) -> str:
    config = result.config
    freeze = (" Every client process called `gc.freeze()` after its warm-up (as a service "
              "may once started), so the collector no longer walks the start-up heap."
              if config.gc_freeze else "")
    lines = [
        "# Time to first token under a burst" + (", start-up heap frozen" if freeze else ""),
        "",
        f"Generated by `{_command(config)}` "
        f"({result.started}, {result.seconds / 60:.1f} min; Python "
        f"{result.machine['python']}, {result.machine['cpus']} CPUs, load average "
        f"{result.machine['loadavg']} before and {result.machine.get('loadavg_after', '?')} "
        f"after). Every figure is also in [{_stem(config)}.json]({_stem(config)}.json); how "
        f"the bench works is in the docstring of `benchmarks/ttft.py` and in "
        f"[methodology](methodology.md#ttft)." + freeze,
        "",
        f"- servers: the bench's two loopback TGI servers in child processes; "
        f"{config.per_request * 1000:g} ms per generation request, "
        f"{config.per_token * 1000:g} ms per token, so the latency model alone puts the first "
        f"token {1000 * (config.per_request + config.per_token):g} ms after the request "
        f"arrives; `/info` and renders cost nothing",
        f"- {config.rounds} round(s); in each, every client at every level in a fresh client "
        f"process after one warm-up conversation; 1 conversation is "
        f"{config.solo_repeats} conversations one after another; 16 and 256 are started at "
        f"once and timed from when all were started",
        "- each conversation ends at its first chunk with text (nothing else competes for the "
        "client's CPU); ratios are taken within a round, then the median over rounds",
        "",
        "## Targets (issue 17)",
        "",
    ]
    rows = []
    for target in targets(result):
        verdict = "—" if target.met is None else "**met**" if target.met else "**missed**"
        rows.append([target.name, target.measured, verdict, target.aim or "—"])
    lines += _table(["target", "measured", "verdict", "aim"], rows)
    lines += ["", "## TTFT, ms", ""]
    header = ["client"]
    for level in config.levels:
        header += [f"{level}: p50", f"{level}: p95"]
        if level > 1:
            header.append(f"{level}: max")
    header += [f"p95 / httpx at {level}" for level in config.levels]
    rows = []
    for name in config.clients:
        row = [CLIENTS[name].label]
        for level in config.levels:
            values = result.pooled(name, level)
            row += [_ms(percentile(values, 0.5)), _ms(percentile(values, 0.95))]
            if level > 1:
                row.append(_ms(max(values, default=math.nan)))
        row += [_x(result.ratio(name, level, 0.95)) for level in config.levels]
        rows.append(row)
    lines += _table(header, rows)
    lines += ["", "p50/p95/max over every conversation of every round; the ratio columns: the "
              "client's p95 over bare httpx's in the same round (median over rounds).", ""]
    lines += ["## Per round", "", "p95 in ms per round, then the same over bare httpx's "
              "(the spread shows the noise of the shared machine).", ""]
    header = ["client", *(f"{level}, round {r + 1}" for level in config.levels
                          for r in range(config.rounds))]
    rows = []
    for name in config.clients:
        row = [name]
        for level in config.levels:
            for r in range(config.rounds):
                cell = [c for c in result.cells_of(name, level) if c.round == r]
                floor = [c for c in result.cells_of(FLOOR_CLIENT, level) if c.round == r]
                if not cell:
                    row.append("—")
                    continue
                ratio = (cell[0].p(0.95) / floor[0].p(0.95)
                         if floor and floor[0].ttft_ms else None)
                row.append(f"{_ms(cell[0].p(0.95))} ({_x(ratio)})")
        rows.append(row)
    lines += _table(header, rows)
    lines += ["", "## Requests before the first generation request", "",
              "From the servers' records (`CallRecord`). *First*: the client's first "
              "conversation ever (its warm-up), with the paths in arrival order. *Later*: the "
              "solo conversations of level 1 (exact, mean over them); at the largest burst, all "
              "non-generation requests of the burst per conversation (small + target). "
              "*Reaches the server*: median ms from the call to the small server receiving "
              "the generation request (the burst: p50 / p95 from when all were started).", ""]
    burst = max(config.levels)
    header = ["client", "first: before (paths)", "later: small before", "later: target before",
              f"{burst} at once: per conversation", "1: reaches the server",
              f"{burst}: reaches the server p50 / p95",
              f"client CPU ms per conversation at {burst} (/ httpx)",
              f"GC ms per burst of {burst} (full collections in all rounds)"]
    rows = []
    for name in config.clients:
        solo = [c for c in result.cells_of(name, 1)]
        big = result.cells_of(name, burst) if burst > 1 else []
        first = next((c.first for c in result.cells if c.client == name and c.first), None)
        later = _mean_requests([c.later for c in solo if c.later is not None])
        per_conv = _mean_requests([c.later for c in big if c.later is not None])
        arrivals_1 = [v for c in solo for v in c.arrival_ms]
        arrivals_n = [v for c in big for v in c.arrival_ms]
        cpu = [c.cpu_seconds * 1000 for c in big]
        floor_cpu = [c.cpu_seconds * 1000 for c in result.cells_of(FLOOR_CLIENT, burst)]
        full = sum(c.gc_full for c in big)
        gc_ms = statistics.fmean(c.gc_ms for c in big) if big else None
        cpu_ratio = (statistics.fmean(cpu) / statistics.fmean(floor_cpu)
                     if cpu and floor_cpu and burst > 1 else None)
        rows.append([
            name,
            "—" if first is None else (f"{first.small_before + first.target_before:g} ("
                                       + (", ".join(first.paths_before) or "none") + ")"),
            "—" if later is None else _ms(later.small_before, 2),
            "—" if later is None else _ms(later.target_before, 2),
            "—" if per_conv is None else
            f"{per_conv.small_total + per_conv.target_total:.2f}",
            _ms(percentile(arrivals_1, 0.5)),
            f"{_ms(percentile(arrivals_n, 0.5))} / {_ms(percentile(arrivals_n, 0.95))}",
            f"{_ms(statistics.fmean(cpu) if cpu else None, 2)} ({_x(cpu_ratio)})",
            f"{_ms(gc_ms)} ({full} in {len(big)})"])
    lines += _table(header, rows)
    if result.errors:
        lines += ["", f"**{len(result.errors)} conversation(s) failed**; the first:", "",
                  "```", result.errors[0].strip(), "```"]
    return "\n".join(lines)


def to_json(result: TTFTResult) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    summary = {
        name: {str(level): {
            "p50_ms": percentile(result.pooled(name, level), 0.5),
            "p95_ms": percentile(result.pooled(name, level), 0.95),
            "p95_over_httpx": result.ratio(name, level, 0.95),
            "p50_minus_httpx_ms": result.difference(name, level)}
            for level in result.config.levels}
        for name in result.config.clients}
    data = {
        "command": _command(result.config),
        "started": result.started, "seconds": result.seconds, "machine": result.machine,
        "config": dataclasses.asdict(result.config),
        "targets": [dataclasses.asdict(t) for t in targets(result)],
        "summary": summary,
        "cells": [dataclasses.asdict(c) for c in result.cells],
        "errors": result.errors,
    }
    return clean(data)  # type: ignore[no-any-return]


def _stem(config: TTFTConfig) -> str:
    return "ttft-gc-freeze" if config.gc_freeze else "ttft"


def write_ttft(result: TTFTResult, out: Path) -> list[Path]:
    """Write ``ttft.md`` and ``ttft.json`` (``ttft-gc-freeze.*`` with ``gc_freeze``) into
    ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(result.config)
    markdown, data = out / f"{stem}.md", out / f"{stem}.json"
    markdown.write_text(to_markdown(result) + "\n", encoding="utf-8")
    data.write_text(json.dumps(to_json(result), indent=2) + "\n", encoding="utf-8")
    return [markdown, data]
