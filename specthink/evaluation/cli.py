"""``specthink eval``: accuracy, output length and target share on a problem file.

    specthink eval --dataset math500.jsonl --small URL --target URL --out results/math500
    specthink eval --dataset sample --mode small --mode speculative --limit 5 --out /tmp/try

The top-level ``specthink`` command adds this one through :func:`register`. Progress and the
summary table go to stderr; stdout gets the paths of the files written (or, with ``--json``, the
summary as JSON). Exit codes: 2 bad input, 3 a server failed before the run could start, 1 when
some answers failed to generate (rerun to retry them), 130 when interrupted (rerun to resume).

The pair's options build one :class:`~specthink.settings.PairSettings` (with only the roles the
modes need), checked as on every other surface before any request; the evaluation's own ones
(budget, sampling, concurrency) an :class:`~specthink.evaluation.runner.EvalSettings`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from specthink._cli_options import (
    AUTO,
    ApiKey,
    ResponseTemplate,
    SmallModel,
    SmallTemplate,
    TargetModel,
    TargetTemplate,
    TemplateKwargs,
    backend_option,
    error_text,
    open_backends,
    stderr,
    template_kwargs_value,
    url_option,
)
from specthink.backends.base import SamplingParams
from specthink.errors import BackendError, ConfigError, SpecthinkError
from specthink.rules import PRESETS
from specthink.settings import ROLES, PairSettings, Role

__all__ = ["eval_command", "register"]

INSTALL_HINT = "specthink eval needs the `eval` extra: pip install 'specthink[eval]'"
EXIT_CONFIG, EXIT_BACKEND, EXIT_FAILED_ANSWERS, EXIT_INTERRUPTED = 2, 3, 1, 130


class ModeChoice(StrEnum):
    """The modes, in the paper's order."""

    small = "small"
    speculative = "speculative"
    target = "target"


def _missing_extras() -> list[str]:
    return [name for name in ("math_verify", "matplotlib")
            if importlib.util.find_spec(name) is None]


