"""One benchmark cell (a policy, some conversations at once) in a fresh client process.

A process of its own per cell gives each policy clean figures: its CPU time
(``time.process_time``, one thread, so one core), its peak resident memory
(``ru_maxrss``) and, when asked, a profile; nothing of the servers or of other cells mixes in.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import multiprocessing
import pstats
import resource
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from benchmarks.policies import POLICIES, Outcome
from benchmarks.traces import TraceSpec, make_trace

__all__ = ["CellOutcome", "CellSpec", "HotSpot", "run_cell", "run_cell_in_child"]


@dataclass(frozen=True, slots=True)
class CellSpec:
    policy: str
    conversations: tuple[int, ...]
    small_url: str
    target_url: str
    trace: TraceSpec
    layout: str = "default"
    profile: bool = False
    warmup: bool = True
    """First answer a short conversation (number 0, never measured), as a running service
    would have: imports, template compilation and the first connections are paid before."""


@dataclass(frozen=True, slots=True)
class HotSpot:
    """A function as cProfile saw it."""

    function: str
    calls: int
    own_seconds: float
    cumulative_seconds: float


@dataclass(slots=True)
class CellOutcome:
    outcomes: list[Outcome]
    cpu_seconds: float
    """Client CPU time (user + system) spent running the conversations."""
    wall_seconds: float
    rss_baseline_kb: int
    """Peak resident set size before the conversations started (interpreter, imports)."""
    rss_peak_kb: int
    rss_growth_kb: int
    """Largest resident set size seen while the conversations ran, minus the size before."""
    errors: list[str] = field(default_factory=list)
    hot_spots: list[HotSpot] = field(default_factory=list)
    """The functions that took the most time themselves (per-token costs show here)."""
    call_tree: list[HotSpot] = field(default_factory=list)
    """specthink's own functions by cumulative time (where a request's cost goes)."""


WARMUP_CONVERSATION = 0
WARMUP_TOKENS = 40


def _resident_kb() -> int:
    """The current resident set size (ru_maxrss only knows the peak of the process's life)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() // 1024
    except OSError:  # not Linux: the lifetime peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@dataclass(slots=True)
class _Measure:
    cpu_started: float = 0.0
    wall_started: float = 0.0
    rss_before_kb: int = 0
    rss_max_kb: int = 0


async def _sample_rss(measure: _Measure, every: float = 0.05) -> None:
    while True:
        measure.rss_max_kb = max(measure.rss_max_kb, _resident_kb())
        await asyncio.sleep(every)


async def _run_all(spec: CellSpec, measure: _Measure,
                   profiler: cProfile.Profile | None) -> tuple[list[Outcome], list[str]]:
    policy = POLICIES[spec.policy](spec.small_url, spec.target_url, spec.trace,
                                   layout=spec.layout)
    sampler = None
    try:
        if spec.warmup:
            await policy.run(WARMUP_CONVERSATION, budget=WARMUP_TOKENS)
        gc.collect()
        measure.rss_before_kb = measure.rss_max_kb = _resident_kb()
        measure.cpu_started, measure.wall_started = time.process_time(), time.monotonic()
        if profiler is not None:
            profiler.enable()
        else:  # the sampler's own calls would show up in the profile
            sampler = asyncio.create_task(_sample_rss(measure))
        results = await asyncio.gather(*(policy.run(c) for c in spec.conversations),
                                       return_exceptions=True)
        if profiler is not None:
            profiler.disable()
        measure.rss_max_kb = max(measure.rss_max_kb, _resident_kb())
    finally:
        if sampler is not None:
            sampler.cancel()
        await policy.aclose()
    outcomes = [r for r in results if isinstance(r, Outcome)]
    errors = ["".join(traceback.format_exception(r)) for r in results
              if isinstance(r, BaseException)]
    return outcomes, errors


def _profile_rows(profiler: cProfile.Profile) -> list[HotSpot]:
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, function), entry in stats.stats.items():  # type: ignore[attr-defined]
        calls, own, cumulative = entry[1], entry[2], entry[3]
        if "site-packages/" in filename:
            where = filename.split("site-packages/")[-1]
        elif "/benchmarks/" in filename:  # the harness, beside the package in a checkout
            where = "benchmarks/" + filename.split("/benchmarks/")[-1]
        elif "/specthink/" in filename:
            where = "specthink/" + filename.split("/specthink/")[-1]
        else:
            where = filename.rsplit("/lib/python3", 1)[-1].split("/", 1)[-1]
        rows.append(HotSpot(f"{where}:{line}({function})", calls, own, cumulative))
    return rows


def _hot_spots(rows: list[HotSpot], limit: int = 25) -> list[HotSpot]:
    # Waiting in epoll is idle time, not work.
    busy = [row for row in rows if "select.epoll" not in row.function]
    return sorted(busy, key=lambda row: row.own_seconds, reverse=True)[:limit]


def _call_tree(rows: list[HotSpot], limit: int = 25) -> list[HotSpot]:
    ours = [row for row in rows if row.function.startswith("specthink/")]
    return sorted(ours, key=lambda row: row.cumulative_seconds, reverse=True)[:limit]


def run_cell(spec: CellSpec) -> CellOutcome:
    """Run the cell in this process and measure it."""
    for conversation in (WARMUP_CONVERSATION, *spec.conversations):
        make_trace(spec.trace, conversation)  # the harness's work, not the client's
    gc.collect()
    rss_baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    profiler = cProfile.Profile() if spec.profile else None
    measure = _Measure()
    outcomes, errors = asyncio.run(_run_all(spec, measure, profiler))
    cpu = time.process_time() - measure.cpu_started
    wall = time.monotonic() - measure.wall_started
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = _profile_rows(profiler) if profiler is not None else []
    return CellOutcome(outcomes=outcomes, cpu_seconds=cpu, wall_seconds=wall,
                       rss_baseline_kb=rss_baseline, rss_peak_kb=rss_peak,
                       rss_growth_kb=max(0, measure.rss_max_kb - measure.rss_before_kb),
                       errors=errors,
                       hot_spots=_hot_spots(rows), call_tree=_call_tree(rows))


def run_cell_in_child(spec: CellSpec) -> CellOutcome:
    """Run the cell in a fresh (spawned) process and return its measurements."""
    with ProcessPoolExecutor(max_workers=1,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_cell, spec).result()
