"""Problem files in every supported layout, and the prompts built from them."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from specthink.errors import ConfigError
from specthink.evaluation.datasets import Problem, load_problems, sample_path, shuffle_choices
from specthink.evaluation.prompts import build_messages, choice_prompt, math_prompt


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


GPQA_ROWS = [
    {"Record ID": f"rec{i}", "Question": f"Which particle is number {i}?",
     "Correct Answer": f" right {i}\n", "Incorrect Answer 1": f"wrong {i}a",
     "Incorrect Answer 2": f"wrong {i}b", "Incorrect Answer 3": f"wrong {i}c",
     "Subdomain": "Physics"}
    for i in range(12)
]


def test_the_bundled_sample_has_twenty_maths_problems_with_unique_ids() -> None:
    """If this fails, specthink/data/eval_sample.jsonl is missing from the package or broken."""
    problems = load_problems("sample")

    assert sample_path().is_file()
    assert len(problems) == 20
    assert len({p.id for p in problems}) == 20
    assert all(p.kind == "math" and p.answer and p.problem for p in problems)


def test_math500_layout_uses_unique_id_and_ignores_other_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "Compute $1+1$.", "solution": "It is $\\boxed{2}$.", "answer": "2",
         "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
        {"problem": "Convert $(0,3)$ to polar.", "solution": "...",
         "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
         "unique_id": "test/precalculus/807.json"},
    ])

    problems = load_problems(path)

    assert problems == [
        Problem("test/prealgebra/1.json", "Compute $1+1$.", "2"),
        Problem("test/precalculus/807.json", "Convert $(0,3)$ to polar.",
                "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ]


def test_aime_layouts_with_capitalised_or_lower_case_fields(tmp_path: Path) -> None:
    upper = write_jsonl(tmp_path / "aime24.jsonl", [
        {"ID": "2024-I-1", "Problem": "Every morning Aya walks...", "Solution": "...",
         "Answer": 204}])
    lower = write_jsonl(tmp_path / "aime.jsonl", [
        {"id": 60, "problem": "Find the remainder...", "answer": "033",
         "url": "https://artofproblemsolving.com/wiki/index.php/2022_AIME_I_Problems"}])

    assert load_problems(upper) == [Problem("2024-I-1", "Every morning Aya walks...", "204")]
    assert load_problems(lower) == [Problem("60", "Find the remainder...", "033")]


def test_amc23_layout_with_question_and_float_answers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "amc23.jsonl", [
        {"id": 0, "question": "Cities A and B are 45 miles apart...", "answer": 27.0},
        {"id": 1, "question": "What is the ratio?", "answer": 2.5}])

    problems = load_problems(path)

    assert [(p.id, p.answer) for p in problems] == [("0", "27"), ("1", "2.5")]
    assert problems[0].problem == "Cities A and B are 45 miles apart..."


def test_gpqa_csv_choices_are_shuffled_the_same_way_on_every_load(tmp_path: Path) -> None:
    """GPQA lists the right answer first; without a shuffle every answer would be A. The order
    must depend only on the record id, so a resumed run asks the same question."""
    path = tmp_path / "gpqa_diamond.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(GPQA_ROWS[0]))
        writer.writeheader()
        writer.writerows(GPQA_ROWS)

    first, second = load_problems(path), load_problems(path)

    assert first == second
    for index, problem in enumerate(first):
        assert problem.id == f"rec{index}"
        assert problem.kind == "choice"
        assert sorted(problem.choices) == sorted(
            [f"right {index}", f"wrong {index}a", f"wrong {index}b", f"wrong {index}c"])
        assert problem.choices["ABCD".index(problem.answer)] == f"right {index}"
    assert len({p.answer for p in first}) > 1, "every right answer got the same letter"


def test_gpqa_jsonl_layout_matches_the_csv_one(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gpqa.jsonl", GPQA_ROWS[:3])
    choices, letter = shuffle_choices("right 1", ["wrong 1a", "wrong 1b", "wrong 1c"], "rec1")

    problems = load_problems(path)

    assert problems[1] == Problem("rec1", "Which particle is number 1?", letter, choices)


@pytest.mark.parametrize(("choices", "answer", "letter"), [
    (["red", "green", "blue"], "B", "B"),
    (["red", "green", "blue"], "(c)", "C"),
    (["red", "green", "blue"], "green", "B"),
    (["red", "green", "blue"], 0, "A"),
    ({"B": "green", "A": "red"}, "green", "B"),
])
def test_generic_multiple_choice_answers(tmp_path: Path, choices: Any, answer: Any,
                                         letter: str) -> None:
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"id": "q1", "question": "Which colour?", "choices": choices, "answer": answer}])

    (problem,) = load_problems(path)

    assert problem.answer == letter
    assert problem.choices[ord(letter) - ord("A")] in ("red", "green", "blue")


def test_json_files_with_a_list_or_a_data_key(tmp_path: Path) -> None:
    rows = [{"problem": "1+1?", "answer": "2", "id": "a"}]
    (tmp_path / "list.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "data.json").write_text(json.dumps({"data": rows}), encoding="utf-8")

    assert load_problems(tmp_path / "list.json") == load_problems(tmp_path / "data.json")


def test_problems_without_ids_get_stable_ids_from_their_text(tmp_path: Path) -> None:
    """Resuming matches answers by id, so a derived id must not depend on the line order."""
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"},
            {"problem": "1+1?", "answer": "2"}]
    forward = load_problems(write_jsonl(tmp_path / "a.jsonl", rows))
    backward = load_problems(write_jsonl(tmp_path / "b.jsonl", rows[1::-1]))

    assert len({p.id for p in forward}) == 3
    assert {p.problem: p.id for p in forward[:2]} == {p.problem: p.id for p in backward}
    assert forward[2].id == forward[0].id + "-2"


@pytest.mark.parametrize(("rows", "message"), [
    ([{"problem": "1+1?"}], "line 1: no answer"),
    ([{"text": "1+1?", "answer": "2"}], "line 1: no problem text"),
    ([{"id": 1, "problem": "a", "answer": "1"}, {"id": 1, "problem": "b", "answer": "2"}],
     "line 2: duplicate problem id '1'"),
    ([{"problem": "a", "choices": ["x", "y"], "answer": "z"}], "neither a letter A-B"),
])
def test_bad_records_are_refused_with_their_line(tmp_path: Path, rows: list[dict[str, Any]],
                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_problems(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset file not found"):
        load_problems(tmp_path / "nope.jsonl")


def test_the_paper_maths_prompt() -> None:
    assert math_prompt(" What is $1+1$? ") == (
        "Please reason step by step, and put your final answer within \\boxed{}. "
        "What is $1+1$?")
    assert build_messages(Problem("x", "What is $1+1$?", "2")) == [
        {"role": "user", "content": math_prompt("What is $1+1$?")}]


def test_the_multiple_choice_prompt_names_the_letters_and_lists_the_choices() -> None:
    assert choice_prompt("Which one?", ["x", "y", "z", "w"]) == (
        "Return your final response within \\boxed{} and only include the letter choice "
        "(A, B, C, or D) as your final response. Which one?\nA) x, B) y, C) z, D) w")
    assert "(A, B, or C)" in choice_prompt("Which one?", ["x", "y", "z"])
