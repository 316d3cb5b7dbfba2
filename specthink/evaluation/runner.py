"""Run a problem set through the models, grade each answer, and write one record per answer.

Three modes answer every problem: ``speculative`` (the small model writes, the target takes over
by the rules), ``small`` (the small model alone) and ``target`` (the target alone). A single
model runs through the same engine with every takeover switched off, so the three share one code
path, one prompt rendering and one way of counting tokens.

Records are appended to ``results.jsonl`` in the output directory as each answer is graded
(flushed and synced one by one), so an interrupted run loses at most the answers in flight. Run
the same command again and it resumes: answers already recorded without an error are kept, the
rest are generated. ``run.json`` keeps the settings and model ids of the run; resuming with
settings that would change the answers (budget, sampling, rules, templates, another model) is
refused rather than mixed into one table.

The pair's settings (rules, chat and response templates, template variables) are a
:class:`~specthink.settings.PairSettings`, as on every other surface, and every mode's engine is
built by its ``build``; :class:`EvalSettings` holds only what the evaluation adds (budget,
sampling, concurrency).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from specthink.backends.base import Backend, SamplingParams
from specthink.engine import SpeculativeThinker
from specthink.errors import ConfigError
from specthink.evaluation.datasets import Problem
from specthink.evaluation.grading import Grader
from specthink.evaluation.prompts import build_messages
from specthink.rules import TakeoverRules, resolve_rules
from specthink.settings import PairSettings, Role
from specthink.trace import Rule, Statistics

__all__ = [
    "MODES",
    "PAPER_SAMPLING",
    "RESULTS_FILE",
    "RUN_FILE",
    "SOLO_RULES",
    "EvalRecord",
    "EvalRun",
    "EvalSettings",
    "Mode",
    "ResultsFile",
    "cast_modes",
    "run_evaluation",
]

Mode = Literal["small", "speculative", "target"]
MODES: tuple[Mode, ...] = get_args(Mode)
"""In the paper's order: the small model alone, with the target's help, the target alone."""

PAPER_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, top_k=50)
"""The authors' sampling (one sample per problem)."""

SOLO_RULES = TakeoverRules.paper(reflection_takeover=False, excessive_reflection_takeover=False)
"""Rules under which the engine never hands over: one model writes the whole answer."""

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"


@dataclass(frozen=True, slots=True)
class EvalSettings:
    """What the evaluation adds to the pair's settings (:class:`~specthink.settings.PairSettings`):
    the budget and sampling, which shape the answers (they must match when a run is resumed),
    and how many answers are generated at once."""

    max_tokens: int = 32768
    """Budget of output tokens per answer. The engine also keeps prompt + output within each
    server's ``max_total_tokens``, so servers started with 32768 reproduce the paper's budget
    (32768 including the prompt)."""
    sampling: SamplingParams = PAPER_SAMPLING
    concurrency: int = 8
    """Answers generated at once (per run, all modes together)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change answers, as JSON (concurrency does not). The sampling's
        ``marker_tokens`` are left out: the engine derives them from the response template,
        which the run's fingerprint names (and a tuple would not read back equal from JSON)."""
        sampling = asdict(self.sampling)
        del sampling["marker_tokens"]
        return {"max_tokens": self.max_tokens, "sampling": sampling}


def _fingerprint(settings: EvalSettings, pair: PairSettings) -> dict[str, Any]:
    """What ``run.json`` keeps of the settings that change answers: the budget and sampling,
    and the pair's rules (the speculative mode's, as numbers), chat templates, response
    template and template variables. The servers' URLs, protocol and key are not in it: the
    model ids the servers report are compared instead."""
    return {
        **settings.fingerprint(),
        "rules": resolve_rules(pair.rules).model_dump(mode="json"),
        "small_template": pair.small_template,
        "target_template": pair.target_template,
        "response_template": pair.response_template,
        "template_kwargs": pair.template_kwargs,
    }


