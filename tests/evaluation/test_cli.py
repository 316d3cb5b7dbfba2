"""``specthink eval`` through typer's CliRunner against a scripted loopback pair."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import pytest
import typer
from typer.testing import CliRunner

from specthink.backends import kinds
from specthink.evaluation.cli import register
from specthink.evaluation.datasets import Problem
from specthink.testing.models import Tokenizer
from tests.ollama_support import MODELS, Ollama

from .conftest import Pair
from .scripted import OPENING, small_script, takeover_script, target_alone_script

TOKENS = Tokenizer()

runner = CliRunner()


def eval_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A stand-in for the specthink application."""

    register(app)
    return app


@pytest.fixture
def env(pair: Pair) -> dict[str, str | None]:
    return {"SPECTHINK_SMALL_URL": pair.small.url, "SPECTHINK_TARGET_URL": pair.target.url,
            "SPECTHINK_BACKEND": None, "SPECTHINK_API_KEY": None}


def test_eval_writes_results_summary_and_plot(env: dict[str, str | None], pair: Pair,
                                              sample: list[Problem], tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(eval_app(), [
        "eval", "--dataset", "sample", "--limit", "12", "--mode", "small", "--mode",
        "speculative", "--concurrency", "3", "--grading-workers", "1", "--out", str(out)],
        env=env)

    assert result.exit_code == 0, result.output
    written = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in written] == ["results.jsonl", "summary.md", "summary.json",
                                         "plot.png"]
    assert all(p.is_file() for p in written)
    assert len((out / "results.jsonl").read_text(encoding="utf-8").splitlines()) == 24
    summary = (out / "summary.md").read_text(encoding="utf-8")
    # The first 12 problems: groups A (right) and B (fixed by the target's takeovers).
    small_tokens = mean(TOKENS.count(small_script(p)) for p in sample[:12])
    spec_texts = [OPENING + fix if (fix := takeover_script(p)) else small_script(p)
                  for p in sample[:12]]
    spec_tokens = sum(TOKENS.count(text) for text in spec_texts)
    share = sum(TOKENS.count(takeover_script(p) or "") for p in sample[:12]) / spec_tokens
    spec_cell = f"100.0 / {spec_tokens / 12:.0f} / {share:.2f}".replace(" 0.", " .")
    assert f"| sample (12 problems) | 66.67 / {small_tokens:.0f} | {spec_cell} |" in summary
    assert "Models: small `test/small-1.5b`, target `test/target-32b`." in summary
    assert "speculative" in result.stderr and spec_cell in result.stderr
    assert len(pair.small.records) == 24


def test_eval_resumes_a_finished_run_without_requests(env: dict[str, str | None], pair: Pair,
                                                      sample: list[Problem],
                                                      tmp_path: Path) -> None:
    args = ["eval", "--dataset", "sample", "--limit", "4", "--mode", "target",
            "--grading-workers", "1", "--out", str(tmp_path), "--json"]
    first = runner.invoke(eval_app(), args, env=env)
    asked = len(pair.target.records)
    second = runner.invoke(eval_app(), args, env=env)

    assert first.exit_code == second.exit_code == 0, first.output + second.output
    assert len(pair.target.records) == asked == 4
    assert "resuming: 4 answers already recorded, 0 to go" in second.stderr
    data = json.loads(second.stdout)
    assert data["dataset"] == "sample"
    tokens = mean(TOKENS.count(target_alone_script(p)) for p in sample[:4])
    assert [(m["mode"], m["correct"], m["paper_cell"]) for m in data["modes"]] == [
        ("target", 4, f"100.0 / {tokens:.0f}")]


def test_a_mode_without_its_server_url_exits_2(env: dict[str, str | None],
                                               tmp_path: Path) -> None:
    result = runner.invoke(eval_app(), ["eval", "--dataset", "sample", "--out", str(tmp_path)],
                           env={**env, "SPECTHINK_TARGET_URL": None})

    assert result.exit_code == 2
    assert "need the target model's server: set --target / SPECTHINK_TARGET_URL" in result.stderr


def test_a_bad_dataset_exits_2(env: dict[str, str | None], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?"}\n', encoding="utf-8")

    result = runner.invoke(eval_app(), ["eval", "--dataset", str(bad), "--out",
                                        str(tmp_path / "out")], env=env)

    assert result.exit_code == 2
    assert "bad.jsonl line 1: no answer" in result.stderr


def test_failed_answers_make_the_command_exit_1(env: dict[str, str | None], pair: Pair,
                                                tmp_path: Path) -> None:
    from specthink.testing.server import Fault

    pair.small.inject(Fault.error_event(error_type="generation"))
    result = runner.invoke(eval_app(), [
        "eval", "--dataset", "sample", "--limit", "1", "--mode", "small", "--concurrency", "1",
        "--grading-workers", "1", "--out", str(tmp_path)], env=env)

    assert result.exit_code == 1, result.output
    assert "1 answers failed to generate" in result.stderr
    assert "sample-01 (small):" in result.stderr


def test_eval_runs_over_ollama(ollama: Ollama, tmp_path: Path) -> None:
    """Broken: ``--backend`` keeps its own list of protocols, so ``ollama``, which the factory
    builds, is a usage error, or the small model's name stays behind."""
    env = {"SPECTHINK_SMALL_URL": ollama.url, "SPECTHINK_TARGET_URL": None,
           "SPECTHINK_BACKEND": None, "SPECTHINK_API_KEY": None,
           "SPECTHINK_SMALL_MODEL": MODELS[1]}
    result = runner.invoke(eval_app(), [
        "eval", "--dataset", "sample", "--limit", "1", "--mode", "small", "--backend", "ollama",
        "--template", "chatml", "--max-tokens", "16", "--grading-workers", "1",
        "--out", str(tmp_path)], env=env)

    assert result.exit_code == 0, result.output
    assert ollama.models() == [MODELS[1]]


def test_an_unknown_backend_is_a_usage_error_naming_the_kinds(
        env: dict[str, str | None], tmp_path: Path) -> None:
    result = runner.invoke(eval_app(), ["eval", "--dataset", "sample", "--backend", "grpc",
                                        "--out", str(tmp_path)], env=env)
    assert result.exit_code == 2
    assert f"choose one of auto, {', '.join(kinds())}" in " ".join(result.output.split())


def test_the_specthink_command_has_eval() -> None:
    """If this fails, specthink/cli.py no longer registers specthink.evaluation.cli."""
    from specthink.cli import app

    result = runner.invoke(app, ["eval", "--help"])

    assert result.exit_code == 0, result.output
    assert "--dataset" in result.stdout and "--concurrency" in result.stdout
