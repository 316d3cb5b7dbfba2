"""The benchmark harness: traces, models, metrics, and a tiny run end to end.

Only figures that do not depend on time are asserted (counts, token ratios, requests per
handoff, cache shares, equal texts); how fast anything ran lives in ``docs/benchmarks``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from benchmarks.cli import parse_levels, register
from benchmarks.metrics import busy_seconds
from benchmarks.report import write_report
from benchmarks.runner import BenchConfig, BenchResult, Level, run_bench
from benchmarks.traces import (
    INSTRUCTION,
    SmallTraceModel,
    TargetTraceModel,
    TraceSpec,
    conversation_of,
    make_trace,
)
from specthink.prompts import DEEPSEEK_R1
from specthink.rules import TakeoverRules
from specthink.testing.models import Tokenizer

RULES = TakeoverRules.paper()
TOKENIZER = Tokenizer()


def _prompt(spec: TraceSpec, conversation: int, written: str = "") -> str:
    trace = make_trace(spec, conversation)
    return DEEPSEEK_R1.render_text([{"role": "user", "content": trace.question}]) + written


def _probe(paragraph: str) -> str:
    return "".join(TOKENIZER.tokenize(paragraph)[: RULES.probe_tokens])


def test_traces_are_deterministic_and_place_keywords_in_probe_windows() -> None:
    """A trace is a pure function of (spec, conversation); some paragraphs put a keyword in
    the probe window, the target's takeover texts are long enough for rules 2 and 3.

    Broken when: traces differ between processes (servers and client would disagree), or the
    sentence banks let keywords in where none should be.
    """
    spec = TraceSpec(seed=3, paragraphs=60)
    trace = make_trace(spec, 5)
    assert trace == make_trace(TraceSpec(seed=3, paragraphs=60), 5)
    assert trace != make_trace(spec, 6)
    assert trace.question.startswith(INSTRUCTION) and "Problem #5:" in trace.question
    assert len(trace.small) == 60 and trace.small[-1].startswith("The answer is")
    triggering = [p for p in trace.small[1:] if RULES.has_keyword(_probe(p))]
    assert 5 <= len(triggering) <= 30
    assert all(TOKENIZER.count(text) >= RULES.n1 + RULES.n2 and
               TOKENIZER.count(text) >= RULES.n3_max for text in trace.target_slots)
    assert any(RULES.has_verify(_probe(text)) for text in trace.target_slots)
    quiet = make_trace(TraceSpec(seed=3, paragraphs=60, takeover_free=True), 5)
    assert not any(RULES.has_keyword(p) for p in quiet.small)
    plain = make_trace(TraceSpec(seed=3, paragraphs=60, rule2=False), 5)
    assert plain.small == trace.small
    assert not any(RULES.has_verify(text) for text in plain.target_slots)


def test_models_continue_their_scripts_from_any_point() -> None:
    """The small model resumes its paragraphs, or closes a slot the target wrote in; the target
    writes its own answer alone, and its slot text (after rule 3's intervention too) elsewhere.
    """
    spec = TraceSpec(seed=0, paragraphs=8)
    trace = make_trace(spec, 2)
    small, target = SmallTraceModel(spec), TargetTraceModel(spec)
    assert conversation_of(_prompt(spec, 2)) == 2

    assert small.continuation(_prompt(spec, 2)).text == trace.small_answer
    cut = len(trace.small[0]) + 2 + 7
    rest = small.continuation(_prompt(spec, 2, trace.small_answer[:cut]))
    assert rest.eos and trace.small_answer[:cut] + rest.text == trace.small_answer

    before = trace.small[0] + "\n\n"
    target_text = trace.target_slots[1][:40]
    after_target = small.continuation(_prompt(spec, 2, before + target_text)).text
    assert after_target == (trace.closings[1] + "\n\n" + "\n\n".join(trace.small[2:]))

    assert target.continuation(_prompt(spec, 2)).text == trace.target_answer
    assert target.continuation(_prompt(spec, 2, before)).text == trace.target_slots[1]
    assert not target.continuation(_prompt(spec, 2, before)).eos
    rule3 = target.continuation(_prompt(spec, 2, before + RULES.intervention_text + target_text))
    assert target_text + rule3.text == trace.target_slots[1]


def test_busy_seconds_is_the_length_of_the_union() -> None:
    assert busy_seconds([]) == 0
    assert busy_seconds([(0, 1), (0.5, 2), (3, 4)]) == pytest.approx(3)
    assert busy_seconds([(3, 4), (0, 10)]) == pytest.approx(10)


def test_parse_levels_and_register() -> None:
    assert parse_levels("1x30, 256x5/no-rule2") == (Level(1, 30), Level(256, 5, rule2=False))
    assert parse_levels("1x30,16x12,256x5/no-rule2") == BenchConfig().levels
    with pytest.raises(typer.BadParameter):
        parse_levels("16")
    with pytest.raises(typer.BadParameter):
        parse_levels("4x2")
    with pytest.raises(typer.BadParameter):
        parse_levels("4x8/fast")
    app = typer.Typer()
    register(app)
    assert [command.name for command in app.registered_commands] == ["bench"]


@pytest.fixture(scope="module")
def tiny_run() -> BenchResult:
    """Three conversations of ten paragraphs, every policy, near-zero latencies; cells run in
    this process, the servers in their own."""
    config = BenchConfig(levels=(Level(3, 10),), layouts=("per-conversation",), time_scale=0.0,
                         token_floor=0.0, event_budget=float("inf"),
                         throughput_conversations=1, throughput_paragraphs=6, hot_spots=False,
                         isolate=False)
    return run_bench(config)


@pytest.mark.timeout(300)
def test_engine_beats_the_authors_loop_on_requests_and_waste(tiny_run: BenchResult) -> None:
    """On the same traces the engine makes at most 2 requests per handoff and throws away only
    the probe up to the keyword; the authors' loop makes several per handoff and throws away
    every probe. Both write exactly the same text (greedy decoding).

    Broken when: the engine opens extra requests at a takeover, keeps a probe it should drop,
    or the authors' loop re-implementation drifts from the paper preset.
    """
    assert tiny_run.errors == []
    engine, authors = tiny_run.cell("engine", 3), tiny_run.cell("authors", 3)
    assert (engine.retries, engine.fallbacks, authors.retries) == (0, 0, 0)
    assert tiny_run.same_text == {3: True}
    assert engine.handoffs == authors.handoffs > 0
    assert engine.requests <= engine.conversations + 2 * engine.handoffs
    assert engine.requests_per_handoff is not None and engine.requests_per_handoff <= 2
    assert authors.requests_per_handoff is not None and authors.requests_per_handoff > 2
    assert engine.discarded_client < authors.discarded_client
    assert engine.output_tokens == authors.output_tokens
    assert engine.target_share == pytest.approx(authors.target_share)
    assert 0 < engine.target_share < 1


@pytest.mark.timeout(300)
def test_prompts_extend_so_the_prefix_cache_serves_them(tiny_run: BenchResult) -> None:
    """Every engine request's prompt extends the previous one to that server, so >= 99 % of
    the previous prompt comes from the prefix cache; a fresh conversation's first request is
    computed in full, so the share of all prompt tokens stays below 1."""
    engine = tiny_run.cell("engine", 3)
    assert engine.non_extending_requests == 0
    assert engine.cache_share_previous_min is not None
    assert engine.cache_share_previous_min >= 0.99
    assert engine.cache_share_all is not None and 0 < engine.cache_share_all < 1
    pooled = tiny_run.cell("engine", 3, "per-conversation")
    assert (pooled.requests, pooled.handoffs) == (engine.requests, engine.handoffs)


@pytest.mark.timeout(300)
def test_baselines_and_report(tiny_run: BenchResult, tmp_path: Path) -> None:
    """Each model alone writes its script in one request; the report carries every cell."""
    assert tiny_run.baselines_exact == {3: True}
    for policy in ("small", "target"):
        cell = tiny_run.cell(policy, 3)
        assert (cell.requests, cell.handoffs) == (3, 0)
    rows = {(t.policy, t.takeovers, t.per_token): t for t in tiny_run.throughput}
    reasoning, stream = rows["engine", True, 0.0], rows["engine", False, 0.0]
    assert stream.requests == stream.conversations < reasoning.requests
    floor = rows["raw", False, 0.0]
    assert floor.output_tokens == stream.output_tokens == rows["small", False, 0.0].output_tokens

    files = write_report(tiny_run, tmp_path)
    assert {path.name for path in files} >= {"results.md", "results.json", "time.png"}
    markdown = (tmp_path / "results.md").read_text()
    assert "| authors' loop | 3 |" in markdown
    assert "identical final texts" in markdown
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["cells"]) == 5
    assert data["same_text"] == {"3": True}


@pytest.mark.timeout(300)
def test_cli_runs_a_smoke_benchmark(tmp_path: Path) -> None:
    """``bench --quick`` with one level runs the servers and a client process and writes the
    report; ``--json`` prints the figures."""
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # with two commands, typer dispatches by name
    result = CliRunner().invoke(app, [
        "bench", "--quick", "--levels", "1x5", "--policies", "engine", "--layouts", "",
        "--no-throughput", "--no-hot-spots", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [(c["policy"], c["conversations"]) for c in data["cells"]] == [("engine", 1)]
    assert (tmp_path / "results.md").exists()
