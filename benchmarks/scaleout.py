"""``specthink bench --replicas 1,2,4``: pools of replicas per role behind a real router
(``smg``), with and without the routing key, side by side.

Each replica is a loopback server in a child process playing the bench's reasoning traces at
the GPU profiles' speed (scaled), with a bounded batch (:attr:`LatencyModel.max_batch`): up to
``max_batch`` generations run at full speed, more share the replica, so one replica's throughput
is bounded and more replicas can serve more. One ``smg`` per role (``--policy cache_aware
--sticky-sessions --routing-key-headers x-session-id``), restarted for every cell so that no
routing state carries over, fronts the first K replicas of each pool. The engine answers every
conversation of a cell at once through the routers, once sending its per-call routing key in
``X-Session-ID`` and once sending none.

Figures per cell (:class:`ScaleCell`): aggregate accepted tokens per second (as measured and at
the profiles' speed, ``scale = 1``), wall time over the ideal one (the larger of the longest
conversation's own service time and each pool's work divided by its K x ``max_batch``
slots), the prompt tokens recomputed per request, and the share of each follow-up request's
previous prompt (same conversation, same pool, whichever replica served it) found in the
prefix cache of the replica it reached.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.metrics import Rates
from benchmarks.policies import Outcome
from benchmarks.profiles import SMALL_1_5B_A100, TARGET_32B_A100, GPUProfile
from benchmarks.report import _no_nan, _num, _pct
from benchmarks.runner import Level, _machine
from benchmarks.servers import RecordSummary, Role, ServerProcess, ServerSpec
from benchmarks.traces import TraceSpec
from benchmarks.worker import WARMUP_CONVERSATION, CellSpec, run_cell, run_cell_in_child
from specthink.testing.routers import Router, RouterKind, unavailable_reason
from specthink.testing.server import LatencyModel

__all__ = ["ScaleCell", "ScaleOutConfig", "ScaleOutResult", "run_scale_out", "scale_cell",
           "scale_headline", "scale_to_json", "scale_to_markdown", "write_scale_report"]

Progress = Callable[[str], None]
ROLES: tuple[Role, ...] = ("small", "target")
KEYED_POLICY = {True: "engine-routed", False: "engine-routed-unkeyed"}
COMMAND = "specthink bench --replicas 1,2,4 --out docs/benchmarks"


@dataclass(frozen=True, slots=True)
class ScaleOutConfig:
    replicas: tuple[int, ...] = (1, 2, 4)
    """Replicas per role in each cell."""
    levels: tuple[Level, ...] = (Level(64, 8, rule2=False), Level(256, 6, rule2=False))
    max_batch: int = 4
    """Generations one replica runs at full speed (see :attr:`LatencyModel.max_batch`). Small
    beside the conversations per replica, so that every cell is bound by the pools' capacity,
    not by its longest conversation."""
    event_budget: float = 4000.0
    """Tokens per second the largest pools would stream with every slot of both busy; sets
    the time scale (the same for every cell, so cells compare directly)."""
    time_scale: float | None = None
    """A fixed factor on every latency instead of the one the budget gives."""
    router: RouterKind = "smg"
    router_args: tuple[str, ...] = ()
    """More router flags, beyond :func:`~specthink.testing.routers.router_command`'s recipe."""
    seed: int = 0
    isolate: bool = True
    """Each cell's client in a fresh process (``False``: in this one, for tests)."""
    small: GPUProfile = SMALL_1_5B_A100
    target: GPUProfile = TARGET_32B_A100

    def __post_init__(self) -> None:
        if not self.replicas or min(self.replicas) < 1:
            raise ValueError(f"replicas must be positive counts, got {self.replicas}")
        if not self.levels:
            raise ValueError("at least one level")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.event_budget <= 0:
            raise ValueError(f"event_budget must be > 0 tokens/s, got {self.event_budget}")

    @classmethod
    def quick(cls) -> ScaleOutConfig:
        """Seconds: two small pools, a handful of short conversations (a smoke run)."""
        return cls(replicas=(1, 2), levels=(Level(6, 4, rule2=False),), max_batch=2,
                   time_scale=0.05)

    @property
    def scale(self) -> float:
        if self.time_scale is not None:
            return self.time_scale
        # Every slot of both of the largest pools streaming at once.
        slots = max(self.replicas) * self.max_batch
        return slots * (1 / self.small.per_token + 1 / self.target.per_token) / self.event_budget

    def latency(self, role: Role) -> LatencyModel:
        profile = self.small if role == "small" else self.target
        return dataclasses.replace(profile.latency(self.scale), max_batch=self.max_batch)


