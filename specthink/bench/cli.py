"""The ``bench`` command: ``specthink bench --out docs/benchmarks`` (or
``python -m specthink.bench``). Progress and the headline go to stderr; the written files'
paths (or, with ``--json``, every figure) go to stdout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from specthink.bench.report import headline, to_json, write_report
from specthink.bench.runner import BenchConfig, Level, run_bench

__all__ = ["bench", "parse_levels", "register"]


def parse_levels(text: str) -> tuple[Level, ...]:
    """``"1x30,16x12,256x5"``: conversations x paragraphs per trace, per level."""
    levels = []
    for part in text.split(","):
        conversations, sep, paragraphs = part.strip().partition("x")
        if not sep or not conversations.isdigit() or not paragraphs.isdigit():
            raise typer.BadParameter(f"{part!r}: write CONVERSATIONSxPARAGRAPHS, e.g. 16x12")
        level = Level(int(conversations), int(paragraphs))
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
        help="Concurrency levels as CONVERSATIONSxPARAGRAPHS, comma-separated "
             "(default 1x30,16x12,256x5).")] = None,
    policies: Annotated[str | None, typer.Option(
        help="Comma-separated: engine, authors, small, target (default: all).")] = None,
    layouts: Annotated[str | None, typer.Option(
        help="Extra connection-pool layouts for the engine at the largest level "
             "(default sharded-16,per-conversation; '' for none).")] = None,
    time_scale: Annotated[float | None, typer.Option(
        help="Multiply every latency by at least this (default: the slowest of a 5 ms "
             "per-token floor and the servers' event budget).")] = None,
    event_budget: Annotated[float | None, typer.Option(
        help="Tokens/s all loopback servers may stream together (default: 0.6 of what one "
             "streams on this machine, measured first).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the scripted traces.")] = 0,
    throughput: Annotated[bool, typer.Option(
        help="Measure the client alone against zero-latency servers.")] = True,
    hot_spots: Annotated[bool, typer.Option(help="Profile the client (cProfile).")] = True,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print every figure as JSON on stdout.")] = False,
) -> None:
    """Measure the engine against the latency model's limit, the authors' control loop, and
    each model alone, on loopback servers that behave like GPU servers."""
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
    try:
        config = dataclasses.replace(config, **changes)  # type: ignore[arg-type]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    err = Console(stderr=True, highlight=False)
    with err.status("starting") as status:
        result = run_bench(config, progress=lambda message: status.update(message))
    files = write_report(result, out)
    for line in headline(result):
        err.print(f"[bold]•[/] {line}")
    if json_output:
        print(json.dumps(to_json(result), indent=2))
    else:
        for path in files:
            print(path)
    if result.errors:
        err.print(f"[red]{len(result.errors)} conversation(s) failed; see {files[0]}[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to the ``specthink`` application."""
    app.command("bench")(bench)
