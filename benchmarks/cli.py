"""The ``bench`` command: ``specthink bench --out docs/benchmarks`` (or
``python -m benchmarks``). Progress and the headline go to stderr; the written files'
paths (or, with ``--json``, every figure) go to stdout."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from benchmarks.report import headline, to_json, write_report
from benchmarks.runner import BenchConfig, Level, run_bench

__all__ = ["bench", "parse_levels", "register"]

Config = TypeVar("Config", bound=Any)
"""One of the benchmarks' frozen dataclass configurations."""


def parse_levels(text: str) -> tuple[Level, ...]:
    """``"1x30,16x12,256x5/no-rule2"``: conversations x paragraphs per trace, per level;
    ``/no-rule2`` makes traces in which the target never verifies."""
    levels = []
    for part in text.split(","):
        shape, _, option = part.strip().partition("/")
        conversations, sep, paragraphs = shape.partition("x")
        if (not sep or not conversations.isdigit() or not paragraphs.isdigit()
                or option not in ("", "no-rule2")):
            raise typer.BadParameter(
                f"{part!r}: write CONVERSATIONSxPARAGRAPHS[/no-rule2], e.g. 16x12")
        level = Level(int(conversations), int(paragraphs), rule2=option != "no-rule2")
        if level.conversations < 1 or level.paragraphs < 3:
            raise typer.BadParameter(f"{part!r}: at least 1 conversation and 3 paragraphs")
        levels.append(level)
    return tuple(levels)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def bench(
    out: Annotated[Path, typer.Option(help="Directory for results.md, results.json and plots.")]
    = Path("docs/benchmarks"),
    quick: Annotated[bool, typer.Option(
        help="Tiny traces and near-zero latencies: a smoke run of seconds.")] = False,
    levels: Annotated[str | None, typer.Option(
        help="Concurrency levels as CONVERSATIONSxPARAGRAPHS, each optionally followed by "
             "/no-rule2, comma-separated (default 1x30,16x12,256x5/no-rule2).")] = None,
    policies: Annotated[str | None, typer.Option(
        help="Comma-separated: engine, authors, small, target (default: all).")] = None,
    layouts: Annotated[str | None, typer.Option(
        help="Extra connection-pool layouts for the engine at the largest level "
             "(default single-client,per-conversation; also clients-K; '' for none).")] = None,
    time_scale: Annotated[float | None, typer.Option(
        help="Multiply every latency by at least this (default: the slowest of a 5 ms "
             "per-token floor and the servers' event budget).")] = None,
    event_budget: Annotated[float | None, typer.Option(
        help="Tokens/s all conversations may stream together (default: half of what the "
             "engine gets through on this machine at zero latency, measured first).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the scripted traces.")] = 0,
    throughput: Annotated[bool, typer.Option(
        help="Measure the client alone against zero-latency servers.")] = True,
    hot_spots: Annotated[bool, typer.Option(help="Profile the client (cProfile).")] = True,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print every figure as JSON on stdout.")] = False,
    ttft: Annotated[bool, typer.Option(
        help="Instead: time to first token at 1, 16 and 256 conversations for specthink and "
             "bare clients, written to ttft.md and ttft.json.")] = False,
    ttft_rounds: Annotated[int | None, typer.Option(
        min=1, help="With --ttft: rounds of every client at every level (default 3).")] = None,
    ttft_gc_freeze: Annotated[bool, typer.Option(
        help="With --ttft: each client process calls gc.freeze() after its warm-up; written "
             "to ttft-gc-freeze.md and .json.")] = False,
    ttft_clients: Annotated[str | None, typer.Option(
        help="With --ttft: comma-separated clients to run (default: all); the ratios need "
             "httpx among them, the issue's targets langchain too.")] = None,
    replicas: Annotated[str | None, typer.Option(
        help="Scale-out instead: comma-separated replicas per role behind smg (e.g. 1,2,4), "
             "with and without the routing key; --levels default 64x8,256x6. Writes "
             "scale-out.md and scale-out.json.")] = None,
) -> None:
    """Measure the engine against the latency model's limit, the authors' control loop, and
    each model alone, on loopback servers that behave like GPU servers."""
    if ttft:
        _ttft(out, quick=quick, seed=seed, rounds=ttft_rounds, gc_freeze=ttft_gc_freeze,
              clients=ttft_clients, json_output=json_output)
        return
    if replicas is not None:
        _scale_out(out, replicas, levels, quick=quick, seed=seed, json_output=json_output)
        return
    config = BenchConfig.quick() if quick else BenchConfig()
    changes: dict[str, object] = {"seed": seed, "hot_spots": hot_spots}
    if not throughput:
        changes["throughput_conversations"] = 0
    if levels is not None:
        changes["levels"] = parse_levels(levels)
    if policies is not None:
        changes["policies"] = _names(policies)
    if layouts is not None:
        changes["layouts"] = _names(layouts)
    if time_scale is not None:
        changes["time_scale"] = time_scale
    if event_budget is not None:
        changes["event_budget"] = event_budget
    config = _configured(config, changes)
    err = Console(stderr=True, highlight=False)
    if err.is_terminal:
        with err.status("starting") as status:
            result = run_bench(config, progress=lambda message: status.update(message))
    else:  # a log: one line per step, with the time since the start
        result = run_bench(config, progress=_timed_log(err))
    _report(err, write_report(result, out), headline(result), to_json(result),
            errors=len(result.errors), json_output=json_output)


