"""The summary figures, the tables in the paper's format, and the plot."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from rich.console import Console

from specthink.evaluation.report import (
    ModeSummary,
    markdown_report,
    paper_cell,
    rich_table,
    summarize,
    write_plot,
    write_reports,
)
from specthink.evaluation.runner import EvalRecord


def record(pid: str, mode: str, *, correct: bool = False, small: int = 0, target: int = 0,
           answer: str | None = "1", error: str | None = None, rule1: int = 0) -> EvalRecord:
    made = EvalRecord(id=pid, mode=mode, expected="1", answer=answer, correct=correct,
                      tokens={"small": small, "target": target, "intervention": 0},
                      output_tokens=small + target, error=error, latency_seconds=2.0)
    made.takeovers["rule1"] = rule1
    return made


RECORDS = [
    record("a", "speculative", correct=True, small=80, target=20, rule1=2),
    record("a", "small", correct=True, small=90),
    record("b", "speculative", small=150, target=50, answer=None, rule1=3),
    record("b", "small", small=110),
    record("c", "speculative", error="StreamErrorEvent: boom", answer=None),
    record("c", "small", correct=False, small=100),
]


def test_summaries_follow_the_paper_definitions() -> None:
    """Accuracy over problems attempted (a failed answer is wrong), length over answers made,
    target share weighted by tokens."""
    small, speculative = summarize(RECORDS)

    assert (small.mode, speculative.mode) == ("small", "speculative")
    assert (small.problems, small.correct) == (3, 1)
    assert small.accuracy == pytest.approx(100 / 3)
    assert small.mean_output_tokens == pytest.approx(100.0)
    assert small.target_share == 0.0
    assert (speculative.problems, speculative.answered, speculative.errors) == (3, 2, 1)
    assert speculative.accuracy == pytest.approx(100 / 3)
    assert speculative.mean_output_tokens == pytest.approx(150.0)
    assert speculative.target_share == pytest.approx(70 / 300)
    assert speculative.unboxed == 1
    assert speculative.takeovers == {"rule1": 5, "rule2": 0, "rule3": 0}
    assert speculative.mean_latency_seconds == pytest.approx(2.0)


@pytest.mark.parametrize(("accuracy", "tokens", "share", "cell"), [
    (89.4, 4583.2, 0.19, "89.4 / 4583 / .19"),
    (100 * 29 / 90, 15706.0, 0.1949, "32.22 / 15706 / .19"),
    (75.0, 10461.0, 0.0, "75.0 / 10461"),
])
def test_paper_cells_are_printed_as_in_table_2(accuracy: float, tokens: float, share: float,
                                               cell: str) -> None:
    mode = "small" if share == 0.0 else "speculative"
    summary = ModeSummary(mode=mode, problems=90, answered=90, correct=0, accuracy=accuracy,
                          mean_output_tokens=tokens, target_share=share, unboxed=0, errors=0,
                          grading_errors=0)

    assert paper_cell(summary) == cell


def test_the_markdown_report_puts_modes_side_by_side() -> None:
    text = markdown_report(summarize(RECORDS), dataset="math500",
                           models={"small": "org/small", "target": "org/target"})

    assert "| dataset | small alone | speculative |" in text
    assert "| math500 (3 problems) | 33.33 / 100 | 33.33 / 150 / .23 |" in text
    assert "| speculative | 33.33 / 150 / .23 | 1/3 | 33.33 | 150.0 | 0.233 | 5 | 0 | 0 | 1 |" \
        " 1 | 2.00 |" in text
    assert "Models: small `org/small`, target `org/target`." in text
    assert "Run the same command again to retry only those." in text


def test_the_rich_table_shows_each_mode_with_its_paper_cell() -> None:
    console = Console(record=True, width=220)
    console.print(rich_table(summarize(RECORDS), title="math500"))
    text = console.export_text()

    assert "math500" in text
    assert "small alone" in text and "33.33 / 100" in text
    assert "speculative" in text and "33.33 / 150 / .23" in text


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_plot_is_a_png_with_something_drawn(tmp_path: Path) -> None:
    from matplotlib.image import imread

    path = write_plot(summarize(RECORDS), tmp_path / "plot.png", title="math500")

    assert png_size(path) == (1200, 504)  # 10 x 4.2 inches at 120 dpi
    pixels = imread(path)
    colours = {tuple(row) for row in pixels.reshape(-1, pixels.shape[-1])[::37].tolist()}
    assert len(colours) > 20, "the plot looks blank"


def test_write_reports_writes_markdown_json_and_plot(tmp_path: Path) -> None:
    paths = write_reports(summarize(RECORDS), tmp_path, dataset="math500")

    assert sorted(p.name for p in paths.values()) == ["plot.png", "summary.json", "summary.md"]
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert [m["mode"] for m in data["modes"]] == ["small", "speculative"]
    assert data["modes"][1]["paper_cell"] == "33.33 / 150 / .23"
    assert data["modes"][1]["errors"] == 1
    assert png_size(paths["plot"])[0] > 0
