"""Problem files: the bundled sample and the public benchmarks in their usual layouts.

Nothing is downloaded: the user provides the file (``docs/evaluation.md`` says where each public
set lives). Accepted formats, by file suffix: ``.jsonl`` (one JSON object per line), ``.json`` (a
list of objects, or an object holding one under ``data``/``problems``/``test``/``train``) and
``.csv`` (GPQA's own distribution). Field names are matched case-insensitively:

===============  =====================================================================
layout           fields
===============  =====================================================================
generic / ours   ``problem``, ``answer``, optional ``id``
MATH500          ``problem``, ``answer``, ``unique_id`` (``solution`` etc. are ignored)
AIME 2022-2024   ``problem`` or ``question``, ``answer``, ``id`` or ``ID``
AMC23            ``question`` or ``problem``, ``answer`` (a number, possibly ``27.0``)
multiple choice  ``problem``/``question``, ``choices`` (list, or ``{"A": ...}``), ``answer``
                 (a letter, the text of the right choice, or a 0-based index)
GPQA-Diamond     ``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``, ``Record ID``
===============  =====================================================================

GPQA keeps the right answer first, so its choices are shuffled, deterministically per problem id
(the same order on every run and machine), before letters are assigned.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from specthink.errors import ConfigError

__all__ = [
    "LETTERS",
    "SAMPLE",
    "Problem",
    "load_problems",
    "problem_from_record",
    "read_records",
    "sample_path",
    "shuffle_choices",
]

SAMPLE = "sample"
"""Pass this instead of a path to use the bundled sample (20 short maths problems)."""

_TEXT_KEYS = ("problem", "question")
_ANSWER_KEYS = ("answer",)
_ID_KEYS = ("id", "unique_id", "record id", "problem_id", "problem_idx", "idx")
_CHOICE_KEYS = ("choices", "options")
_GPQA_CORRECT = "correct answer"
_GPQA_INCORRECT = tuple(f"incorrect answer {i}" for i in range(1, 4))
_JSON_LIST_KEYS = ("data", "problems", "test", "train", "rows")
LETTERS = "ABCDEFGHIJ"
"""Choice labels, in order; a problem may have at most this many choices."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem: maths (``choices`` empty) or multiple choice (``answer`` is a letter)."""

    id: str
    problem: str
    answer: str
    choices: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "choice" if self.choices else "math"


def sample_path() -> Path:
    """The bundled sample file (``specthink/data/eval_sample.jsonl``)."""
    return Path(str(resources.files("specthink").joinpath("data", "eval_sample.jsonl")))


