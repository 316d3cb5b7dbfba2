"""The evaluation harness: the paper's accuracy tables on your own servers.

    from specthink.evaluation import EvalSettings, load_problems, run_evaluation, summarize

    problems = load_problems("math500.jsonl")
    run = await run_evaluation(problems, small=TGIBackend(url1), target=TGIBackend(url2),
                               out_dir="results/math500")
    for summary in summarize(run.records):
        print(summary.mode, summary.accuracy, summary.mean_output_tokens, summary.target_share)

The ``specthink eval`` command wraps this (``docs/evaluation.md``). Grading needs the ``eval``
extra (math-verify); the plot needs matplotlib, from the same extra.
"""

from specthink.evaluation.datasets import SAMPLE, Problem, load_problems, sample_path
from specthink.evaluation.grading import Grade, Grader, GradingError, last_boxed, verify_math
from specthink.evaluation.prompts import build_messages, choice_prompt, math_prompt
from specthink.evaluation.report import (
    ModeSummary,
    markdown_report,
    paper_cell,
    summarize,
    write_plot,
    write_reports,
)
from specthink.evaluation.runner import (
    MODES,
    PAPER_SAMPLING,
    EvalRecord,
    EvalRun,
    EvalSettings,
    Mode,
    run_evaluation,
)

__all__ = [
    "MODES",
    "PAPER_SAMPLING",
    "SAMPLE",
    "EvalRecord",
    "EvalRun",
    "EvalSettings",
    "Grade",
    "Grader",
    "GradingError",
    "Mode",
    "ModeSummary",
    "Problem",
    "build_messages",
    "choice_prompt",
    "last_boxed",
    "load_problems",
    "markdown_report",
    "math_prompt",
    "paper_cell",
    "run_evaluation",
    "sample_path",
    "summarize",
    "verify_math",
    "write_plot",
    "write_reports",
]
