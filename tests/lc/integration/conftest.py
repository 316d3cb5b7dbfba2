"""Integration tests of the LangChain adapter: real HTTP to TGI-protocol servers on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from specthink.testing import LoopbackServer

from .suite_model import SuiteModel


@pytest.fixture(scope="module")
def suite_pair() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    """A small and a target server, both answering the standard suite's prompts."""
    with LoopbackServer(SuiteModel(), model_id="test/small") as small, \
            LoopbackServer(SuiteModel(), model_id="test/target") as target:
        yield small, target