class _ProgressView:
    """The progress bar, with each mode's running score in its description."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None
        self.scores: dict[str, list[int]] = {}

    def start(self, pending: int, resumed: int) -> None:
        if resumed:
            self.progress.console.print(Text(
                f"resuming: {resumed} answers already recorded, {pending} to go", style="dim"))
        self.task = self.progress.add_task("answering", total=pending)

    def record(self, record: Any) -> None:
        correct, seen = self.scores.setdefault(record.mode, [0, 0])
        self.scores[record.mode] = [correct + int(record.correct), seen + 1]
        description = "  ".join(f"{mode} {self.scores[mode][0]}/{self.scores[mode][1]} right"
                                for mode in ModeChoice if mode in self.scores)
        self.progress.update(self.task, advance=1, description=description)
        if record.error:
            self.progress.console.print(Text(f"{record.id} ({record.mode}): {record.error}",
                                             style="red"), soft_wrap=True)


async def _run(*, problems: list[Any], pair: PairSettings, roles: list[Role], detect: bool,
               modes: list[str], settings: Any, out: Path, grading_workers: int,
               grading_timeout: float, err: Console) -> Any:
    from specthink.evaluation.grading import Grader
    from specthink.evaluation.runner import cast_modes, run_evaluation

    pair, backends = await open_backends(pair, roles, detect=detect)
    try:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=err,
                            transient=False)
        view = _ProgressView(progress)
        # Not started here: run_evaluation starts the workers only when there is work to grade.
        grader = Grader(workers=grading_workers, timeout=grading_timeout)
        try:
            with progress:
                return await run_evaluation(
                    problems, small=backends.get("small"), target=backends.get("target"),
                    out_dir=out, modes=cast_modes(modes), settings=settings, pair=pair,
                    grader=grader, on_start=view.start, on_record=view.record)
        finally:
            grader.close()
    finally:
        await asyncio.gather(*(backend.aclose() for backend in backends.values()))


def eval_command(
    dataset: Annotated[str, typer.Option(
        "--dataset", help="Problem file (.jsonl, .json or .csv: MATH500, AIME, AMC23, "
        "GPQA-Diamond or {problem, answer, id} lines), or `sample` for the bundled 20 problems.",
    )],
    out: Annotated[Path, typer.Option(
        "--out", file_okay=False, help="Directory for results.jsonl, run.json, summary.md, "
        "summary.json and plot.png; an existing run there is resumed.")] = Path("results"),
    small: Annotated[str | None, url_option(
        "small", help="URL of the small model's server.")] = None,
    target: Annotated[str | None, url_option(
        "target", help="URL of the target model's server.")] = None,
    backend: Annotated[str, backend_option(
        help="Wire protocol of both servers (openai: /v1/completions, e.g. vLLM, SGLang), or "
             "auto (GET /info decides).",
    )] = AUTO,
    mode: Annotated[list[ModeChoice] | None, typer.Option(
        "--mode", help="Run this mode (repeatable) [default: small, speculative and target].",
        show_default=False)] = None,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", min=1, help="Answers generated at once, all modes together.")] = 8,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Only the first N problems of the file.")] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", min=1, help="Output token budget per answer (the servers' "
        "max_total_tokens also caps prompt + output; the paper used 32768 for both).")] = 32768,
    rules: Annotated[str | None, typer.Option(
        "--rules", show_default=False, help=f"Takeover rules of the speculative mode: "
        f"{', '.join(PRESETS)} (paper_instruct for a non-reasoning small model) "
        "\\[default: $SPECTHINK_RULES, else paper].")] = None,
    template: Annotated[str, typer.Option(
        "--template", help="Chat template of both models: auto (the server's), server, chatml, "
        "deepseek-r1.")] = "auto",
    small_template: SmallTemplate = None,
    target_template: TargetTemplate = None,
    response_template: ResponseTemplate = None,
    template_kwargs: TemplateKwargs = None,
    small_model: SmallModel = None,
    target_model: TargetModel = None,
    api_key: ApiKey = None,
    temperature: Annotated[float, typer.Option(
        "--temperature", min=0.0, help="Sampling temperature (0: greedy).")] = 0.6,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 50,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    grading_workers: Annotated[int, typer.Option(
        "--grading-workers", min=1, help="Processes comparing maths answers.")] = 2,
    grading_timeout: Annotated[float, typer.Option(
        "--grading-timeout", min=0.1, help="Seconds one comparison may take before its "
        "worker is replaced and the answer counted wrong.")] = 10.0,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Evaluate accuracy, output length and target share, as in the paper's Table 2.

    Each problem is answered in each mode (small alone, speculative, target alone), graded from
    its last \\boxed{} answer, and written to OUT/results.jsonl at once; run the same command
    again to resume an interrupted run.
    """
    err = stderr()
    missing = _missing_extras()
    if missing:
        err.print(Text(f"{INSTALL_HINT} (missing: {', '.join(missing)})", style="bold red"))
        raise typer.Exit(1)
    from specthink.evaluation.datasets import SAMPLE, load_problems
    from specthink.evaluation.report import rich_table, summarize, write_reports
    from specthink.evaluation.runner import MODES, EvalSettings

    modes = [m.value for m in mode] if mode else list(MODES)
    kwargs = template_kwargs_value(template_kwargs)
    try:
        roles: list[Role] = [role for role in ROLES if any(m in (role, "speculative")
                                                              for m in modes)]
        urls = {"small": small, "target": target}
        for role in roles:
            if not urls[role]:
                option = f"--{role} / SPECTHINK_{role.upper()}_URL"
                raise ConfigError(f"the modes {', '.join(modes)} need the {role} model's server: "
                                  f"set {option}")
        # The pair's one declaration of its settings, for the roles the modes need. With
        # --backend auto the protocol is known only once the servers answer: the settings are
        # checked with TGI's meanwhile (nothing else depends on it), and the detected one
        # replaces it before any engine is built.
        pair = PairSettings.for_roles(
            roles, **{f"{role}_url": url for role, url in urls.items() if url},
            backend="tgi" if backend == AUTO else backend, small_model=small_model,
            target_model=target_model, **({"rules": rules} if rules is not None else {}),
            small_template=small_template or template,
            target_template=target_template or template,
            response_template=response_template, template_kwargs=kwargs, api_key=api_key)
        problems = load_problems(dataset)
        if limit is not None:
            problems = problems[:limit]
        sampling = (SamplingParams(temperature=temperature, top_p=top_p if top_p < 1 else None,
                                   top_k=top_k or None, seed=seed)
                    if temperature > 0 else SamplingParams(seed=seed))
        settings = EvalSettings(max_tokens=max_tokens, sampling=sampling,
                                concurrency=concurrency)
        run = asyncio.run(_run(
            problems=problems, pair=pair, roles=roles, detect=backend == AUTO, modes=modes,
            settings=settings, out=out, grading_workers=grading_workers,
            grading_timeout=grading_timeout, err=err))
    except KeyboardInterrupt:
        err.print(Text(f"interrupted; the answers so far are in {out / 'results.jsonl'}: "
                       "run the same command again to resume", style="yellow"))
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except SpecthinkError as error:
        code = (EXIT_CONFIG if isinstance(error, ConfigError)
                else EXIT_BACKEND if isinstance(error, BackendError) else 1)
        err.print(Text(f"error: {error_text(error)}", style="bold red"), soft_wrap=True)
        raise typer.Exit(code) from error

    name = "sample" if dataset == SAMPLE and not Path(dataset).exists() else Path(dataset).stem
    run_info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    summaries = summarize(run.records)
    paths = write_reports(summaries, out, dataset=name, models=run_info.get("models"))
    err.print(rich_table(summaries, title=f"{name}: {len(problems)} problems "
                                          f"({run.generated} answered now, {run.resumed} resumed)"))
    if as_json:
        sys.stdout.write(paths["json"].read_text(encoding="utf-8"))
    else:
        sys.stdout.write("".join(f"{p}\n" for p in (out / "results.jsonl", *paths.values())))
    failed = sum(s.errors for s in summaries)
    if failed:
        err.print(Text(f"{failed} answers failed to generate (counted wrong); run the same "
                       "command again to retry them", style="yellow"))
        raise typer.Exit(EXIT_FAILED_ANSWERS)


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to the ``specthink`` application."""
    app.command("eval")(eval_command)