@dataclass(frozen=True, slots=True)
class ScaleCell(Rates):
    """One cell: K replicas per role, some conversations at once, with or without the key."""

    replicas: int
    conversations: int
    keyed: bool
    scale: float
    errors: int
    fallbacks: int
    retries: int
    output_tokens: int
    wall_seconds: float
    ideal_seconds: float
    requests: int
    recomputed_per_request: float
    """Mean over all generation requests of prompt tokens not served from the cache."""
    recomputed_per_follow_up: float | None
    """The same over follow-up requests (each conversation's later requests to a pool)."""
    cache_share_previous: float | None
    """Of each follow-up request's previous prompt (same conversation and pool), the share
    the replica it reached had cached, summed over requests."""
    cache_share_previous_min: float | None
    replicas_per_conversation: float
    """Mean over conversations and pools of how many replicas served the conversation."""


def _nominal(record: RecordSummary, latency: LatencyModel) -> float:
    """What the latency model charges ``record`` with no contention."""
    return latency.service_seconds(record.prompt_tokens - record.cached_prompt_tokens,
                                   record.tokens_sent)


def scale_cell(*, replicas: int, keyed: bool, scale: float, max_batch: int,
               outcomes: Sequence[Outcome], records: dict[Role, list[RecordSummary]],
               latencies: dict[Role, LatencyModel], errors: int) -> ScaleCell:
    """The figures of a cell from what the client saw and what every replica recorded (pure;
    records of conversations not in ``outcomes``, the warm-up, are ignored)."""
    conversations = {o.conversation for o in outcomes}
    per_conversation: dict[int, float] = defaultdict(float)
    pool_work: dict[Role, float] = {}
    recomputed: list[int] = []
    follow_ups: list[int] = []
    shares: list[float] = []
    previous_total = previous_cached = 0
    replica_counts: list[int] = []
    for role in ROLES:
        mine = sorted((r for r in records.get(role, []) if r.conversation in conversations),
                      key=lambda r: r.started)
        pool_work[role] = sum(_nominal(r, latencies[role]) for r in mine)
        served: dict[int, set[int]] = defaultdict(set)
        previous: dict[int, RecordSummary] = {}
        for record in mine:
            per_conversation[record.conversation] += _nominal(record, latencies[role])
            missing = record.prompt_tokens - record.cached_prompt_tokens
            recomputed.append(missing)
            served[record.conversation].add(record.replica)
            before = previous.get(record.conversation)
            if before is not None and before.prompt_tokens:
                follow_ups.append(missing)
                cached = min(record.cached_prompt_tokens, before.prompt_tokens)
                shares.append(cached / before.prompt_tokens)
                previous_total += before.prompt_tokens
                previous_cached += cached
            previous[record.conversation] = record
        replica_counts += [len(s) for s in served.values()]
    ideal = max([*(work / (replicas * max_batch) for work in pool_work.values()),
                 *per_conversation.values(), 0.0])
    wall = (max(o.finished for o in outcomes) - min(o.started for o in outcomes)
            if outcomes else 0.0)
    return ScaleCell(
        replicas=replicas, conversations=len(outcomes), keyed=keyed, scale=scale,
        errors=errors, fallbacks=sum(o.fallback for o in outcomes),
        retries=sum(o.retries for o in outcomes),
        output_tokens=sum(o.output_tokens for o in outcomes), wall_seconds=wall,
        ideal_seconds=ideal, requests=len(recomputed),
        recomputed_per_request=statistics.fmean(recomputed) if recomputed else 0.0,
        recomputed_per_follow_up=statistics.fmean(follow_ups) if follow_ups else None,
        cache_share_previous=previous_cached / previous_total if previous_total else None,
        cache_share_previous_min=min(shares) if shares else None,
        replicas_per_conversation=(statistics.fmean(replica_counts) if replica_counts
                                   else 0.0))


