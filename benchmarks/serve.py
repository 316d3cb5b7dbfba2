"""The benchmark "through ``specthink serve``": the same traces and latency model as the
in-process engine, answered by an OpenAI client streaming from a ``specthink serve`` process
that runs the engine (``python -m benchmarks.serve`` or ``specthink bench-serve``).

Per level (1, 16, 256 conversations at once): wall/ideal of the in-process engine, of the
server with one worker and with ``--workers 2``, each through chat completions and through the
Responses API (``POST /v1/responses``), and the time to first token each adds over the
in-process engine (p50/p99, per conversation, same trace and latencies); each Responses row
also as a ratio to the chat row beside it, measured in the same run. The server runs in a
process of its own (started by the policy, in the client's cell process), so the client's CPU
figures stay the client's.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from benchmarks.cli import parse_levels
from benchmarks.metrics import cell_metrics
from benchmarks.runner import BenchConfig, Level, measure_capacity
from benchmarks.serve_policy import LAYOUTS, ServePolicy, ServeResponsesPolicy
from benchmarks.servers import ServerPair
from benchmarks.traces import TraceSpec
from benchmarks.worker import WARMUP_CONVERSATION, CellSpec, run_cell, run_cell_in_child
from specthink.output import split_reasoning

__all__ = ["CELLS", "ServeBenchResult", "ServePolicy", "ServeRow", "bench_serve", "register",
           "run_serve_bench", "write_report"]

@dataclass(slots=True)
class ServeRow:
    """One cell: a way of answering at one concurrency."""

    how: str
    conversations: int
    api: str | None
    """``chat`` (``/v1/chat/completions``), ``responses`` (``/v1/responses``), or ``None``
    for the in-process engine."""
    workers: int | None
    wall_over_ideal: float
    """Mean over conversations of wall time / the latency model's time."""
    ttft_p50: float | None
    ttft_p99: float | None
    added_ttft_p50: float | None = None
    """Per conversation: this cell's time to first text minus the in-process engine's."""
    added_ttft_p99: float | None = None
    same_text: bool | None = None
    """Every conversation's reasoning and answer equal the in-process engine's."""
    errors: int = 0
    vs_chat: dict[str, float | None] | None = None
    """A Responses row's ``ttft_p50``, ``ttft_p99`` and ``wall_over_ideal`` over the chat row's
    at the same level and workers (1.0: the same; above: the Responses API is slower): the
    median over :attr:`vs_chat_runs`."""
    vs_chat_runs: list[dict[str, float | None]] = field(default_factory=list)
    """The same ratios for each pair of runs, chat then Responses (the first: the table's)."""


@dataclass(slots=True)
class ServeBenchResult:
    started: str
    levels: tuple[Level, ...]
    rows: list[ServeRow] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    event_budget: float = 0.0
    loadavg: str = ""
    """The machine's load average (1, 5, 15 min) before and after the run."""


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


CELLS = (("in-process engine", "engine", "default"),
         ("specthink serve, 1 worker, chat completions", ServePolicy.name, "default"),
         ("specthink serve, 1 worker, /v1/responses", ServeResponsesPolicy.name, "default"),
         ("specthink serve, --workers 2, chat completions", ServePolicy.name, "workers-2"),
         ("specthink serve, --workers 2, /v1/responses", ServeResponsesPolicy.name, "workers-2"))
"""(row name, policy, layout), in the order they run: each Responses cell right after the chat
cell it is compared with, so a change in the machine's load between them stays small."""

_APIS = {ServePolicy.name: "chat", ServeResponsesPolicy.name: "responses"}


def _ratio(responses: float | None, chat: float | None) -> float | None:
    return None if responses is None or not chat else responses / chat


@dataclass(slots=True)
class _LevelRun:
    """What the cells of one level share: its servers, trace and latencies, and the
    in-process engine run's first texts and answers, which the served cells are compared
    with."""

    config: BenchConfig
    servers: ServerPair
    result: ServeBenchResult
    say: Callable[[str], object]
    level: Level
    trace: TraceSpec
    scale: float
    latencies: dict[str, Any]
    numbers: tuple[int, ...]
    firsts: dict[int, float] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)

    def measure(self, how: str, policy: str, layout: str) -> ServeRow:
        """One cell: its row, compared with the in-process engine run of this level."""
        config, servers, result, level = self.config, self.servers, self.result, self.level
        trace, scale, latencies = self.trace, self.scale, self.latencies
        numbers, firsts, texts, say = self.numbers, self.firsts, self.texts, self.say
        say(f"{level.conversations} conversations: {how}")
        servers.prepare(trace, latencies["small"], latencies["target"],
                        (WARMUP_CONVERSATION, *numbers))
        spec = CellSpec(policy, numbers, servers.small.url, servers.target.url, trace,
                        layout=layout)
        out = run_cell_in_child(spec) if config.isolate else run_cell(spec)
        result.errors.extend(out.errors)
        metrics = cell_metrics(policy=policy, layout=layout, scale=scale,
                               outcomes=out.outcomes, records=servers.records(),
                               latencies=latencies, errors=len(out.errors),
                               cpu_seconds=out.cpu_seconds,
                               rss_peak_kb=out.rss_peak_kb,
                               rss_growth_kb=out.rss_growth_kb)
        ttft = {o.conversation: o.first_text - o.started for o in out.outcomes
                if o.first_text is not None}
        api = _APIS.get(policy)
        row = ServeRow(how, level.conversations, api,
                       None if api is None else LAYOUTS[layout],
                       metrics.mean_conversation_ratio,
                       _percentile(list(ttft.values()), 50),
                       _percentile(list(ttft.values()), 99), errors=len(out.errors))
        if policy == "engine":
            firsts.update(ttft)
            # The DeepSeek-R1 template opens the reasoning in the prompt.
            texts.update({o.conversation: "\x00".join(
                split_reasoning(o.text, starts_in_reasoning=True))
                for o in out.outcomes})
        else:
            row.same_text = bool(texts) and all(
                texts.get(o.conversation) == o.text for o in out.outcomes)
            added = [ttft[c] - firsts[c] for c in ttft if c in firsts]
            row.added_ttft_p50 = _percentile(added, 50)
            row.added_ttft_p99 = _percentile(added, 99)
        return row


