"""The benchmark run: servers up, every policy at every concurrency, the client alone at full
speed, then the figures.

One pair of server processes serves the whole run; before each cell they switch to the cell's
traces and latency model and forget their records and cached prefixes, and a fresh client
process answers every conversation of the cell at once.

*Time scale.* The GPU profiles' latencies are multiplied by a per-cell factor. Two limits set
it: no generated token may come faster than ``token_floor`` seconds (so the loopback server's
own per-token Python stays small beside the modelled time), and all conversations together may
not ask for more than ``event_budget`` tokens per second (at start-up the engine answers
reasoning traces against zero-latency servers; half of the tokens per second it gets through),
or a saturated process, not the orchestration, would be what is measured. Times are reported
as measured and at the profiles' own speed (``scale = 1``); the ratios (wall/ideal, policy
against policy) do not depend on the scale.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import specthink
from benchmarks.metrics import CellMetrics, cell_metrics
from benchmarks.policies import POLICIES
from benchmarks.profiles import SMALL_1_5B_A100, TARGET_32B_A100, GPUProfile
from benchmarks.servers import ServerPair
from benchmarks.traces import TraceSpec, make_trace
from benchmarks.worker import (
    WARMUP_CONVERSATION,
    CellOutcome,
    CellSpec,
    HotSpot,
    run_cell,
    run_cell_in_child,
)
from specthink.testing.server import LatencyModel

__all__ = ["BenchConfig", "BenchResult", "Level", "Throughput", "run_bench"]

Progress = Callable[[str], None]

EVENT_BUDGET_SHARE = 0.5
"""Share of the machine's measured capacity that all conversations of a cell may use, so that
neither the client nor the servers run saturated."""

EXPECTED_TARGET_SHARE = 0.2
"""Share of tokens the target writes in the speculative policies (the traces aim at the paper's
~0.19); only used to pick time scales."""


@dataclass(frozen=True, slots=True)
class Level:
    """``conversations`` at once, each ``paragraphs`` long."""

    conversations: int
    paragraphs: int
    rule2: bool = True
    """Whether the traces let the target verify (see ``TraceSpec.rule2``)."""


@dataclass(frozen=True, slots=True)
class BenchConfig:
    levels: tuple[Level, ...] = (Level(1, 30), Level(16, 12), Level(256, 5, rule2=False))
    policies: tuple[str, ...] = ("engine", "authors", "small", "target")
    layouts: tuple[str, ...] = ("single-client", "per-conversation")
    """Further connection-pool layouts for the engine at the largest level ("default" is
    always run); see :class:`~benchmarks.policies.EnginePolicy`."""
    time_scale: float | None = None
    """A fixed lower bound of every cell's scale instead of the ``token_floor`` rule."""
    token_floor: float = 0.005
    event_budget: float | None = None
    """Tokens per second all servers together may stream; measured when ``None``."""
    seed: int = 0
    throughput_conversations: int = 4
    throughput_paragraphs: int = 40
    throughput_burst: int = 64
    """Events a zero-latency server writes at once: it is far ahead of its reader, so the
    client's own cost per token is measured, not a wake-up per token (the paced rows show
    that one)."""
    hot_spots: bool = True
    isolate: bool = True
    """Each cell in a fresh client process (``False``: in this one; for tests, where CPU time
    and memory are not asserted)."""
    small: GPUProfile = SMALL_1_5B_A100
    target: GPUProfile = TARGET_32B_A100

    def __post_init__(self) -> None:
        unknown = set(self.policies) - set(POLICIES)
        if unknown:
            raise ValueError(f"unknown policies {sorted(unknown)}; choose from {sorted(POLICIES)}")
        if not self.levels:
            raise ValueError("at least one level")

    @classmethod
    def quick(cls) -> BenchConfig:
        """Seconds, not minutes: tiny traces, near-zero latencies (for tests and a smoke run)."""
        return cls(levels=(Level(1, 8), Level(4, 6)), layouts=("per-conversation",),
                   time_scale=0.0, token_floor=0.0, event_budget=math.inf,
                   throughput_conversations=2, throughput_paragraphs=8)

    def pace(self, policy: str) -> float:
        """Seconds per accepted token of one conversation at ``scale = 1``."""
        if policy == "small":
            return self.small.per_token
        if policy == "target":
            return self.target.per_token
        share = EXPECTED_TARGET_SHARE
        return (1 - share) * self.small.per_token + share * self.target.per_token

    def scale_for(self, policy: str, conversations: int, event_budget: float) -> float:
        fastest = min(self.small.per_token if role == "small" else self.target.per_token
                      for role in POLICIES[policy].streams_from)
        floor = (self.time_scale if self.time_scale is not None
                 else self.token_floor / fastest if fastest else 0.0)
        return max(floor, conversations / (self.pace(policy) * event_budget))


