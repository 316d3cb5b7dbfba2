"""The public surface of specthink_lc: one name, importable from the package root."""

from __future__ import annotations

import specthink_lc
from specthink_lc import ChatSpeculativeThinking


def test_all_is_exactly_the_chat_model() -> None:
    assert specthink_lc.__all__ == ["ChatSpeculativeThinking"]
    assert specthink_lc.ChatSpeculativeThinking is ChatSpeculativeThinking
