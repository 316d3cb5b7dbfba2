"""Scripted model pairs that answer the bundled sample, some right, some wrong, some unboxed.

The sample's 20 problems fall into five groups (by id):

=======  ====================================  =====  ===========  ======
group    what happens                          small  speculative  target
=======  ====================================  =====  ===========  ======
A 01-08  both models right (equivalent forms)  right  right        right
B 09-12  small says "Wait", writes a wrong     wrong  right        right
         answer; the target's takeover fixes
C 13-15  small wrong without any keyword       wrong  wrong        right
D 16-18  small writes no \\boxed{} answer      none   none         right
E 19-20  both models wrong                     wrong  wrong        wrong
=======  ====================================  =====  ===========  ======

So small alone scores 8/20, speculative 12/20, target alone 18/20.
"""

from __future__ import annotations

from collections.abc import Callable

from specthink.evaluation.datasets import Problem
from specthink.testing.models import RoutedModel, Script, ScriptedModel, TextModel

SMALL_RIGHT = {  # group A: what the small model boxes (equivalent to the expected answer)
    "sample-01": "156", "sample-02": "0.5", "sample-03": "4", "sample-04": "1/4",
    "sample-05": "540", "sample-06": "9", "sample-07": "1024", "sample-08": "2",
}
TAKEOVER_FIXES = {  # group B: (the small model's wrong answer, the target's right one)
    "sample-09": ("6\\pi", "9\\pi"), "sample-10": ("2", "3, 2"),
    "sample-11": ("17", "13"), "sample-12": ("25\\sqrt{2}", "\\sqrt{50}"),
}
SMALL_WRONG = {"sample-13": "24", "sample-14": "3", "sample-15": "10"}  # group C
UNBOXED = ("sample-16", "sample-17", "sample-18")  # group D
BOTH_WRONG = {"sample-19": ("5", "8"), "sample-20": ("2", "4")}  # group E: (small, target)

OPENING = "Let me compute.\n\n"
"""Every answer starts with a paragraph, so each has a trigger point."""


def small_script(problem: Problem) -> str:
    pid = problem.id
    if pid in SMALL_RIGHT:
        return f"{OPENING}So the result is \\boxed{{{SMALL_RIGHT[pid]}}}."
    if pid in TAKEOVER_FIXES:
        return f"{OPENING}Wait, the result is \\boxed{{{TAKEOVER_FIXES[pid][0]}}}."
    if pid in SMALL_WRONG:
        return f"{OPENING}So the result is \\boxed{{{SMALL_WRONG[pid]}}}."
    if pid in UNBOXED:
        return f"{OPENING}So the result is {problem.answer}, I think."
    return f"{OPENING}So the result is \\boxed{{{BOTH_WRONG[pid][0]}}}."


def target_alone_script(problem: Problem) -> str:
    if problem.id in BOTH_WRONG:
        return f"Directly: \\boxed{{{BOTH_WRONG[problem.id][1]}}}."
    if problem.id in TAKEOVER_FIXES:
        return f"Directly: \\boxed{{{TAKEOVER_FIXES[problem.id][1]}}}."
    return f"Directly: \\boxed{{{problem.answer}}}."


def takeover_script(problem: Problem) -> str | None:
    """What the target writes when it takes over after the opening paragraph."""
    if problem.id in TAKEOVER_FIXES:
        return f"Indeed the result is \\boxed{{{TAKEOVER_FIXES[problem.id][1]}}}."
    return None


def _route(problem: Problem) -> Callable[[str], bool]:
    # The user turn ends with the problem text; matching the end keeps routes exact.
    text = problem.problem
    return lambda question: question.rstrip().endswith(text)


def small_model(problems: list[Problem]) -> TextModel:
    routes: list[tuple[str | Callable[[str], bool], TextModel]] = [
        (_route(p), ScriptedModel.single(small_script(p))) for p in problems]
    return RoutedModel(routes)


def target_model(problems: list[Problem]) -> TextModel:
    routes: list[tuple[str | Callable[[str], bool], TextModel]] = []
    for problem in problems:
        scripts = [Script("", target_alone_script(problem))]
        fix = takeover_script(problem)
        if fix is not None:
            scripts.append(Script(OPENING, fix))
        routes.append((_route(problem), ScriptedModel(scripts)))
    return RoutedModel(routes)
