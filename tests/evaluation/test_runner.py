"""The runner against scripted loopback pairs: figures, records, resume, errors, concurrency."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from statistics import mean
from typing import Any

import pytest

from specthink.backends.tgi import TGIBackend
from specthink.errors import ConfigError
from specthink.evaluation.datasets import Problem
from specthink.evaluation.grading import Grader
from specthink.evaluation.report import paper_cell, summarize
from specthink.evaluation.runner import (
    MODES,
    RESULTS_FILE,
    EvalRun,
    EvalSettings,
    Mode,
    ResultsFile,
    run_evaluation,
)
from specthink.settings import PairSettings
from specthink.testing.models import RoutedModel, ScriptedModel, Tokenizer
from specthink.testing.server import Fault, LoopbackServer, RequestRecord

from .conftest import Pair
from .scripted import (
    OPENING,
    UNBOXED,
    small_script,
    takeover_script,
    target_alone_script,
)

TOKENS = Tokenizer()


class CountingBackend:
    """A TGI backend that counts the streams open at once (the engine's real requests)."""

    def __init__(self, url: str) -> None:
        self.inner = TGIBackend(url)
        self.open = 0
        self.most_open = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @asynccontextmanager
    async def _counted(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            async with self.inner.stream(*args, **kwargs) as tokens:
                yield tokens
        finally:
            self.open -= 1

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted(*args, **kwargs)


async def evaluate(pair: Pair, problems: Sequence[Problem], out: Path, grader: Grader, /, *,
                   modes: Sequence[Mode] = MODES, settings: EvalSettings | None = None,
                   small: Any = None, target: Any = None, **options: Any) -> EvalRun:
    small = small or TGIBackend(pair.small.url)
    target = target or TGIBackend(pair.target.url)
    try:
        return await run_evaluation(problems, small=small, target=target, out_dir=out,
                                    modes=modes, settings=settings, grader=grader, **options)
    finally:
        await small.aclose()
        await target.aclose()


def problem_of(record: RequestRecord, problems: Sequence[Problem]) -> str:
    (match,) = [p.id for p in problems if p.problem in record.prompt]
    return match


def speculative_text(problem: Problem) -> str:
    fix = takeover_script(problem)
    return OPENING + fix if fix is not None else small_script(problem)


async def test_a_full_run_gives_the_figures_the_scripts_imply(
        pair: Pair, sample: list[Problem], grader: Grader, tmp_path: Path) -> None:
    """Small alone 8/20, speculative 12/20 (the four takeovers fix four answers), target alone
    18/20; lengths and target share follow from the scripted texts token by token."""
    run = await evaluate(pair, sample, tmp_path, grader)
    summaries = {s.mode: s for s in summarize(run.records)}

    assert [(s.mode, s.correct, s.accuracy) for s in summaries.values()] == [
        ("small", 8, 40.0), ("speculative", 12, 60.0), ("target", 18, 90.0)]
    assert summaries["small"].mean_output_tokens == pytest.approx(
        mean(TOKENS.count(small_script(p)) for p in sample))
    assert summaries["target"].mean_output_tokens == pytest.approx(
        mean(TOKENS.count(target_alone_script(p)) for p in sample))
    spec_tokens = [TOKENS.count(speculative_text(p)) for p in sample]
    fix_tokens = sum(TOKENS.count(takeover_script(p) or "") for p in sample)
    assert summaries["speculative"].mean_output_tokens == pytest.approx(mean(spec_tokens))
    assert summaries["speculative"].target_share == pytest.approx(fix_tokens / sum(spec_tokens))
    assert (summaries["small"].target_share, summaries["target"].target_share) == (0.0, 1.0)
    assert summaries["speculative"].takeovers == {"rule1": 4, "rule2": 0, "rule3": 0}
    assert [summaries[m].unboxed for m in MODES] == [3, 3, 0]
    assert paper_cell(summaries["speculative"]) == (
        f"60.0 / {mean(spec_tokens):.0f} / {fix_tokens / sum(spec_tokens):.2f}".replace(
            " 0.", " ."))
    assert (run.generated, run.resumed) == (60, 0)


async def test_records_carry_answers_tokens_takeovers_and_latency(
        pair: Pair, sample: list[Problem], grader: Grader, tmp_path: Path) -> None:
    run = await evaluate(pair, sample, tmp_path, grader)
    by_key = {(r.id, r.mode): r for r in run.records}
    lines = (tmp_path / RESULTS_FILE).read_text(encoding="utf-8").splitlines()

    assert len(lines) == 60
    assert {(json.loads(line)["id"], json.loads(line)["mode"]) for line in lines} == set(by_key)
    fixed = by_key[("sample-09", "speculative")]
    assert fixed.output == OPENING + "Indeed the result is \\boxed{9\\pi}."
    assert (fixed.answer, fixed.expected, fixed.correct) == ("9\\pi", "9\\pi", True)
    assert fixed.takeovers["rule1"] == 1
    assert fixed.discarded_tokens >= 1  # the small model's "Wait" probe
    assert fixed.tokens == {"small": TOKENS.count(OPENING),
                            "target": TOKENS.count(takeover_script(sample[8]) or ""),
                            "intervention": 0}
    assert fixed.requests == {"small": 1, "target": 1}
    assert fixed.target_share == pytest.approx(fixed.tokens["target"] / fixed.output_tokens)
    alone = by_key[("sample-09", "small")]
    assert (alone.answer, alone.correct, alone.takeovers["rule1"]) == ("6\\pi", False, 0)
    assert by_key[("sample-10", "target")].answer == "3, 2"  # graded equal to "2, 3"
    assert by_key[("sample-10", "target")].correct
    for pid in UNBOXED:
        assert (by_key[(pid, "small")].answer, by_key[(pid, "small")].correct) == (None, False)
    assert all(r.latency_seconds > 0 and r.error is None and r.finish_reason == "stop"
               for r in run.records)
    run_file = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert run_file["models"] == {"small": "test/small-1.5b", "target": "test/target-32b"}
    assert run_file["modes"] == list(MODES)
    assert run_file["settings"]["sampling"] == {
        "temperature": 0.6, "top_p": 0.95, "top_k": 50, "seed": None,
        "repetition_penalty": None, "grammar": None, "keep_special_tokens": False}


async def test_a_limited_run_resumes_without_asking_again(
        pair: Pair, sample: list[Problem], grader: Grader, tmp_path: Path) -> None:
    """If this fails, problems recorded by the first run were generated a second time."""
    first = await evaluate(pair, sample[:5], tmp_path, grader, modes=["small"])
    asked_first = [problem_of(r, sample) for r in pair.small.records]

    second = await evaluate(pair, sample, tmp_path, grader, modes=["small"])
    asked_second = [problem_of(r, sample) for r in pair.small.records[len(asked_first):]]

    assert (first.generated, second.generated, second.resumed) == (5, 15, 5)
    assert sorted(asked_first) == [p.id for p in sample[:5]]
    assert sorted(asked_second) == [p.id for p in sample[5:]]
    assert [r.id for r in second.records] == [p.id for p in sample]
    assert summarize(second.records)[0].correct == 8


async def settled(*servers: LoopbackServer) -> None:
    """Wait (at most 10 s) until requests the crashed run had already sent have reached the
    servers and ended: the servers record them on their own threads, maybe after the crash."""
    previous = None
    for _ in range(100):
        records = [server.records for server in servers]
        counts = [len(r) for r in records]
        busy = any(r.finished is None and not r.disconnected for rs in records for r in rs)
        if counts == previous and not busy:
            return
        previous = counts
        await asyncio.sleep(0.1)


async def test_an_interrupted_run_resumes_where_it_stopped(
        pair: Pair, sample: list[Problem], grader: Grader, tmp_path: Path) -> None:
    """A crash mid-run (here an exception after the 7th record) and a torn last line: the rerun
    generates exactly the answers that were not recorded, each once."""
    class Crash(Exception):
        pass

    seen = 0

    def crash_on_seventh(record: object) -> None:
        nonlocal seen
        seen += 1
        if seen == 7:
            raise Crash

    modes: list[Mode] = ["small", "target"]  # one server per mode: requests tell modes apart
    with pytest.raises(Crash):
        await evaluate(pair, sample, tmp_path, grader, modes=modes,
                       settings=EvalSettings(concurrency=3), on_record=crash_on_seventh)
    recorded = set(ResultsFile(tmp_path / RESULTS_FILE).load())
    with (tmp_path / RESULTS_FILE).open("a", encoding="utf-8") as handle:
        handle.write('{"id": "sample-20", "mode": "small", "expec')  # killed mid-write
    await settled(pair.small, pair.target)
    before = {"small": len(pair.small.records), "target": len(pair.target.records)}

    run = await evaluate(pair, sample, tmp_path, grader, modes=modes)

    assert len(recorded) >= 7
    for mode, server in (("small", pair.small), ("target", pair.target)):
        asked = [problem_of(r, sample) for r in server.records[before[mode]:]]
        assert sorted(asked) == sorted(p.id for p in sample if (p.id, mode) not in recorded)
    assert run.generated == 40 - len(recorded)
    lines = (tmp_path / RESULTS_FILE).read_text(encoding="utf-8").splitlines()
    keys = [(d["id"], d["mode"]) for d in map(json.loads, lines)]
    assert len(keys) == len(set(keys)) == 40
    assert [(s.mode, s.correct) for s in summarize(run.records)] == [
        ("small", 8), ("target", 18)]


async def test_failed_answers_are_recorded_counted_wrong_and_retried_on_resume(
        pair: Pair, sample: list[Problem], grader: Grader, tmp_path: Path) -> None:
    pair.target.inject(Fault.error_event(error_type="generation"))
    first = await evaluate(pair, sample[:4], tmp_path, grader, modes=["target"],
                           settings=EvalSettings(concurrency=1))
    failed = [r for r in first.records if r.error]

    assert [r.id for r in failed] == ["sample-01"]
    assert "generation" in (failed[0].error or "").lower()
    summary = summarize(first.records)[0]
    assert (summary.errors, summary.correct, summary.accuracy) == (1, 3, 75.0)
    asked_before = len(pair.target.records)

    second = await evaluate(pair, sample[:4], tmp_path, grader, modes=["target"])

    assert [problem_of(r, sample) for r in pair.target.records[asked_before:]] == ["sample-01"]
    assert (second.generated, second.resumed) == (1, 3)
    assert [r.error for r in second.records] == [None] * 4
    assert summarize(second.records)[0].accuracy == 100.0


async def test_resuming_with_other_settings_or_models_is_refused(
        pair: Pair, sample: list[Problem], grader: Grader, tmp_path: Path) -> None:
    await evaluate(pair, sample[:2], tmp_path, grader, modes=["small"])

    with pytest.raises(ConfigError, match="max_tokens"):
        await evaluate(pair, sample, tmp_path, grader, modes=["small"],
                       settings=EvalSettings(max_tokens=100))
    with LoopbackServer(ScriptedModel.single("x"), model_id="other/model") as other:
        with pytest.raises(ConfigError, match=r"small model \(test/small-1.5b -> other/model\)"):
            await evaluate(pair, sample, tmp_path, grader, modes=["small"],
                           small=TGIBackend(other.url))
        assert other.records == []
    renamed = [Problem(p.id, p.problem, "999") for p in sample[:2]]
    with pytest.raises(ConfigError, match="another dataset"):
        await evaluate(pair, renamed, tmp_path, grader, modes=["small"])


@pytest.mark.parametrize("changed", [{"template_kwargs": {"effort": "high"}},
                                     {"response_template": "gpt-oss"},
                                     {"small_template": "chatml"}, {"rules": "paper_instruct"}],
                         ids=lambda changed: next(iter(changed)))
async def test_resuming_with_other_pair_settings_is_refused(
        pair: Pair, sample: list[Problem], grader: Grader, tmp_path: Path,
        changed: dict[str, Any]) -> None:
    """Broken: ``run.json`` does not keep a pair setting that changes the answers (template
    variables, response template, chat template, rules), so a resumed run would mix answers
    made under two configurations into one table."""
    first = PairSettings.for_roles((), template_kwargs={"effort": "low"})
    await evaluate(pair, sample[:2], tmp_path, grader, modes=["small"], pair=first)
    asked = len(pair.small.records)

    with pytest.raises(ConfigError, match=next(iter(changed))):
        await evaluate(pair, sample, tmp_path, grader, modes=["small"],
                       pair=first.model_copy(update=changed))
    assert len(pair.small.records) == asked


async def test_single_model_modes_of_an_instruct_pair_are_read_as_the_pair_is(
        pair: Pair, sample: list[Problem], grader: Grader, tmp_path: Path) -> None:
    """Broken: a single-model mode's engine decides its output format under other rules than
    the pair's, so the model ids of an instruct pair that name no known family (read as
    ``<think>`` + Hermes under ``paper_instruct``) are refused for the model alone; or the
    pair's instruct rules (which hand over at every paragraph) reach a single-model mode."""
    instruct = PairSettings.for_roles((), rules="paper_instruct", small_model="acme/small-7b",
                                      target_model="acme/target-32b")
    run = await evaluate(pair, sample[:3], tmp_path, grader, modes=["small", "target"],
                         pair=instruct)

    assert [(r.mode, r.error) for r in run.records] == [
        (mode, None) for _ in range(3) for mode in ("small", "target")]
    assert all(sum(r.takeovers.values()) == 0 for r in run.records)
    assert [r.output for r in run.records if r.mode == "small"] == [
        small_script(p) for p in sample[:3]]


async def test_a_run_recorded_before_the_response_template_setting_resumes(
        pair: Pair, sample: list[Problem], grader: Grader, tmp_path: Path) -> None:
    """Broken: a ``run.json`` written before ``response_template`` and ``template_kwargs`` were
    recorded (with neither set) is refused as a run with other settings."""
    await evaluate(pair, sample[:2], tmp_path, grader, modes=["small"])
    run_file = tmp_path / "run.json"
    run = json.loads(run_file.read_text(encoding="utf-8"))
    del run["settings"]["response_template"], run["settings"]["template_kwargs"]
    run_file.write_text(json.dumps(run), encoding="utf-8")

    resumed = await evaluate(pair, sample[:3], tmp_path, grader, modes=["small"])
    assert (resumed.resumed, resumed.generated) == (2, 1)


async def test_answers_are_generated_concurrently_up_to_the_limit(
        slow_pair: Pair, sample: list[Problem], grader: Grader, tmp_path: Path) -> None:
    """If this fails, the runner either serialises answers or lets more run than asked."""
    small, target = CountingBackend(slow_pair.small.url), CountingBackend(slow_pair.target.url)
    await evaluate(slow_pair, sample, tmp_path / "four", grader, small=small, target=target,
                   modes=["speculative"], settings=EvalSettings(concurrency=4))

    assert small.most_open + target.most_open >= 2
    assert max(small.most_open, target.most_open) <= 4
    starts = sorted(slow_pair.small.records, key=lambda r: r.started)
    overlapping = max(sum(1 for r in starts if r.started <= s.started < (r.finished or 0))
                      for s in starts)
    assert overlapping >= 2  # seen from the server too

    one_small, one_target = (CountingBackend(slow_pair.small.url),
                             CountingBackend(slow_pair.target.url))
    await evaluate(slow_pair, sample[6:12], tmp_path / "one", grader, small=one_small,
                   target=one_target, modes=["speculative"],
                   settings=EvalSettings(concurrency=1))
    assert one_small.most_open == one_target.most_open == 1


async def test_multiple_choice_problems_are_asked_with_letters_and_graded_by_letter(
        grader: Grader, tmp_path: Path) -> None:
    problems = [Problem("q1", "Which is a noble gas?", "B", ("oxygen", "neon", "iron", "tin")),
                Problem("q2", "Which is a metal?", "C", ("neon", "argon", "iron", "xenon"))]
    model = RoutedModel([("noble gas", ScriptedModel.single("Neon.\n\n\\boxed{B}")),
                         ("a metal", ScriptedModel.single("Argon.\n\n\\boxed{\\text{(B)}}"))])
    with LoopbackServer(model) as small, LoopbackServer(model) as target:
        run = await evaluate(Pair(small, target), problems, tmp_path, grader, modes=["small"])
        prompt = next(r.prompt for r in small.records if "noble gas" in r.prompt)

    assert [(r.answer, r.correct) for r in run.records] == [("B", True), ("B", False)]
    assert "(A, B, C, or D)" in prompt and "A) oxygen, B) neon, C) iron, D) tin" in prompt


async def test_a_mode_without_its_server_is_a_config_error(sample: list[Problem],
                                                          tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the target model's server"):
        await run_evaluation(sample, small=TGIBackend("http://127.0.0.1:9"), target=None,
                             out_dir=tmp_path, modes=["speculative"])
    assert not (tmp_path / RESULTS_FILE).exists()