def run_serve_bench(config: BenchConfig | None = None, progress: object = print,
                    cells: tuple[tuple[str, str, str], ...] = CELLS,
                    comparisons: int = 1) -> ServeBenchResult:
    """Every cell of ``cells`` (by default :data:`CELLS`; the in-process engine first, the
    others are compared with it) at every level of ``config``. Each Responses row is compared
    with its chat row over ``comparisons`` pairs of runs, chat then Responses, one after the
    other (the first pair is the rows of the table): its ``vs_chat`` is the median of the
    pairs' ratios, ``vs_chat_runs`` every pair's, since a single pair's ratio moves with the
    load of a shared machine."""
    config = config or BenchConfig()
    say = progress if callable(progress) else (lambda message: None)
    started = time.monotonic()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result = ServeBenchResult(
        started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        levels=config.levels)
    with ServerPair(TraceSpec(config.seed, config.levels[0].paragraphs)) as servers:
        budget = config.event_budget
        if budget is None:
            say("calibrating the event budget")
            budget = measure_capacity(servers, config.seed) * 0.5
        result.event_budget = budget
        for level in config.levels:
            trace = TraceSpec(config.seed, level.paragraphs, rule2=level.rule2)
            scale = config.scale_for("engine", level.conversations, budget)
            latencies = {"small": config.small.latency(scale),
                         "target": config.target.latency(scale)}
            numbers = tuple(range(1, level.conversations + 1))

            run = _LevelRun(config, servers, result, say, level, trace, scale, latencies,
                            numbers)
            measure = run.measure
            chat_cells: dict[str, tuple[str, str, str]] = {}
            chat_rows: dict[str, ServeRow] = {}
            compared: list[tuple[tuple[str, str, str], ServeRow]] = []
            for cell in cells:
                row = measure(*cell)
                layout = cell[2]
                if row.api == "chat":
                    chat_cells[layout], chat_rows[layout] = cell, row
                elif row.api == "responses" and layout in chat_rows:
                    row.vs_chat_runs = [_versus(row, chat_rows[layout])]
                    compared.append((cell, row))
                result.rows.append(row)
            for _ in range(comparisons - 1):
                for cell, row in compared:
                    chat = measure(*chat_cells[cell[2]])
                    row.vs_chat_runs.append(_versus(measure(*cell), chat))
            for _, row in compared:
                row.vs_chat = {name: _median([r[name] for r in row.vs_chat_runs])
                               for name in _COMPARED}
    result.seconds = time.monotonic() - started
    result.loadavg = (f"{load_before} before, "
                      + " ".join(f"{x:.2f}" for x in os.getloadavg()) + " after")
    return result


_COMPARED = ("ttft_p50", "ttft_p99", "wall_over_ideal")


def _versus(responses: ServeRow, chat: ServeRow) -> dict[str, float | None]:
    """A Responses row's figures over its chat row's."""
    return {name: _ratio(getattr(responses, name), getattr(chat, name)) for name in _COMPARED}


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.2f} ms"


def _same(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "NO")


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}×"


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.3f}×" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f}× to {high:.3f}×"


def responses_summary(result: ServeBenchResult) -> str | None:
    """One sentence: the Responses API against chat completions over the run's levels (the
    medians of each level's pairs)."""
    ratios = [row.vs_chat for row in result.rows if row.vs_chat is not None]
    spans = {}
    for name in ("ttft_p50", "ttft_p99", "wall_over_ideal"):
        values = [value for ratio in ratios if (value := ratio.get(name)) is not None]
        if not values:
            return None
        spans[name] = _span(values)
    return ("Through `/v1/responses`, against chat completions in the same run at the same "
            f"level and workers: TTFT p50 {spans['ttft_p50']}, TTFT p99 {spans['ttft_p99']}, "
            f"wall/ideal {spans['wall_over_ideal']} (1.000× is the same; above is slower).")