@dataclass(slots=True)
class ScaleOutResult:
    config: ScaleOutConfig
    started: str
    machine: dict[str, str]
    cells: list[ScaleCell] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def cell(self, replicas: int, conversations: int, keyed: bool) -> ScaleCell:
        for cell in self.cells:
            if (cell.replicas, cell.conversations, cell.keyed) == (replicas, conversations,
                                                                  keyed):
                return cell
        raise KeyError((replicas, conversations, keyed))


def _records(pool: Sequence[ServerProcess]) -> list[RecordSummary]:
    """Every replica's records, each tagged with its replica's index."""
    out = []
    for index, server in enumerate(pool):
        out += [dataclasses.replace(r, replica=index) for r in server.records()]
    return out


def _each(action: Callable[[Router], object], routers: Iterable[Router]) -> None:
    """``action`` on every router side by side: a router takes about a second to start and
    another to stop, before and after the measured cell; any failure is raised."""
    with ThreadPoolExecutor() as pool:
        for done in [pool.submit(action, router) for router in routers]:
            done.result()


def _cell(config: ScaleOutConfig, result: ScaleOutResult, pools: dict[Role, list[ServerProcess]],
          level: Level, replicas: int, keyed: bool) -> ScaleCell:
    trace = TraceSpec(config.seed, level.paragraphs, rule2=level.rule2)
    numbers = tuple(range(1, level.conversations + 1))
    latencies = {role: config.latency(role) for role in ROLES}
    for role in ROLES:
        for server in pools[role]:
            server.set_trace(trace, (WARMUP_CONVERSATION, *numbers))
            server.set_latency(latencies[role])
            server.reset()
    routers = {role: Router(config.router, [s.url for s in pools[role][:replicas]],
                            extra_args=config.router_args, startup_timeout=60)
               for role in ROLES}
    try:
        _each(Router.start, routers.values())
        spec = CellSpec(KEYED_POLICY[keyed], numbers, routers["small"].url,
                        routers["target"].url, trace)
        out = run_cell_in_child(spec) if config.isolate else run_cell(spec)
    finally:
        _each(Router.stop, routers.values())
    result.errors.extend(out.errors)
    records = {role: _records(pools[role][:replicas]) for role in ROLES}
    return scale_cell(replicas=replicas, keyed=keyed, scale=config.scale,
                      max_batch=config.max_batch, outcomes=out.outcomes, records=records,
                      latencies=latencies, errors=len(out.errors))


