"""Unit tests of the LangChain adapter run with the network off: the models are in-process
(``specthink.testing.inprocess``); only Unix sockets stay allowed, which asyncio's loops need."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_socket


@pytest.fixture(autouse=True)
def _no_network() -> Iterator[None]:
    pytest_socket.disable_socket(allow_unix_socket=True)
    yield
    pytest_socket.enable_socket()