@dataclass(slots=True)
class Throughput:
    """The client alone: CPU time of the client process per streamed token."""

    name: str
    policy: str
    takeovers: bool
    per_token: float
    """Seconds between two tokens on the server (0: as fast as it can send)."""
    conversations: int
    output_tokens: int
    requests: int
    cpu_seconds: float
    wall_seconds: float

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.output_tokens / self.cpu_seconds if self.cpu_seconds else 0.0

    @property
    def cpu_us_per_token(self) -> float:
        return self.cpu_seconds / self.output_tokens * 1e6 if self.output_tokens else 0.0


@dataclass(slots=True)
class BenchResult:
    config: BenchConfig
    started: str
    machine: dict[str, str]
    event_budget: float
    server_capacity: float | None
    """Tokens per second the engine, client and servers together, got through at zero latency
    on reasoning traces (the calibration)."""
    cells: list[CellMetrics] = field(default_factory=list)
    same_text: dict[int, bool] = field(default_factory=dict)
    """Per level: the engine wrote exactly the authors' loop's text in every conversation."""
    baselines_exact: dict[int, bool] = field(default_factory=dict)
    """Per level: small alone and target alone wrote their traces' answers exactly."""
    throughput: list[Throughput] = field(default_factory=list)
    hot_spots: list[HotSpot] = field(default_factory=list)
    call_tree: list[HotSpot] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def cell(self, policy: str, conversations: int, layout: str = "default") -> CellMetrics:
        for cell in self.cells:
            if (cell.policy, cell.conversations, cell.layout) == (policy, conversations, layout):
                return cell
        raise KeyError((policy, conversations, layout))


SOURCES = ("engine.py", "backends/_connection.py", "backends/_sse.py", "backends/_transport.py",
           "backends/tgi.py", "rules.py")
"""The client code under test; its hashes go into the report, as the sources change often."""


def _machine() -> dict[str, str]:
    root = Path(specthink.__file__).resolve().parent
    sources = []
    for name in SOURCES:
        try:
            digest = hashlib.sha256((root / name).read_bytes()).hexdigest()[:10]
        except OSError:
            digest = "missing"
        sources.append(f"{name} {digest}")
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": str(os.cpu_count()), "sources": ", ".join(sources)}


def measure_capacity(servers: ServerPair, seed: int = 0, conversations: int = 16) -> float:
    """Accepted tokens per second this machine gets through when the engine answers reasoning
    traces against zero-latency servers: client and servers at full tilt, requests included."""
    trace = TraceSpec(seed=seed, paragraphs=12)
    servers.prepare(trace, LatencyModel(), LatencyModel())
    out = run_cell_in_child(CellSpec("engine", tuple(range(1, conversations + 1)),
                                     servers.small.url, servers.target.url, trace))
    tokens = sum(o.output_tokens for o in out.outcomes)
    return tokens / out.wall_seconds if out.wall_seconds else float("inf")


def _run(config: BenchConfig, spec: CellSpec) -> CellOutcome:
    return run_cell_in_child(spec) if config.isolate else run_cell(spec)


def _run_cell(config: BenchConfig, result: BenchResult, servers: ServerPair, trace: TraceSpec,
              policy: str, conversations: int, layout: str = "default",
              ) -> tuple[CellMetrics, dict[int, str]]:
    scale = config.scale_for(policy, conversations, result.event_budget)
    latencies = {"small": config.small.latency(scale), "target": config.target.latency(scale)}
    numbers = tuple(range(1, conversations + 1))
    servers.prepare(trace, latencies["small"], latencies["target"], (WARMUP_CONVERSATION, *numbers))
    out = _run(config, CellSpec(policy, numbers, servers.small.url, servers.target.url, trace,
                                layout=layout))
    result.errors.extend(out.errors)
    metrics = cell_metrics(policy=policy, layout=layout, scale=scale, outcomes=out.outcomes,
                           records=servers.records(), latencies=latencies,
                           errors=len(out.errors), cpu_seconds=out.cpu_seconds,
                           rss_peak_kb=out.rss_peak_kb, rss_growth_kb=out.rss_growth_kb)
    return metrics, {o.conversation: o.text for o in out.outcomes}