def run_scale_out(config: ScaleOutConfig,
                  progress: Progress = lambda message: None) -> ScaleOutResult:
    """Run every cell of ``config``: levels x replica counts x (with, without the key)."""
    reason = unavailable_reason(config.router)
    if reason is not None:
        raise RuntimeError(f"specthink bench --replicas needs a router: {reason}")
    started = time.monotonic()
    result = ScaleOutResult(config=config, machine=_machine(),
                            started=datetime.datetime.now(datetime.UTC).isoformat(
                                timespec="seconds"))
    result.machine["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    most = max(config.replicas)
    first = TraceSpec(config.seed, config.levels[0].paragraphs)
    progress(f"starting {most} replicas per role")
    pools: dict[Role, list[ServerProcess]] = {
        role: [ServerProcess(ServerSpec(role, first, config.latency(role))) for _ in range(most)]
        for role in ROLES}
    everything = [server for pool in pools.values() for server in pool]
    try:
        for server in everything:
            server.launch()
        for server in everything:
            server.wait_ready()
        for level in config.levels:
            for replicas in sorted(config.replicas):
                for keyed in (True, False):
                    progress(f"{level.conversations} conversations, {replicas} replica(s) per "
                             f"role, {'with' if keyed else 'without'} the routing key")
                    result.cells.append(_cell(config, result, pools, level, replicas, keyed))
    finally:
        for server in everything:
            server.stop()
    result.machine["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- report


def _speedup(result: ScaleOutResult, cell: ScaleCell) -> float | None:
    try:
        one = result.cell(1, cell.conversations, cell.keyed)
    except KeyError:
        return None
    base = one.tokens_per_second_unscaled
    return cell.tokens_per_second_unscaled / base if base else None


def scale_headline(result: ScaleOutResult) -> list[str]:
    """The run against its targets, one line each."""
    lines = []
    for level in sorted({c.conversations for c in result.cells}):
        for cell in (c for c in result.cells if c.conversations == level and c.keyed):
            speedup = _speedup(result, cell)
            if cell.replicas == 1 or speedup is None:
                continue
            verdict = "met" if speedup >= 0.9 * cell.replicas else "NOT met"
            lines.append(f"{level} conversations, {cell.replicas} replicas per role with the "
                         f"key: {speedup:.2f}x one replica's throughput (target >= "
                         f"{0.9 * cell.replicas:.1f}x: {verdict})")
        keyed = [c for c in result.cells if c.conversations == level and c.keyed]
        worst = min((c.cache_share_previous_min for c in keyed
                     if c.cache_share_previous_min is not None), default=None)
        if worst is not None:
            verdict = "met" if worst >= 0.99 else "NOT met"
            lines.append(f"{level} conversations with the key: every follow-up request found "
                         f">= {100 * worst:.2f} % of its previous prompt cached (target >= 99 "
                         f"%: {verdict})")
        for cell in (c for c in result.cells if c.conversations == level and not c.keyed):
            try:
                with_key = result.cell(cell.replicas, level, True)
            except KeyError:
                continue
            if cell.replicas == 1:
                continue
            loss = 1 - cell.tokens_per_second / with_key.tokens_per_second
            lines.append(
                f"{level} conversations, {cell.replicas} replicas per role without the key: "
                f"throughput {-100 * loss:+.1f} % against the key, "
                f"{cell.recomputed_per_request:,.0f} prompt "
                f"tokens recomputed per request (with the key "
                f"{with_key.recomputed_per_request:,.0f}), previous prompt cached "
                f"{_pct(cell.cache_share_previous)} (worst {_pct(cell.cache_share_previous_min)})")
    return lines


def scale_to_markdown(result: ScaleOutResult) -> str:
    config = result.config
    small, target = config.latency("small"), config.latency("target")
    lines = [
        "# Scale-out: replica pools behind a router",
        "",
        f"Generated by `{COMMAND}` ({result.started}, {result.seconds / 60:.1f} min; Python "
        f"{result.machine['python']}, {result.machine['cpus']} CPUs, load average "
        f"{result.machine['loadavg']} before and {result.machine.get('loadavg_after', '?')} "
        f"after). Every figure is also in [scale-out.json](scale-out.json); what it means: "
        f"[docs/scale-out.md](../scale-out.md).",
        "",
        f"- replicas: loopback servers playing the bench's reasoning traces at the GPU profiles' "
        f"speed ({config.small.name}; {config.target.name}) times {config.scale:.2f} (column "
        f"*tokens/s at scale 1* converts back), each running up to {config.max_batch} "
        f"generations at full speed and sharing itself beyond that",
        f"- router: one `{config.router}` per role (`--policy cache_aware --sticky-sessions "
        f"--routing-key-headers x-session-id --assignment-mode min_load`"
        f"{' ' + ' '.join(config.router_args) if config.router_args else ''}), fresh for "
        f"every cell, in front of the first K replicas; the engine speaks OpenAI "
        f"`/v1/completions` through it",
        "- *with the key*: every request of a call carries the call's routing key in "
        "`X-Session-ID` (the default); *without*: no routing header "
        "(`routing_headers=()`), so the router places each request by prefix match and load",
        f"- per-token time at this scale: small {1000 * small.per_token:.1f} ms, target "
        f"{1000 * target.per_token:.1f} ms",
        "",
        "## Targets",
        "",
        *(f"- {line}" for line in scale_headline(result)),
        "",
        "## Cells",
        "",
        "*Ideal*: the larger of the longest conversation's own service time and each pool's "
        "work over its K x batch slots. *Speed-up*: tokens/s over the same row's 1-replica "
        "cell. *Recomputed*: prompt tokens not served from the prefix cache, per request (all "
        "requests / follow-ups only). *Previous prompt cached*: of each follow-up request's "
        "previous prompt in the same pool, the share the replica it reached held (overall, "
        "worst). *Replicas/conv.*: how many replicas of a pool served one conversation.",
        "",
        "| conversations | replicas per role | routing key | tokens/s | tokens/s at scale 1 | "
        "speed-up | wall s | wall/ideal | requests | recomputed per request (follow-ups) | "
        "previous prompt cached (worst) | replicas/conv. | retries / fallbacks / failed |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for cell in sorted(result.cells, key=lambda c: (c.conversations, c.replicas, not c.keyed)):
        speedup = _speedup(result, cell)
        lines.append(
            f"| {cell.conversations} | {cell.replicas} | {'with' if cell.keyed else 'without'} "
            f"| {_num(cell.tokens_per_second, 0)} | {_num(cell.tokens_per_second_unscaled, 0)} "
            f"| {_num(speedup)}x | {_num(cell.wall_seconds, 1)} | "
            f"{_num(cell.wall_over_ideal, 3)} | {cell.requests} | "
            f"{_num(cell.recomputed_per_request, 0)} ({_num(cell.recomputed_per_follow_up, 0)}) "
            f"| {_pct(cell.cache_share_previous)} ({_pct(cell.cache_share_previous_min)}) | "
            f"{_num(cell.replicas_per_conversation)} | {cell.retries} / {cell.fallbacks} / "
            f"{cell.errors} |")
    if result.errors:
        lines += ["", "## Errors", "", f"{len(result.errors)} conversation(s) failed; the first:",
                  "", "```", result.errors[0].strip()[-2000:], "```"]
    return "\n".join(lines) + "\n"


def scale_to_json(result: ScaleOutResult) -> dict[str, Any]:
    cells = []
    for cell in result.cells:
        data = dataclasses.asdict(cell)
        data.update(tokens_per_second=cell.tokens_per_second,
                    tokens_per_second_unscaled=cell.tokens_per_second_unscaled,
                    wall_over_ideal=cell.wall_over_ideal, speedup=_speedup(result, cell))
        cells.append(data)
    config = dataclasses.asdict(result.config)
    config["scale"] = result.config.scale
    data = {"command": COMMAND, "started": result.started, "seconds": result.seconds,
            "machine": result.machine, "config": config, "cells": cells,
            "targets": scale_headline(result), "errors": result.errors}
    return _no_nan(data)  # type: ignore[no-any-return]


def write_scale_report(result: ScaleOutResult, out: Path) -> list[Path]:
    """``scale-out.md`` and ``scale-out.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    markdown, data = out / "scale-out.md", out / "scale-out.json"
    markdown.write_text(scale_to_markdown(result))
    data.write_text(json.dumps(scale_to_json(result), indent=2) + "\n")
    return [markdown, data]
