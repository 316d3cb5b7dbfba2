"""``specthink bench``: the engine against the physical limit and the alternatives, in one run.

Loopback TGI servers (child processes) behave like a 1.5B and a 32B model on a GPU
(:mod:`~benchmarks.profiles`) and play long scripted reasoning traces
(:mod:`~benchmarks.traces`). Every policy (:mod:`~benchmarks.policies`: the engine,
the authors' control loop, each model alone) answers the same conversations at 1, 16 and 256 at
once (:mod:`~benchmarks.runner`), each cell in a fresh client process
(:mod:`~benchmarks.worker`) so its CPU time and memory are its own;
:mod:`~benchmarks.metrics` turns client outcomes and server records into figures and
:mod:`~benchmarks.report` into ``docs/benchmarks/``.

Needs the ``testing`` extra (the servers), ``cli`` for the command and ``eval`` (matplotlib) for
the plots.
"""

from benchmarks.runner import BenchConfig, BenchResult, Level, run_bench

__all__ = ["BenchConfig", "BenchResult", "Level", "run_bench"]
