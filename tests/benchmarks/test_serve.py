"""``specthink bench-serve``: chat completions and the Responses API measured in one run,
each Responses row beside its chat row. Only what does not depend on time is asserted (which
rows exist, equal texts, ratios that are the rows' own figures); how fast lives in
``docs/benchmarks/serve.md``."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from benchmarks.runner import BenchConfig, Level
from benchmarks.serve import CELLS, register, run_serve_bench, write_report


def test_every_chat_cell_is_followed_by_a_responses_cell_of_the_same_layout() -> None:
    """If this fails, a server layout is measured through one API only, or the two run apart
    (another cell between them), so the ratio mixes in whatever the machine did meanwhile."""
    served = CELLS[1:]
    assert CELLS[0][1] == "engine"
    assert [policy for _, policy, _ in served] == ["serve", "serve-responses"] * 2
    for chat, responses in zip(served[::2], served[1::2], strict=True):
        assert chat[2] == responses[2]
    assert {layout for _, _, layout in served} == {"default", "workers-2"}


@pytest.mark.timeout(60)
def test_a_tiny_run_has_a_responses_row_beside_the_chat_row(tmp_path: Path) -> None:
    """Two conversations through one worker, by chat completions and by ``/v1/responses``:
    if this fails, the Responses client (request, first text, statistics, end) or the
    comparison with the chat row is broken."""
    config = BenchConfig(levels=(Level(2, 3),), time_scale=0.005, token_floor=0.0,
                         event_budget=math.inf, isolate=False)
    result = run_serve_bench(config, progress=None, cells=CELLS[:3])
    assert not result.errors, result.errors[0]
    engine, chat, responses = result.rows
    assert (engine.api, chat.api, responses.api) == (None, "chat", "responses")
    assert (chat.workers, responses.workers) == (1, 1)
    for row in (chat, responses):
        assert row.conversations == 2 and row.errors == 0
        assert row.same_text is True  # reasoning and answer as the in-process engine wrote them
        assert row.ttft_p50 is not None and row.ttft_p99 is not None
        assert 0 < row.ttft_p50 <= row.ttft_p99
        assert 0 < row.wall_over_ideal < math.inf
    assert chat.vs_chat is None
    assert responses.vs_chat is not None
    assert responses.vs_chat["ttft_p50"] == pytest.approx(responses.ttft_p50 / chat.ttft_p50)
    assert responses.vs_chat["ttft_p99"] == pytest.approx(responses.ttft_p99 / chat.ttft_p99)
    assert responses.vs_chat["wall_over_ideal"] == pytest.approx(
        responses.wall_over_ideal / chat.wall_over_ideal)

    markdown = write_report(result, tmp_path).read_text()
    assert "| 2 | specthink serve, 1 worker, /v1/responses |" in markdown
    assert "## The Responses API against chat completions" in markdown
    assert f"| 2 | 1 | {responses.vs_chat['ttft_p50']:.3f}× |" in markdown
    assert "Through `/v1/responses`, against chat completions" in markdown
    data = json.loads((tmp_path / "serve.json").read_text())
    assert [row["api"] for row in data["rows"]] == [None, "chat", "responses"]
    assert data["rows"][2]["vs_chat"]["wall_over_ideal"] == pytest.approx(
        responses.vs_chat["wall_over_ideal"])


@pytest.mark.timeout(90)
def test_the_comparison_is_the_median_of_alternating_pairs_of_runs(tmp_path: Path) -> None:
    """Three pairs of runs (chat, then Responses): if this fails, a Responses ratio rests on one
    pair, which a shared machine's load moves by half either way, or the report hides the
    pairs it took the median of."""
    config = BenchConfig(levels=(Level(2, 3),), time_scale=0.005, token_floor=0.0,
                         event_budget=math.inf, isolate=False)
    result = run_serve_bench(config, progress=None, cells=CELLS[:3], comparisons=3)
    assert not result.errors, result.errors[0]
    assert len(result.rows) == 3  # the table keeps one row per cell
    _, chat, responses = result.rows
    runs = responses.vs_chat_runs
    assert len(runs) == 3 and chat.vs_chat_runs == []
    assert runs[0]["ttft_p50"] == pytest.approx(responses.ttft_p50 / chat.ttft_p50)
    assert responses.vs_chat is not None
    for name in ("ttft_p50", "ttft_p99", "wall_over_ideal"):
        assert responses.vs_chat[name] == pytest.approx(
            statistics.median(run[name] for run in runs))
    markdown = write_report(result, tmp_path).read_text()
    each = ", ".join(f"{run['ttft_p50']:.3f}×" for run in runs)
    assert f"{responses.vs_chat['wall_over_ideal']:.3f}× | {each} |" in markdown
    assert "median over 3 such pair(s)" in markdown


def test_bad_levels_fail_before_any_server_starts() -> None:
    """If this fails, ``bench-serve --levels`` accepts a shape it cannot run, or its help
    does not render (rich reads ``[...]`` in help text as markup)."""
    app = typer.Typer()
    register(app)
    helped = CliRunner().invoke(app, ["--help"])
    assert helped.exit_code == 0 and "--levels" in helped.output
    answer = CliRunner().invoke(app, ["--levels", "16"])
    assert answer.exit_code == 2
    assert "CONVERSATIONSxPARAGRAPHS" in answer.output


def test_module_help_prints_the_options_instead_of_running() -> None:
    """``python -m benchmarks.serve --help`` shows the options. Broken: the module read
    ``--help`` as nothing it knew and ran the whole five-minute benchmark over docs/benchmarks."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "--levels" in done.stdout and "calibrating" not in done.stderr