def write_report(result: ServeBenchResult, out: Path) -> Path:
    """``serve.md`` and ``serve.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Benchmark: through `specthink serve`",
        "",
        f"Run {result.started}, {result.seconds:.0f} s, on {os.cpu_count()} CPUs "
        f"(Python {sys.version.split()[0]}; load average {result.loadavg}). Same loopback TGI "
        "servers, traces and latency model as `specthink bench` (docs/benchmarks/results.md); "
        "the client streams from a `specthink serve` process instead of running the engine "
        "itself, through chat completions (`include_usage`; the end is `[DONE]`) and through "
        "the Responses API (`POST /v1/responses`, default `store`; first text is the first "
        "`response.reasoning_text.delta` or `response.output_text.delta`, the end "
        "`response.completed`), both read by httpx over the engine's lean transport. "
        "Written by `specthink bench-serve`.",
        "",
        "Wall/ideal: a conversation's wall time over the time the latency model needs for "
        "its requests (mean over conversations). Added time to first token: per conversation, "
        "the time to its first text through the server minus the in-process engine's, same "
        "trace and latencies (p50/p99 over conversations). Same text: every conversation's "
        "reasoning and answer, as the client received them, equal the in-process engine's. "
        "The server's own CPU is on the same 2 cores as the client and the model servers.",
        "",
        "| conversations | how | wall/ideal | TTFT p50 | TTFT p99 | added TTFT p50 | "
        "added TTFT p99 | same text | errors |",
        "|---:|---|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for row in result.rows:
        lines.append(f"| {row.conversations} | {row.how} | {row.wall_over_ideal:.4f} | "
                     f"{_ms(row.ttft_p50)} | {_ms(row.ttft_p99)} | {_ms(row.added_ttft_p50)} | "
                     f"{_ms(row.added_ttft_p99)} | {_same(row.same_text)} | {row.errors} |")
    lines += ["", "Targets (issue 15): ≤ 1 ms p50 added, wall/ideal ≤ 1.03 at 1 and ≤ 1.08 at "
              "256 conversations.", ""]
    compared = [row for row in result.rows if row.vs_chat is not None]
    if compared:
        pairs = max(len(row.vs_chat_runs) for row in compared)
        lines += ["## The Responses API against chat completions", "",
                  "Each `/v1/responses` cell over the chat completions cell run just before it "
                  "(same level, workers, conversations and latencies), the median over "
                  f"{pairs} such pair(s) of runs (the first pair is the table above); the "
                  "last column gives each pair's TTFT p50 ratio, since one pair moves with "
                  "the machine's load. Target (issue 23): no worse.", "",
                  "| conversations | workers | TTFT p50 | TTFT p99 | wall/ideal | "
                  "TTFT p50, each pair |",
                  "|---:|---:|---:|---:|---:|---|"]
        for row in compared:
            assert row.vs_chat is not None
            each = ", ".join(_times(run["ttft_p50"]) for run in row.vs_chat_runs)
            lines.append(f"| {row.conversations} | {row.workers} | "
                         f"{_times(row.vs_chat['ttft_p50'])} | "
                         f"{_times(row.vs_chat['ttft_p99'])} | "
                         f"{_times(row.vs_chat['wall_over_ideal'])} | {each} |")
        summary = responses_summary(result)
        lines += ["", *([summary, ""] if summary else [])]
    if result.errors:
        lines += ["## Errors", "", "```", *result.errors[:5], "```", ""]
    path = out / "serve.md"
    path.write_text("\n".join(lines))
    (out / "serve.json").write_bytes(orjson.dumps(dataclasses.asdict(result),
                                                  option=orjson.OPT_INDENT_2))
    return path


def bench_serve(
    out: Annotated[Path, typer.Option(help="Directory for serve.md and serve.json.")]
    = Path("docs/benchmarks"),
    quick: Annotated[bool, typer.Option(help="Tiny traces, near-zero latencies.")] = False,
    levels: Annotated[str | None, typer.Option(
        help="Concurrency levels as CONVERSATIONSxPARAGRAPHS, each optionally followed by "
             "/no-rule2, comma-separated (default 1x30,16x12,256x5/no-rule2).")] = None,
    comparisons: Annotated[int, typer.Option(
        min=1, help="Pairs of runs (chat, then Responses) each Responses ratio is the median "
                    "of.")] = 3,
) -> None:
    """The engine in-process against the same conversations through specthink serve.

    One worker and two, chat completions and the Responses API: wall/ideal and the time to
    first token the server adds."""
    config = BenchConfig.quick() if quick else BenchConfig()
    if levels is not None:
        config = dataclasses.replace(config, levels=parse_levels(levels))
    err = Console(stderr=True, highlight=False)
    print(write_report(run_serve_bench(config, progress=err.print, comparisons=comparisons),
                       out))


def register(app: typer.Typer) -> None:
    """Add the ``bench-serve`` command to the ``specthink`` application."""
    app.command("bench-serve")(bench_serve)


def main() -> None:
    """``python -m benchmarks.serve [--out DIR] [--quick] [--levels ...]``: the same options as
    ``specthink bench-serve`` (typer parses them, so ``--help`` helps rather than runs)."""
    typer.run(bench_serve)


if __name__ == "__main__":
    main()
