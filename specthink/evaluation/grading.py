"""Grading: the last ``\\boxed{...}`` of an answer against the expected answer.

Maths answers are compared for mathematical equivalence by ``math-verify`` (``1/2``, ``0.5`` and
``\\frac{1}{2}`` are the same answer). math-verify bounds its own work with ``signal.alarm``,
which only works on the main thread of the main interpreter, while an evaluation grades answers
as they arrive, beside an event loop. So its timeouts are switched off (``parsing_timeout=None``,
``timeout_seconds=None``) and the work is bounded here instead: every comparison runs in a worker
process (``python -m specthink.evaluation._worker``) that is killed, and replaced, when one
answer takes longer than ``timeout`` seconds. A pathological answer costs one worker restart, not
the run.

Multiple-choice answers are letters and are compared directly, without a worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from specthink.errors import SpecthinkError
from specthink.evaluation.datasets import LETTERS, Problem

__all__ = [
    "DEFAULT_GRADING_TIMEOUT",
    "Grade",
    "Grader",
    "GradingError",
    "extract_letter",
    "last_boxed",
    "verify_math",
]

DEFAULT_GRADING_TIMEOUT = 10.0
"""Seconds one comparison may take (math-verify's own default is 5 s per parse or compare step)."""

STARTUP_TIMEOUT = 120.0
"""Seconds a worker may take to import math-verify and sympy (a few seconds on a slow machine)."""

_BOX_MARKERS = ("\\boxed", "\\fbox")
_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LETTER = re.compile(r"\(?([A-Za-z])\)?(?:\s*[.):]\s*.*)?", re.DOTALL)


class GradingError(SpecthinkError):
    """A comparison could not be made: it timed out, or the worker failed."""


@dataclass(frozen=True, slots=True)
class Grade:
    """The verdict on one answer."""

    given: str | None
    """What the answer says: the last boxed content (for multiple choice, the letter found in
    it); ``None`` when the answer has no boxed content."""
    correct: bool
    error: str | None = None
    """Why the answer could not be compared (it then counts as wrong)."""


# ---- extraction (pure) -------------------------------------------------------------------


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[start]``, and the index after it."""
    depth = 0
    for index in range(start, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:index], index + 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last non-empty ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); ``\\boxed 5`` gives ``5``. A box
    cut off before its closing brace (an answer that ran out of tokens) does not count.
    """
    found: str | None = None
    position = 0
    while True:
        at = min((i for i in (text.find(m, position) for m in _BOX_MARKERS) if i >= 0),
                 default=-1)
        if at < 0:
            return found
        marker = next(m for m in _BOX_MARKERS if text.startswith(m, at))
        rest = at + len(marker)
        stripped = rest
        while stripped < len(text) and text[stripped] == " ":
            stripped += 1
        content: str | None = None
        if stripped < len(text) and text[stripped] == "{":
            group = _braced(text, stripped)
            if group is not None:
                content, position = group
            else:
                position = rest
        elif stripped > rest:  # "\boxed 5": the next word
            match = re.match(r"[^\s$]+", text[stripped:])
            content = match.group(0) if match else None
            position = stripped + (len(content) if content else 0)
        else:
            position = rest
        if content is not None and content.strip():
            found = content.strip()


def extract_letter(content: str, choices: int = 4) -> str | None:
    """The choice letter a boxed answer names (``B``, ``(B)``, ``\\text{B}``, ``B) 42``), or
    ``None`` when it names none of the first ``choices`` letters."""
    text = content.strip()
    while True:
        unwrapped = _WRAPPER.sub(lambda m: m.group(1), text)
        if unwrapped == text:
            break
        text = unwrapped
    text = text.strip().strip("$").strip()
    match = _LETTER.fullmatch(text)
    if match is None:
        return None
    letter = match.group(1).upper()
    return letter if letter in LETTERS[:choices] else None


def _normalised(answer: str) -> str:
    return re.sub(r"\s+", "", answer).removeprefix("$").removesuffix("$")


def verify_math(expected: str, given: str) -> bool:
    """math-verify's verdict on ``given`` against ``expected`` (both without ``\\boxed``).

    Runs without math-verify's signal timeouts, so it must run where it may be killed:
    :class:`Grader` calls it in a worker process.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    # Both sides go in as a boxed expression: the answer is already extracted, and boxing makes
    # math-verify read it as one LaTeX expression (a bare "1,2" would be read as a number).
    gold = parse(f"\\boxed{{{expected}}}", extraction_config=config, parsing_timeout=None)
    pred = parse(f"\\boxed{{{given}}}", extraction_config=config, parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


# ---- the worker pool ---------------------------------------------------------------------


def _worker_env() -> dict[str, str]:
    """The parent's environment, with this copy of specthink importable (a source checkout
    may be on ``sys.path`` without being installed)."""
    import specthink

    root = str(Path(specthink.__file__).resolve().parent.parent)
    env = dict(os.environ)
    paths = [root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class _Worker:
    """One grading process, spoken to in JSON lines; restarted after a timeout or a crash."""

    def __init__(self, command: Sequence[str], startup_timeout: float) -> None:
        self.command = list(command)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.ready = False
        self.reader: threading.Thread | None = None

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.stop()
        self.lines = queue.Queue()
        self.ready = False
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, encoding="utf-8", bufsize=1,
            env=_worker_env())
        assert self.process.stdout is not None
        self.reader = threading.Thread(target=self._read, args=(self.process.stdout, self.lines),
                                       name="specthink-grader-reader", daemon=True)
        self.reader.start()

    @staticmethod
    def _read(stream: IO[str], lines: queue.Queue[str | None]) -> None:
        try:
            for line in stream:
                lines.put(line)
        except (OSError, ValueError):  # the pipe was closed under us by stop()
            pass
        lines.put(None)

    def _next(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.stop(kill=True)
            raise GradingError(f"{what} timed out after {timeout:g} s") from None
        if line is None:
            code = self.process.poll() if self.process else None
            self.stop(kill=True)
            raise GradingError(f"the grading worker exited (code {code}) during {what}")
        try:
            message: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            self.stop(kill=True)
            raise GradingError(f"the grading worker wrote {line[:80]!r}") from None
        return message

    def call(self, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.start()
        if not self.ready:
            hello = self._next(self.startup_timeout, "the grading worker's start")
            if not hello.get("ready"):
                self.stop(kill=True)
                raise GradingError(str(hello.get("fatal") or f"grading worker said {hello!r}"))
            self.ready = True
        process = self.process
        assert process is not None and process.stdin is not None
        try:
            process.stdin.write(json.dumps(payload) + "\n")
            process.stdin.flush()
        except OSError as exc:
            self.stop(kill=True)
            raise GradingError(f"the grading worker is gone: {exc}") from exc
        return self._next(timeout, "grading")

    def stop(self, *, kill: bool = False) -> None:
        """End the process: gracefully (end of input) unless ``kill``; it restarts on demand."""
        process, self.process = self.process, None
        self.ready = False
        if process is None:
            return
        if process.poll() is None:
            if kill:
                process.kill()
            else:
                try:
                    assert process.stdin is not None
                    process.stdin.close()  # a healthy worker exits at the end of its input
                    process.wait(timeout=2.0)
                except (OSError, subprocess.TimeoutExpired):
                    process.kill()
            process.wait()
        # The reader sees end-of-file once the process is gone; only then close its pipe.
        if self.reader is not None:
            self.reader.join(timeout=5.0)
            self.reader = None
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


class Grader:
    """Grades answers; maths comparisons run in ``workers`` processes, ``timeout`` s each.

    >>> with Grader() as grader:
    ...     grade = await grader.grade(problem, answer_text)

    A worker starts with the first comparison that needs it (multiple-choice answers and answers
    identical to the expected one need none); :meth:`start` starts them all at once instead.
    Use :meth:`grade` from async code and :meth:`grade_blocking` from threads; both are safe to
    call concurrently.
    """

    def __init__(self, *, workers: int = 2, timeout: float = DEFAULT_GRADING_TIMEOUT,
                 startup_timeout: float = STARTUP_TIMEOUT,
                 worker_command: Sequence[str] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        command = list(worker_command or (sys.executable, "-m", "specthink.evaluation._worker"))
        self._workers = [_Worker(command, startup_timeout) for _ in range(workers)]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for worker in self._workers:
            self._idle.put(worker)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="specthink-grader")
        self._closed = False

    def start(self) -> Grader:
        """Start every worker now (each imports math-verify in the background)."""
        for worker in self._workers:
            worker.start()
        return self

    def close(self) -> None:
        """Stop the workers and the threads that talk to them."""
        if self._closed:
            return
        self._closed = True
        # Stopping the workers first ends any comparison still in flight (its thread then sees
        # the worker gone), so closing never waits for a slow answer.
        self._executor.shutdown(wait=False, cancel_futures=True)
        for worker in self._workers:
            worker.stop()
        self._executor.shutdown(wait=True)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Grader(workers={len(self._workers)}, timeout={self.timeout:g})"

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (a replaced worker has a new one)."""
        return [w.process.pid for w in self._workers
                if w.process is not None and w.process.poll() is None]

    def _compare(self, expected: str, given: str) -> bool:
        worker = self._idle.get()
        try:
            reply = worker.call({"expected": expected, "given": given}, self.timeout)
        finally:
            self._idle.put(worker)
        if "error" in reply:
            raise GradingError(f"math-verify failed: {reply['error']}")
        return bool(reply.get("correct"))

    def _decide(self, problem: Problem, output: str) -> Grade | tuple[str, str]:
        """A grade when no worker is needed, else the (expected, given) pair to compare."""
        content = last_boxed(output)
        if content is None:
            return Grade(None, False)
        if problem.choices:
            letter = extract_letter(content, len(problem.choices))
            return Grade(letter or content, letter == problem.answer)
        if _normalised(content) == _normalised(problem.answer):
            return Grade(content, True)
        return problem.answer, content

    def grade_blocking(self, problem: Problem, output: str) -> Grade:
        """Grade ``output`` (the model's whole answer text) for ``problem``."""
        decided = self._decide(problem, output)
        if isinstance(decided, Grade):
            return decided
        expected, given = decided
        try:
            return Grade(given, self._compare(expected, given))
        except GradingError as exc:
            return Grade(given, False, str(exc))

    async def grade(self, problem: Problem, output: str) -> Grade:
        """Grade ``output`` without blocking the event loop."""
        decided = self._decide(problem, output)
        if isinstance(decided, Grade):
            return decided
        if self._closed:
            raise GradingError("the grader is closed")
        expected, given = decided
        loop = asyncio.get_running_loop()
        try:
            correct = await loop.run_in_executor(self._executor, self._compare, expected, given)
        except GradingError as exc:
            return Grade(given, False, str(exc))
        return Grade(given, correct)
