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
from specthink.rules import PRESETS
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


def test_an_unknown_rules_preset_is_refused_before_any_request(
        env: dict[str, str | None], pair: Pair, tmp_path: Path) -> None:
    """Broken: eval checks ``--rules`` (or ``$SPECTHINK_RULES``) its own way instead of through
    ``PairSettings``, so the error differs from the other surfaces', or a server is asked
    anything first."""
    given = runner.invoke(eval_app(), ["eval", "--dataset", "sample", "--rules", "bogus",
                                       "--out", str(tmp_path)], env=env)
    from_env = runner.invoke(eval_app(), ["eval", "--dataset", "sample", "--out", str(tmp_path)],
                             env={**env, "SPECTHINK_RULES": "bogus"})

    for result in (given, from_env):
        assert result.exit_code == 2, result.output
        assert "error: unknown rules preset 'bogus'" in result.stderr
        assert all(name in result.stderr for name in PRESETS)
        assert "validation error" not in result.stderr  # the core's message, not pydantic's
    assert pair.small.calls == [] and pair.target.calls == []
    assert not (tmp_path / "run.json").exists()


@pytest.mark.parametrize("role", ["small", "target"])
def test_a_single_model_mode_needs_only_its_own_server(
        env: dict[str, str | None], pair: Pair, tmp_path: Path, role: str) -> None:
    """Broken: eval's settings demand both servers' URLs when the modes run one model alone, or
    the lone model is not asked through its own URL (with ``--backend auto`` detecting it)."""
    other = "target" if role == "small" else "small"
    result = runner.invoke(eval_app(), [
        "eval", "--dataset", "sample", "--limit", "2", "--mode", role, "--grading-workers", "1",
        "--out", str(tmp_path)], env={**env, f"SPECTHINK_{other.upper()}_URL": None})

    assert result.exit_code == 0, result.output
    server, unused = (pair.small, pair.target) if role == "small" else (pair.target, pair.small)
    assert len(server.records) == 2
    assert unused.calls == []


CHATML_WITH_EFFORT = (
    "<|im_start|>system\neffort={{ effort }}<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{{ '<|im_start|>assistant\\n' }}")
"""ChatML whose system turn shows the template variable ``effort`` (the last newline comes from
an expression: Jinja drops a template's trailing one)."""


def test_every_mode_gets_the_response_template_and_template_kwargs(
        env: dict[str, str | None], pair: Pair, tmp_path: Path) -> None:
    """Broken: eval builds an engine without the pair's ``--template-kwargs`` (the prompts lack
    the variable) or ``--response-template`` (an OpenAI server is not asked to keep the
    special tokens the template's markers are), in the speculative mode or a single-model
    one."""
    result = runner.invoke(eval_app(), [
        "eval", "--dataset", "sample", "--limit", "10", "--backend", "openai",
        "--max-tokens", "512",
        "--template", CHATML_WITH_EFFORT, "--template-kwargs", '{"effort": "high"}',
        "--response-template", "gpt-oss", "--grading-workers", "1", "--out", str(tmp_path)],
        env=env)

    assert result.exit_code == 0, result.output
    records = [*pair.small.records, *pair.target.records]
    # small alone and speculative ask the small server; target alone and the takeovers of
    # problems 9 and 10 the target: every mode's engine is represented.
    assert len(pair.small.records) >= 20 and len(pair.target.records) > 10
    assert all("effort=high" in record.prompt for record in records)
    assert all(record.parameters.get("skip_special_tokens") is False for record in records)
    run = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert run["settings"]["template_kwargs"] == {"effort": "high"}
    assert run["settings"]["response_template"] == "gpt-oss"


def test_the_specthink_command_has_eval() -> None:
    """If this fails, specthink/cli.py no longer registers specthink.evaluation.cli."""
    from specthink.cli import app

    result = runner.invoke(app, ["eval", "--help"])

    assert result.exit_code == 0, result.output
    assert "--dataset" in result.stdout and "--concurrency" in result.stdout
