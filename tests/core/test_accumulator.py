"""``AcceptedText``: the engine's accepted text, a pure class (appends, cuts, the recent end)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specthink.accepted import AcceptedText

_PIECES = st.text(alphabet="ab</think>\n é", max_size=8)
_STEPS = st.lists(st.one_of(_PIECES.map(lambda piece: ("append", piece)),
                            st.integers(min_value=0, max_value=40).map(lambda n: ("cut", n))),
                  max_size=30)


@given(st.integers(min_value=0, max_value=9), _STEPS)
def test_the_text_is_every_piece_in_order_cut_where_asked(keep: int,
                                                          steps: list[tuple[str, object]]) -> None:
    """Broken: appending or cutting loses, repeats or reorders text, ``length`` drifts from
    the text, or ``recent`` no longer holds the end a stop sequence or tag can complete in (the
    last ``keep`` characters before the newest piece, and that piece)."""
    accepted = AcceptedText(keep)
    model = ""
    for action, value in steps:
        if action == "append":
            assert isinstance(value, str)
            before = model
            model += value
            recent = accepted.append(value)
            assert recent == accepted.recent
            assert recent.endswith(value)
            assert recent == before[len(before) - min(keep, len(before)):] + value
        else:
            assert isinstance(value, int)
            model = model[:value]
            accepted.truncate(value)
            assert accepted.recent == model[len(model) - min(keep, len(model)):]
        assert accepted.length == len(model)
        assert accepted.text == model
        assert model.endswith(accepted.recent)


def test_joining_happens_once_and_appends_go_on() -> None:
    """Broken: reading the text breaks later appends (the pieces are joined into one)."""
    accepted = AcceptedText(2)
    for piece in ("<th", "ink>", "x"):
        accepted.append(piece)
    assert accepted.text == "<think>x"
    accepted.append("</think>")
    assert accepted.text == "<think>x</think>"
    assert accepted.recent == ">x</think>"  # the last keep=2 characters before, the piece


def test_a_negative_keep_is_refused() -> None:
    """Broken: a negative ``keep`` is taken and ``recent`` silently misbehaves."""
    with pytest.raises(ValueError, match="keep"):
        AcceptedText(-1)
