"""Fixtures of the evaluation tests: the sample, a shared grader, and scripted server pairs
(see ``scripted.py`` for what each model answers)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from specthink.evaluation.datasets import Problem, load_problems
from specthink.evaluation.grading import Grader
from specthink.testing.server import LatencyModel, LoopbackServer

from .scripted import small_model, target_model


@dataclass
class Pair:
    small: LoopbackServer
    target: LoopbackServer

    @property
    def urls(self) -> tuple[str, str]:
        return self.small.url, self.target.url


@pytest.fixture(scope="session")
def sample() -> list[Problem]:
    return load_problems("sample")


@pytest.fixture(scope="session")
def grader() -> Iterator[Grader]:
    """One grading worker for the whole session: it imports sympy once."""
    with Grader(workers=1) as shared:
        yield shared


@pytest.fixture
def pair(sample: list[Problem]) -> Iterator[Pair]:
    with LoopbackServer(small_model(sample), model_id="test/small-1.5b") as small, \
            LoopbackServer(target_model(sample), model_id="test/target-32b") as target:
        yield Pair(small, target)


@pytest.fixture
def slow_pair(sample: list[Problem]) -> Iterator[Pair]:
    """As ``pair``, but each token takes a little while, so concurrent answers overlap."""
    latency = LatencyModel(per_request=0.02, per_token=0.002)
    with LoopbackServer(small_model(sample), model_id="test/small-1.5b",
                        latency=latency) as small, \
            LoopbackServer(target_model(sample), model_id="test/target-32b",
                           latency=latency) as target:
        yield Pair(small, target)