@dataclass(slots=True)
class EvalRecord:
    """One answer to one problem in one mode: a line of ``results.jsonl``."""

    id: str
    mode: str
    expected: str
    answer: str | None = None
    """The last boxed content of the output (the letter, for multiple choice); ``None`` if none."""
    correct: bool = False
    tokens: dict[str, int] = field(
        default_factory=lambda: {"small": 0, "target": 0, "intervention": 0})
    """Output tokens by who wrote them; ``intervention`` is rule 3's inserted sentence."""
    output_tokens: int = 0
    target_share: float = 0.0
    """Share of output tokens written by the target model (0 alone small, 1 alone target)."""
    takeovers: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in Rule})
    discarded_tokens: int = 0
    requests: dict[str, int] = field(default_factory=lambda: {"small": 0, "target": 0})
    finish_reason: str | None = None
    latency_seconds: float = 0.0
    """Wall time of the generation (grading and queueing excluded)."""
    error: str | None = None
    """Why no answer was generated; such a problem is generated again when the run resumes."""
    grading_error: str | None = None
    """Why the answer could not be compared (it counts as wrong)."""
    output: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, slots=True)
class EvalRun:
    """What :func:`run_evaluation` did."""

    records: list[EvalRecord]
    """Every record of the problems and modes asked for, in problem order, then mode order."""
    generated: int
    """Answers generated by this call (the rest came from an earlier run)."""
    resumed: int
    out_dir: Path


