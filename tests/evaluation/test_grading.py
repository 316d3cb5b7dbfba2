"""Grading: boxed-answer extraction, equivalence through math-verify in a worker process, letter
matching, and a worker that hangs or dies."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap

import pytest

from specthink.evaluation.datasets import Problem
from specthink.evaluation.grading import Grader, extract_letter, last_boxed

HALF = Problem("half", "Write 3/6 in lowest terms.", "\\frac{1}{2}")
CHOICE = Problem("mc", "Which colour?", "C", ("red", "green", "blue", "black"))


def worker_script(body: str) -> list[str]:
    """A stand-in worker: says ready, then runs ``body`` for each request line."""
    source = textwrap.dedent("""
        import json, sys, time
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
        %s
    """) % textwrap.indent(textwrap.dedent(body), "    ")
    return [sys.executable, "-c", source]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(("text", "content"), [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1}, then \\boxed{2}", "2"),
    ("\\boxed{3} and an empty \\boxed{} at the end", "3"),
    ("\\boxed{7} then a cut-off \\boxed{\\frac{1", "7"),
    ("\\fbox{x+1}", "x+1"),
    ("\\boxed 5$ done", "5"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("no box at all: 42", None),
])
def test_last_boxed_takes_the_last_complete_box(text: str, content: str | None) -> None:
    assert last_boxed(text) == content


@pytest.mark.parametrize(("content", "letter"), [
    ("C", "C"), ("(c)", "C"), ("\\text{C}", "C"), ("\\textbf{(C)}", "C"), ("C) blue", "C"),
    ("$B$", "B"), ("E", None), ("blue", None), ("42", None),
])
def test_extract_letter(content: str, letter: str | None) -> None:
    assert extract_letter(content, 4) == letter


@pytest.mark.parametrize("given", ["0.5", "1/2", "\\frac{1}{2}", "\\frac12", "\\dfrac{1}{2}",
                                   "\\tfrac{1}{2}", "2^{-1}", "50\\%"])
async def test_equivalent_forms_of_one_half_are_correct(grader: Grader, given: str) -> None:
    """If this fails, math-verify is not reached (worker broken) or the answer is not boxed
    the way math-verify reads it."""
    grade = await grader.grade(HALF, f"Reasoning...\n\nSo the answer is \\boxed{{{given}}}.")

    assert grade.correct, grade
    assert grade.given == given
    assert grade.error is None


@pytest.mark.parametrize(("expected", "given", "correct"), [
    ("\\frac{1}{2}", "2", False),
    ("\\frac{1}{2}", "0.51", False),
    ("2, 3", "3, 2", True),
    ("5\\sqrt{2}", "\\sqrt{50}", True),
    ("9\\pi", "6\\pi", False),
    ("x^2 + 2x + 1", "(x+1)^2", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
])
async def test_maths_equivalence(grader: Grader, expected: str, given: str,
                                 correct: bool) -> None:
    grade = await grader.grade(Problem("p", "?", expected), f"\\boxed{{{given}}}")

    assert (grade.correct, grade.given, grade.error) == (correct, given, None)


async def test_an_answer_without_a_box_is_wrong_and_says_so(grader: Grader) -> None:
    grade = await grader.grade(HALF, "The answer is 1/2.")

    assert (grade.given, grade.correct, grade.error) == (None, False, None)


def test_grade_blocking_works_off_the_event_loop_thread(grader: Grader) -> None:
    """math-verify's own signal timeouts would raise off the main thread; ours must not."""
    async def in_threads() -> list[bool]:
        grades = await asyncio.gather(*(asyncio.to_thread(grader.grade_blocking, HALF, text)
                                        for text in ("\\boxed{0.5}", "\\boxed{0.25}")))
        return [g.correct for g in grades]

    assert asyncio.run(in_threads()) == [True, False]


async def test_multiple_choice_is_graded_by_letter_without_a_worker() -> None:
    """The worker command fails at once, so any use of it would show up as an error."""
    with Grader(workers=1, worker_command=[sys.executable, "-c", "raise SystemExit(3)"]) as g:
        right = await g.grade(CHOICE, "It must be blue. \\boxed{C}")
        wrong = await g.grade(CHOICE, "\\boxed{\\text{(A)}}")
        not_a_letter = await g.grade(CHOICE, "\\boxed{blue}")

    assert (right.given, right.correct, right.error) == ("C", True, None)
    assert (wrong.given, wrong.correct) == ("A", False)
    assert (not_a_letter.given, not_a_letter.correct) == ("blue", False)


async def test_a_hanging_comparison_is_cut_off_and_its_worker_replaced() -> None:
    """A worker that never answers must cost one answer (counted wrong, with the reason) and
    one worker, not the run."""
    hang = worker_script("time.sleep(3600)")
    with Grader(workers=1, timeout=0.5, worker_command=hang) as g:
        first = await g.grade(HALF, "\\boxed{0.5}")
        running_after_first = g.worker_pids
        second = await g.grade(HALF, "\\boxed{0.5}")

    assert not first.correct and first.given == "0.5"
    assert first.error == "grading timed out after 0.5 s"
    assert second.error == "grading timed out after 0.5 s"
    assert running_after_first == [], "the hung worker was left running"


async def test_a_worker_that_dies_is_restarted_for_the_next_answer() -> None:
    # Answers its first request and dies on reading the second one, without an answer.
    flaky = worker_script("""
        if globals().setdefault("answered", False):
            sys.exit(0)
        answered = True
        print(json.dumps({"correct": True}), flush=True)
    """)
    with Grader(workers=1, worker_command=flaky) as g:
        first = await g.grade(HALF, "\\boxed{0.5}")
        pid = g.worker_pids[0] if g.worker_pids else None
        second = await g.grade(HALF, "\\boxed{0.5}")
        third = await g.grade(HALF, "\\boxed{0.5}")

    assert first.correct and first.error is None
    assert not second.correct and "exited" in (second.error or "")
    assert third.correct and third.error is None
    assert pid is None or not alive(pid)


async def test_a_worker_that_cannot_start_reports_why() -> None:
    fatal = [sys.executable, "-c",
             "import json; print(json.dumps({'fatal': 'math-verify is not installed'}))"]
    with Grader(workers=1, worker_command=fatal) as g:
        grade = await g.grade(HALF, "\\boxed{0.5}")

    assert (grade.correct, grade.error) == (False, "math-verify is not installed")


async def test_identical_answers_need_no_worker() -> None:
    with Grader(workers=1, worker_command=[sys.executable, "-c", "raise SystemExit(3)"]) as g:
        grade = await g.grade(HALF, "\\boxed{ \\frac{1}{2} }")

    assert grade.correct and grade.error is None
