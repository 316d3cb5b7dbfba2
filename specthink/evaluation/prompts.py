"""The prompts of the paper's evaluation.

Maths: the instruction the authors' harness (SkyThought's task templates, as shipped in their
repository) puts before every problem. Multiple choice: SkyThought's GPQA-Diamond prompt, the
question followed by ``A) ..., B) ..., C) ..., D) ...``, with the letter expected in
``\\boxed{}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from specthink.evaluation.datasets import LETTERS, Problem

__all__ = [
    "CHOICE_INSTRUCTION",
    "LETTERS",
    "MATH_INSTRUCTION",
    "build_messages",
    "choice_prompt",
    "math_prompt",
]

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

CHOICE_INSTRUCTION = ("Return your final response within \\boxed{{}} and only include the letter "
                      "choice ({letters}) as your final response.")
"""``{letters}`` becomes "A, B, C, or D" for the usual four choices."""


def math_prompt(problem: str) -> str:
    """The paper's maths prompt: the instruction, a space, the problem."""
    return f"{MATH_INSTRUCTION} {problem.strip()}"


def _letter_list(count: int) -> str:
    letters = list(LETTERS[:count])
    if count <= 2:
        return " or ".join(letters)
    return ", ".join(letters[:-1]) + ", or " + letters[-1]


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    """The multiple-choice prompt: instruction, question, then ``A) ..., B) ...`` on one line."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"a multiple-choice problem needs 2 to {len(LETTERS)} choices, "
                         f"got {len(choices)}")
    instruction = CHOICE_INSTRUCTION.format(letters=_letter_list(len(choices)))
    options = ", ".join(f"{letter}) {choice.strip()}"
                        for letter, choice in zip(LETTERS, choices, strict=False))
    return f"{instruction} {question.strip()}\n{options}"


def build_messages(problem: Problem) -> list[dict[str, Any]]:
    """The conversation sent for ``problem``: one user turn, no system prompt (as the paper)."""
    content = (choice_prompt(problem.problem, problem.choices) if problem.choices
               else math_prompt(problem.problem))
    return [{"role": "user", "content": content}]