THROUGHPUT_ROWS: tuple[tuple[str, str, bool, float], ...] = (
    ("engine, reasoning traces", "engine", True, 0.0),
    ("engine, no takeovers", "engine", False, 0.0),
    ("TGIBackend stream, no engine", "small", False, 0.0),
    ("bare asyncio socket (floor)", "raw", False, 0.0),
    ("engine, no takeovers, tokens 5 ms apart", "engine", False, 0.005),
    ("TGIBackend stream, tokens 5 ms apart", "small", False, 0.005),
    ("bare asyncio socket, tokens 5 ms apart", "raw", False, 0.005),
)
"""(name, policy, traces with takeovers, seconds between tokens): the zero-latency rows give
the client's own cost; the paced rows add what waking up for every token costs."""


def _throughput(config: BenchConfig, result: BenchResult, servers: ServerPair,
                progress: Progress) -> None:
    conversations = tuple(range(1, config.throughput_conversations + 1))
    for name, policy, takeovers, per_token in THROUGHPUT_ROWS:
        # Paced rows take real time: half the paragraphs keep them to seconds.
        paragraphs = max(3, config.throughput_paragraphs // (2 if per_token else 1))
        trace = TraceSpec(config.seed, paragraphs, takeover_free=not takeovers)
        progress(f"client throughput: {name}")
        latency = LatencyModel(per_token=per_token, burst=config.throughput_burst)
        servers.prepare(trace, latency, latency, (WARMUP_CONVERSATION, *conversations))
        spec = CellSpec(policy, conversations, servers.small.url, servers.target.url, trace)
        out = _run(config, spec)
        result.errors.extend(out.errors)
        result.throughput.append(Throughput(
            name, policy, takeovers, per_token, len(out.outcomes),
            sum(o.output_tokens for o in out.outcomes),
            sum(sum(o.requests.values()) for o in out.outcomes), out.cpu_seconds,
            out.wall_seconds))
        if config.hot_spots and policy == "engine" and takeovers and not per_token:
            progress("client hot spots: the same under cProfile")
            servers.prepare(trace, latency, latency, (WARMUP_CONVERSATION, *conversations))
            profiled = _run(config, replace(spec, profile=True))
            result.hot_spots, result.call_tree = profiled.hot_spots, profiled.call_tree


def run_bench(config: BenchConfig, progress: Progress = lambda message: None) -> BenchResult:
    """Run every cell of ``config`` and return the figures."""
    started = time.monotonic()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    progress("starting the loopback servers")
    with ServerPair(TraceSpec(config.seed, config.levels[0].paragraphs)) as servers:
        capacity = None
        budget = config.event_budget
        if budget is None:
            progress("calibrating: how many tokens/s this machine gets through at full tilt")
            capacity = measure_capacity(servers, config.seed)
            budget = capacity * EVENT_BUDGET_SHARE
        result = BenchResult(
            config=config, machine=_machine(), event_budget=budget, server_capacity=capacity,
            started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        result.machine["loadavg"] = load_before
        for level in config.levels:
            _level(config, result, servers, level, progress)
        if "engine" in config.policies and config.throughput_conversations:
            _throughput(config, result, servers, progress)
    result.machine["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result.seconds = time.monotonic() - started
    return result


def _level(config: BenchConfig, result: BenchResult, servers: ServerPair, level: Level,
           progress: Progress) -> None:
    trace = TraceSpec(config.seed, level.paragraphs, rule2=level.rule2)
    largest = max(lv.conversations for lv in config.levels)
    texts: dict[str, dict[int, str]] = {}
    cells = [(policy, "default") for policy in config.policies]
    if level.conversations == largest and "engine" in config.policies:
        cells += [("engine", layout) for layout in config.layouts]
    for policy, layout in cells:
        progress(f"{level.conversations} conversations x {level.paragraphs} paragraphs: "
                 f"{policy}" + ("" if layout == "default" else f", pools {layout}"))
        metrics, answers = _run_cell(config, result, servers, trace, policy,
                                     level.conversations, layout)
        result.cells.append(metrics)
        if layout == "default":
            texts[policy] = answers
    if "engine" in texts and "authors" in texts:
        result.same_text[level.conversations] = texts["engine"] == texts["authors"]
    if "small" in texts and "target" in texts:
        result.baselines_exact[level.conversations] = all(
            texts["small"].get(c) == make_trace(trace, c).small_answer
            and texts["target"].get(c) == make_trace(trace, c).target_answer
            for c in range(1, level.conversations + 1))
