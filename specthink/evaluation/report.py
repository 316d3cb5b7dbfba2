"""The summary of a run, in the paper's format, as tables and a plot.

The paper's Table 2 cells read ``accuracy % / mean output tokens / target share``, the share only
for the speculative rows. Here:

- **accuracy** is correct answers over problems attempted; an answer that failed to generate
  counts as wrong (the table shows how many did, and resuming the run retries them);
- **mean output tokens** is over the answers generated;
- **target share** is the target model's tokens over all output tokens of the mode (token
  weighted, so long answers weigh more, as in counting every token of the run).

``rich`` (extra ``cli``) and ``matplotlib`` (extra ``eval``) are imported only by the functions
that need them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specthink.evaluation.runner import MODES, EvalRecord
from specthink.trace import Rule

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "MODE_LABELS",
    "ModeSummary",
    "markdown_report",
    "paper_cell",
    "rich_table",
    "summarize",
    "write_plot",
    "write_reports",
]

MODE_LABELS = {"small": "small alone", "speculative": "speculative", "target": "target alone"}
_COLOURS = {"small": "#1f77b4", "speculative": "#d62728", "target": "#2ca02c"}
_RULES = (Rule.AFFIRM_REFLECT.value, Rule.VERIFY.value, Rule.EXCESSIVE_REFLECTION.value)


@dataclass(frozen=True, slots=True)
class ModeSummary:
    """The figures of one mode over the problems it was run on."""

    mode: str
    problems: int
    answered: int
    """Problems with a generated answer (the rest failed with an error)."""
    correct: int
    accuracy: float
    """Percent of ``problems`` answered correctly."""
    mean_output_tokens: float
    target_share: float
    """Target tokens over all output tokens (0 for the small model alone, 1 for the target)."""
    unboxed: int
    """Answers without a ``\\boxed{}`` answer (counted wrong)."""
    errors: int
    grading_errors: int
    takeovers: dict[str, int] = field(default_factory=dict)
    mean_latency_seconds: float = 0.0


def summarize(records: Iterable[EvalRecord]) -> list[ModeSummary]:
    """One summary per mode present in ``records``, in the paper's order (small, speculative,
    target). For a record per (problem, mode), as :class:`EvalRun` gives."""
    by_mode: dict[str, list[EvalRecord]] = {}
    for record in records:
        by_mode.setdefault(record.mode, []).append(record)
    summaries: list[ModeSummary] = []
    for mode in [m for m in MODES if m in by_mode] + sorted(set(by_mode) - set(MODES)):
        rows = by_mode[mode]
        answered = [r for r in rows if r.error is None]
        correct = sum(1 for r in answered if r.correct)
        output = sum(r.output_tokens for r in answered)
        target = sum(r.tokens.get("target", 0) for r in answered)
        takeovers = {rule: sum(r.takeovers.get(rule, 0) for r in answered) for rule in _RULES}
        summaries.append(ModeSummary(
            mode=mode, problems=len(rows), answered=len(answered), correct=correct,
            accuracy=100.0 * correct / len(rows) if rows else 0.0,
            mean_output_tokens=output / len(answered) if answered else 0.0,
            target_share=target / output if output else 0.0,
            unboxed=sum(1 for r in answered if r.answer is None),
            errors=len(rows) - len(answered),
            grading_errors=sum(1 for r in answered if r.grading_error),
            takeovers=takeovers,
            mean_latency_seconds=(sum(r.latency_seconds for r in answered) / len(answered)
                                  if answered else 0.0)))
    return summaries


def _accuracy(value: float) -> str:
    """As the paper prints it: 89.4, 25.56, 75.0."""
    return f"{value:.1f}" if round(value, 2) == round(value, 1) else f"{value:.2f}"


def _share(value: float) -> str:
    text = f"{value:.2f}"
    return text[1:] if text.startswith("0.") else text


def paper_cell(summary: ModeSummary) -> str:
    """``accuracy / mean output tokens`` and, for the speculative mode, ``/ target share``."""
    cell = f"{_accuracy(summary.accuracy)} / {summary.mean_output_tokens:.0f}"
    if summary.mode == "speculative":
        cell += f" / {_share(summary.target_share)}"
    return cell


def _detail_rows(summaries: Sequence[ModeSummary]) -> tuple[list[str], list[list[str]]]:
    header = ["mode", "paper format", "correct", "accuracy %", "mean output tokens",
              "target share", *_RULES, "no boxed answer", "errors", "mean latency s"]
    rows = [[MODE_LABELS.get(s.mode, s.mode), paper_cell(s), f"{s.correct}/{s.problems}",
             f"{s.accuracy:.2f}", f"{s.mean_output_tokens:.1f}", f"{s.target_share:.3f}",
             *[str(s.takeovers.get(rule, 0)) for rule in _RULES], str(s.unboxed),
             str(s.errors) + (f" (+{s.grading_errors} ungraded)" if s.grading_errors else ""),
             f"{s.mean_latency_seconds:.2f}"] for s in summaries]
    return header, rows


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return lines


def markdown_report(summaries: Sequence[ModeSummary], *, dataset: str,
                    models: Mapping[str, str] | None = None) -> str:
    """The summary as markdown: the paper-format row, then the details of each mode."""
    problems = max((s.problems for s in summaries), default=0)
    lines = [f"# specthink eval: {dataset}", "",
             "Cells as in the paper's Table 2: accuracy % / mean output tokens / target share "
             "(the share only where both models write).", ""]
    lines += _markdown_table(
        ["dataset", *[MODE_LABELS.get(s.mode, s.mode) for s in summaries]],
        [[f"{dataset} ({problems} problems)", *[paper_cell(s) for s in summaries]]])
    lines += [""]
    header, rows = _detail_rows(summaries)
    lines += _markdown_table(header, rows)
    if models:
        lines += ["", "Models: " + ", ".join(f"{role} `{model}`"
                                             for role, model in sorted(models.items())) + "."]
    if any(s.errors for s in summaries):
        lines += ["", "Some answers failed to generate (column errors; counted wrong). Run the "
                      "same command again to retry only those."]
    return "\n".join(lines) + "\n"


def rich_table(summaries: Sequence[ModeSummary], *, title: str) -> Table:
    """The details table for the terminal (needs the ``cli`` extra)."""
    from rich.table import Table

    header, rows = _detail_rows(summaries)
    table = Table(title=title, title_justify="left")
    for index, name in enumerate(header):
        # The mode and its paper-format cell stay whole; narrow terminals wrap the others.
        table.add_column(name, justify="left" if index < 2 else "right",
                         style="bold" if index == 1 else None, no_wrap=index < 2)
    for row in rows:
        table.add_row(*row)
    return table


def write_plot(summaries: Sequence[ModeSummary], path: str | Path, *, title: str) -> Path:
    """A PNG of accuracy against target share (left) and against mean output length (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot state, no display, safe beside other threads.
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    share_axes, length_axes = figure.subplots(1, 2, sharey=True)
    for summary in summaries:
        colour = _COLOURS.get(summary.mode, "#555555")
        label = MODE_LABELS.get(summary.mode, summary.mode)
        for axes, x in ((share_axes, summary.target_share),
                        (length_axes, summary.mean_output_tokens)):
            axes.scatter([x], [summary.accuracy], s=70, color=colour, label=label, zorder=3)
            axes.annotate(f"{label}\n{_accuracy(summary.accuracy)}%", (x, summary.accuracy),
                          textcoords="offset points", xytext=(6, 6), fontsize=8)
    share_axes.set_xlim(-0.05, 1.05)
    share_axes.set_xlabel("target share of output tokens")
    share_axes.set_ylabel("accuracy (%)")
    length_axes.set_xlabel("mean output tokens")
    length_axes.set_xlim(left=0, right=max((s.mean_output_tokens for s in summaries),
                                           default=1.0) * 1.25 or 1.0)
    top = max((s.accuracy for s in summaries), default=0.0)
    share_axes.set_ylim(0, min(100.0, top + 10.0) if top else 100.0)
    for axes in (share_axes, length_axes):
        axes.grid(True, alpha=0.3)
    share_axes.legend(loc="lower right", fontsize=8)
    figure.suptitle(title)
    target = Path(path)
    figure.savefig(target, format="png", dpi=120)
    return target


def write_reports(summaries: Sequence[ModeSummary], out_dir: str | Path, *, dataset: str,
                  models: Mapping[str, str] | None = None) -> dict[str, Path]:
    """``summary.md``, ``summary.json`` and ``plot.png`` in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    markdown = out / "summary.md"
    markdown.write_text(markdown_report(summaries, dataset=dataset, models=models),
                        encoding="utf-8")
    data: dict[str, Any] = {"dataset": dataset, "models": dict(models or {}),
                            "modes": [asdict(s) | {"paper_cell": paper_cell(s)}
                                      for s in summaries]}
    summary_json = out / "summary.json"
    summary_json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    plot = write_plot(summaries, out / "plot.png", title=f"specthink eval: {dataset}")
    return {"markdown": markdown, "json": summary_json, "plot": plot}