def load_problems(path: str | Path) -> list[Problem]:
    """Every problem of ``path`` (or of the bundled sample for ``"sample"``), in file order.

    Raises ``ConfigError`` naming the line/row for a record without problem text or answer, and
    for two problems with the same explicit id (resuming a run matches problems by id).
    """
    source = sample_path() if str(path) == SAMPLE and not Path(path).exists() else Path(path)
    if not source.is_file():
        raise ConfigError(f"dataset file not found: {source}")
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for where, record in read_records(source):
        problem = problem_from_record(record, where=where)
        if problem.id in seen:
            if _explicit_id(record) is not None:
                raise ConfigError(
                    f"{where}: duplicate problem id {problem.id!r} (first at {seen[problem.id]}); "
                    "results are matched by id, so every problem needs its own")
            # The same text twice without ids: number the copies so each is graded.
            base, copy = problem.id, 2
            while f"{base}-{copy}" in seen:
                copy += 1
            problem = Problem(f"{base}-{copy}", problem.problem, problem.answer, problem.choices)
        seen[problem.id] = where
        problems.append(problem)
    if not problems:
        raise ConfigError(f"{source} holds no problems")
    return problems


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` pairs; ``where`` names the file and line (or row, or index)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            for row_number, row in enumerate(csv.DictReader(handle), start=2):
                yield f"{path.name} row {row_number}", dict(row)
        return
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path.name} is not valid JSON: {exc}") from exc
        if isinstance(data, Mapping):
            data = next((data[k] for k in _JSON_LIST_KEYS if isinstance(data.get(k), list)),
                        None)
        if not isinstance(data, list):
            raise ConfigError(f"{path.name}: expected a list of problems, or an object with one "
                              f"under {', '.join(repr(k) for k in _JSON_LIST_KEYS)}")
        for index, item in enumerate(data):
            yield f"{path.name} item {index}", _object(item, f"{path.name} item {index}")
        return
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {line_number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where} is not valid JSON: {exc}") from exc
            yield where, _object(item, where)


def _object(item: object, where: str) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return dict(item)


def _lower_keys(record: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in record.items()}


def _first(fields: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        value = fields.get(key)
        if value is not None and value != "":
            return value
    return None


def _explicit_id(record: Mapping[str, Any]) -> str | None:
    value = _first(_lower_keys(record), _ID_KEYS)
    return None if value is None else str(value).strip() or None


def _answer_text(value: Any, where: str) -> str:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: the answer is a boolean ({value}), expected text or a number")
    if isinstance(value, float) and value.is_integer():
        # AMC files store answers as floats: 27.0 means 27.
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ConfigError(f"{where}: the answer is empty or not text ({value!r})")


def _derived_id(text: str) -> str:
    return "p-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def shuffle_choices(correct: str, incorrect: Sequence[str],
                    key: str) -> tuple[tuple[str, ...], str]:
    """All choices in an order fixed by ``key`` (the problem id), and the right one's letter."""
    choices = [correct, *incorrect]
    seed = int.from_bytes(hashlib.sha256(f"specthink-choices:{key}".encode()).digest()[:8], "big")
    random.Random(seed).shuffle(choices)
    return tuple(choices), LETTERS[choices.index(correct)]


def _choice_answer(answer: Any, choices: Sequence[str], where: str) -> str:
    letters = LETTERS[:len(choices)]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return letters[answer]
        raise ConfigError(f"{where}: answer index {answer} is outside the {len(choices)} choices")
    text = _answer_text(answer, where)
    bare = text.strip("() .").upper()
    if len(bare) == 1 and bare in letters:
        return bare
    matches = [i for i, choice in enumerate(choices) if choice.strip() == text]
    if len(matches) == 1:
        return letters[matches[0]]
    raise ConfigError(f"{where}: answer {text!r} is neither a letter {letters[0]}-{letters[-1]} "
                      "nor the text of exactly one choice")


def _choices(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, Mapping):
        items = [value[k] for k in sorted(value, key=str)]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(f"{where}: choices must be a list or a letter -> text object")
    if not 2 <= len(items) <= len(LETTERS):
        raise ConfigError(f"{where}: {len(items)} choices; between 2 and {len(LETTERS)} "
                          "are supported")
    return tuple(str(item).strip() for item in items)


def problem_from_record(record: Mapping[str, Any], *, where: str = "record") -> Problem:
    """A :class:`Problem` from one record of any supported layout."""
    fields = _lower_keys(record)
    explicit = _explicit_id(record)
    if _GPQA_CORRECT in fields and all(k in fields for k in _GPQA_INCORRECT):
        question = _first(fields, _TEXT_KEYS)
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{where}: GPQA record without a Question")
        key = explicit or _derived_id(question.strip())
        correct = _answer_text(fields[_GPQA_CORRECT], where)
        incorrect = [_answer_text(fields[k], where) for k in _GPQA_INCORRECT]
        choices, letter = shuffle_choices(correct, incorrect, key)
        return Problem(key, question.strip(), letter, choices)
    text = _first(fields, _TEXT_KEYS)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: no problem text; expected a field named "
                          f"{' or '.join(repr(k) for k in _TEXT_KEYS)} "
                          f"(fields present: {', '.join(sorted(fields)) or 'none'})")
    answer = _first(fields, _ANSWER_KEYS)
    if answer is None:
        raise ConfigError(f"{where}: no answer; expected a field named 'answer' "
                          f"(fields present: {', '.join(sorted(fields))})")
    key = explicit or _derived_id(text.strip())
    raw_choices = _first(fields, _CHOICE_KEYS)
    if raw_choices is not None:
        choices = _choices(raw_choices, where)
        return Problem(key, text.strip(), _choice_answer(answer, choices, where), choices)
    return Problem(key, text.strip(), _answer_text(answer, where))