class ResultsFile:
    """``results.jsonl``: appended one synced line at a time; the last line per answer wins."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[tuple[str, str], EvalRecord]:
        """Every record by ``(id, mode)``. A line cut short by a crash is dropped from the file,
        so the next append starts on a fresh line."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(len(complete))
        records: dict[tuple[str, str], EvalRecord] = {}
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = EvalRecord.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError) as exc:
                raise ConfigError(f"{self.path} line {number} is not a result record: {exc}; "
                                  "move the file away to start afresh") from exc
            records[(record.id, record.mode)] = record
        return records

    def append(self, record: EvalRecord) -> None:
        line = json.dumps(record.to_dict(), ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _model_counts(stats: Statistics, mode: Mode) -> tuple[dict[str, int], dict[str, int]]:
    """Tokens and requests by model. Alone, one model fills both engine roles."""
    if mode == "speculative":
        return ({"small": stats.small_tokens, "target": stats.target_tokens,
                 "intervention": stats.intervention_tokens},
                {"small": stats.requests["small"], "target": stats.requests["target"]})
    written = stats.small_tokens + stats.target_tokens
    sent = stats.requests["small"] + stats.requests["target"]
    alone_small = mode == "small"
    return ({"small": written if alone_small else 0, "target": 0 if alone_small else written,
             "intervention": stats.intervention_tokens},
            {"small": sent if alone_small else 0, "target": 0 if alone_small else sent})


def _alone(pair: PairSettings, role: Role) -> PairSettings:
    """The pair's settings with ``role``'s model in both engine roles (its server, model name
    and chat template): the engine of a single-model mode, rendering the prompt and reading the
    output of that model as the speculative mode does. The pair's rules stay, since they take
    part in deciding the output format (an instruct pair's); each call of the mode runs under
    :data:`SOLO_RULES`."""
    url, model, template = ((pair.small_url, pair.small_model, pair.small_template)
                            if role == "small"
                            else (pair.target_url, pair.target_model, pair.target_template))
    return pair.model_copy(update={
        "small_url": url, "target_url": url, "small_model": model, "target_model": model,
        "small_template": template, "target_template": template})


def _thinkers(modes: Iterable[Mode], small: Backend | None, target: Backend | None,
              pair: PairSettings) -> dict[Mode, SpeculativeThinker]:
    # A failing target must not silently turn a speculative answer into a small-model one:
    # "raise" records an error, and the answer is generated again on resume.
    pair = pair.model_copy(update={"on_target_error": "raise"})
    thinkers: dict[Mode, SpeculativeThinker] = {}
    for mode in modes:
        if mode in ("small", "speculative") and small is None:
            raise ConfigError(f"mode {mode!r} needs the small model's server")
        if mode in ("target", "speculative") and target is None:
            raise ConfigError(f"mode {mode!r} needs the target model's server")
        if mode == "speculative":
            assert small is not None and target is not None
            thinkers[mode] = pair.build(backends=(small, target))
        else:
            backend = small if mode == "small" else target
            assert backend is not None
            thinkers[mode] = _alone(pair, mode).build(backends=(backend, backend))
    return thinkers


async def _model_ids(modes: Sequence[Mode], small: Backend | None,
                     target: Backend | None) -> dict[str, str]:
    roles: dict[str, Backend] = {}
    if small is not None and any(m in ("small", "speculative") for m in modes):
        roles["small"] = small
    if target is not None and any(m in ("target", "speculative") for m in modes):
        roles["target"] = target
    infos = await asyncio.gather(*(backend.info() for backend in roles.values()))
    return {role: info.model_id for role, info in zip(roles, infos, strict=True)}


def _update_run_file(path: Path, fingerprint: dict[str, Any], models: Mapping[str, str],
                     modes: Sequence[Mode]) -> None:
    """Write the run description; refuses to resume a run made under other settings."""
    description = _run_description(path, fingerprint, models, modes)
    path.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")


def _run_description(path: Path, fingerprint: dict[str, Any], models: Mapping[str, str],
                     modes: Sequence[Mode]) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    if not path.exists():
        return {"created": now, "updated": now, "settings": fingerprint, "models": dict(models),
                "modes": list(modes)}
    previous = json.loads(path.read_text(encoding="utf-8"))
    old_settings = previous.get("settings", {})
    changed = sorted(k for k in fingerprint.keys() | old_settings.keys()
                     if fingerprint.get(k) != old_settings.get(k))
    old_models = previous.get("models", {})
    changed += [f"{role} model ({old_models[role]} -> {model})" for role, model in models.items()
                if role in old_models and old_models[role] != model]
    if changed:
        raise ConfigError(
            f"{path.parent} holds results made with other settings ({', '.join(changed)}); "
            "resume with the same settings, or choose another --out directory")
    return {**previous, "updated": now, "models": {**old_models, **models},
            "modes": [m for m in MODES if m in set(previous.get("modes", [])) | set(modes)]}


def _finished(out: Path, problems: Sequence[Problem],
              modes: Sequence[Mode]) -> tuple[ResultsFile, dict[tuple[str, str], EvalRecord]]:
    """The results file, and the answers it already holds without an error."""
    out.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(out / RESULTS_FILE)
    done = {key: r for key, r in results.load().items() if r.error is None}
    for problem in problems:
        for mode in modes:
            previous = done.get((problem.id, mode))
            if previous is not None and previous.expected != problem.answer:
                raise ConfigError(
                    f"{results.path} answers problem {problem.id!r} for expected answer "
                    f"{previous.expected!r}, but the dataset now says {problem.answer!r}: "
                    "it belongs to another dataset; choose another --out directory")
    return results, done


def _record(problem: Problem, mode: Mode, stats: Statistics, text: str,
            latency: float) -> EvalRecord:
    tokens, requests = _model_counts(stats, mode)
    output = tokens["small"] + tokens["target"] + tokens["intervention"]
    return EvalRecord(
        id=problem.id, mode=mode, expected=problem.answer, tokens=tokens, output_tokens=output,
        target_share=round(tokens["target"] / output, 6) if output else 0.0,
        takeovers=dict(stats.takeovers), discarded_tokens=stats.discarded_tokens,
        requests=requests, finish_reason=stats.finish_reason,
        latency_seconds=round(latency, 4), output=text)


async def run_evaluation(
    problems: Sequence[Problem],
    *,
    small: Backend | None,
    target: Backend | None,
    out_dir: str | Path,
    modes: Sequence[Mode] = MODES,
    settings: EvalSettings | None = None,
    pair: PairSettings | None = None,
    grader: Grader | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_record: Callable[[EvalRecord], None] | None = None,
) -> EvalRun:
    """Answer and grade every problem in every mode, resuming from ``out_dir`` if it has results.

    ``pair`` gives the rules of the speculative mode and both models' chat templates, response
    template and template variables (default: ``PairSettings``' defaults, from the
    environment); its URLs are not used, the backends are. ``on_start(pending, resumed)`` is
    called once the work is known; ``on_record(record)`` after each new record is written. The
    backends are not closed (they belong to the caller); a grader is made and closed here unless
    one is passed in.
    """
    settings = settings or EvalSettings()
    pair = pair or PairSettings.for_roles(())
    chosen: list[Mode] = [m for m in MODES if m in set(modes)]
    unknown = set(modes) - set(MODES)
    if unknown or not chosen:
        raise ConfigError(f"modes must be among {', '.join(MODES)}, got {list(modes)!r}")
    thinkers = _thinkers(chosen, small, target, pair)
    out = Path(out_dir)
    results, done = _finished(out, problems, chosen)
    # Problem-major order: an interrupted run has every mode on the same first problems, so its
    # partial table still compares like with like.
    pending = deque((p, m) for p in problems for m in chosen if (p.id, m) not in done)
    resumed = len(problems) * len(chosen) - len(pending)
    # The servers are asked for their model ids only when there is work for them; a finished run
    # can be summarised again with the servers gone.
    models = await _model_ids(chosen, small, target) if pending else {}
    _update_run_file(out / RUN_FILE, _fingerprint(settings, pair), models, chosen)
    if on_start is not None:
        on_start(len(pending), resumed)
    fresh: dict[tuple[str, str], EvalRecord] = {}
    if not pending:
        return EvalRun(records=[done[(p.id, m)] for p in problems for m in chosen],
                       generated=0, resumed=resumed, out_dir=out)
    own_grader = grader is None
    active = grader if grader is not None else Grader()

    async def answer(problem: Problem, mode: Mode) -> EvalRecord:
        started = time.perf_counter()
        try:
            result = await thinkers[mode].agenerate(
                build_messages(problem), max_new_tokens=settings.max_tokens,
                sampling=settings.sampling,
                rules=None if mode == "speculative" else SOLO_RULES)
        except Exception as exc:  # recorded, and retried on resume; the run goes on
            return EvalRecord(id=problem.id, mode=mode, expected=problem.answer,
                              latency_seconds=round(time.perf_counter() - started, 4),
                              error=f"{type(exc).__name__}: {exc}")
        record = _record(problem, mode, result.stats, result.text,
                         time.perf_counter() - started)
        grade = await active.grade(problem, result.text)
        record.answer, record.correct, record.grading_error = (
            grade.given, grade.correct, grade.error)
        return record

    writing = asyncio.Lock()

    async def worker() -> None:
        while pending:
            problem, mode = pending.popleft()
            record = await answer(problem, mode)
            # Written off the loop (a sync per answer); the lock keeps one line at a time.
            async with writing:
                await asyncio.to_thread(results.append, record)
            fresh[(problem.id, mode)] = record
            if on_record is not None:
                on_record(record)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(settings.concurrency, len(pending))):
                group.create_task(worker())
    except BaseExceptionGroup as failed:
        # Generation errors are recorded, not raised; what gets here (a full disk, a bug) is one
        # cause the caller should see as itself.
        raise failed.exceptions[0] from None
    finally:
        if own_grader:
            active.close()
    merged = {**done, **fresh}
    ordered = [merged[(p.id, m)] for p in problems for m in chosen if (p.id, m) in merged]
    return EvalRun(records=ordered, generated=len(fresh), resumed=resumed, out_dir=out)


def cast_modes(values: Iterable[str]) -> list[Mode]:
    """Mode names checked against :data:`MODES` (for command lines and config files)."""
    modes: list[Mode] = []
    for value in values:
        if value not in MODES:
            raise ConfigError(f"unknown mode {value!r}; choose among {', '.join(MODES)}")
        modes.append(value)
    return modes