def _timed_log(err: Console) -> Callable[[str], None]:
    """A progress callback printing each step with the seconds since the start."""
    started = time.monotonic()

    def log(message: str) -> None:
        err.print(f"[dim]{time.monotonic() - started:7.1f} s[/] {message}")

    return log


def _report(err: Console, files: list[Path], lines: Iterable[str], data: object, *,
            errors: int, json_output: bool) -> None:
    """The headline on stderr, the JSON or the written files on stdout; exit 1 on errors."""
    for line in lines:
        err.print(f"[bold]•[/] {line}")
    if json_output:
        print(json.dumps(data, indent=2))
    else:
        for path in files:
            print(path)
    if errors:
        err.print(f"[red]{errors} conversation(s) failed; see {files[0]}[/]")
        raise typer.Exit(1)


def _replica_counts(text: str) -> tuple[int, ...]:
    counts = _names(text)
    if not counts or not all(c.isdigit() and int(c) >= 1 for c in counts):
        raise typer.BadParameter(f"{text!r}: write replica counts per role, e.g. 1,2,4")
    return tuple(sorted({int(c) for c in counts}))


def _configured(config: Config, changes: dict[str, object]) -> Config:
    """``config`` with ``changes``; a value the config refuses is a usage error."""
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _scale_out(out: Path, replicas: str, levels: str | None, *, quick: bool, seed: int,
               json_output: bool) -> None:
    """``--replicas``: the scale-out cells (see :mod:`benchmarks.scaleout`)."""
    from benchmarks.scaleout import (
        ScaleOutConfig,
        run_scale_out,
        scale_headline,
        scale_to_json,
        write_scale_report,
    )

    config = ScaleOutConfig.quick() if quick else ScaleOutConfig()
    changes: dict[str, object] = {"replicas": _replica_counts(replicas), "seed": seed}
    if levels is not None:
        changes["levels"] = parse_levels(levels)
    config = _configured(config, changes)
    err = Console(stderr=True, highlight=False)
    result = run_scale_out(config, progress=_timed_log(err))
    _report(err, write_scale_report(result, out), scale_headline(result), scale_to_json(result),
            errors=len(result.errors), json_output=json_output)


def _ttft(out: Path, *, quick: bool, seed: int, rounds: int | None, gc_freeze: bool,
          clients: str | None, json_output: bool) -> None:
    """``--ttft``: run, write ``ttft.md``/``ttft.json``, print the targets (see
    :mod:`benchmarks.ttft`)."""
    from benchmarks.ttft import TTFTConfig, run_ttft, targets, write_ttft
    from benchmarks.ttft import to_json as ttft_to_json

    config = TTFTConfig.quick() if quick else TTFTConfig()
    changes: dict[str, object] = {
        "seed": seed, "gc_freeze": gc_freeze, "rounds": config.rounds if rounds is None else rounds}
    if clients is not None:
        changes["clients"] = _names(clients)
    config = _configured(config, changes)
    err = Console(stderr=True, highlight=False)
    result = run_ttft(config, progress=_timed_log(err))
    verdicts = (f"{t.name}: {t.measured} "
                f"({'—' if t.met is None else 'met' if t.met else 'MISSED'})"
                for t in targets(result))
    _report(err, write_ttft(result, out), verdicts, ttft_to_json(result),
            errors=len(result.errors), json_output=json_output)


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to the ``specthink`` application."""
    app.command("bench")(bench)
