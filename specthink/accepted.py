"""The accepted text of one answer: pure, no I/O, no clock (the engine's accumulator).

Appending to one string would copy the whole answer at every token, so the text is kept in
pieces and joined only when asked for. ``recent`` keeps the end that a stop sequence or the end
of the reasoning can still complete in, so the engine never searches the whole text per token.
"""

from __future__ import annotations

__all__ = ["AcceptedText"]


class AcceptedText:
    """Accepted text, appended piece by piece and cut back where a stop sequence begins.

    ``keep`` is how far back a marker may start before the newest piece (the longest stop
    sequence or reasoning tag, minus one): ``recent`` is the last ``keep`` characters before the
    newest piece, and that piece.
    """

    __slots__ = ("_pieces", "keep", "length", "recent")

    def __init__(self, keep: int = 0) -> None:
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.keep = keep
        self._pieces: list[str] = []
        self.length = 0
        """Characters of accepted text."""
        self.recent = ""

    @property
    def text(self) -> str:
        """The accepted text (joined once, then kept as one piece)."""
        pieces = self._pieces
        if len(pieces) > 1:
            pieces[:] = ["".join(pieces)]
        return pieces[0] if pieces else ""

    def append(self, piece: str) -> str:
        """Append ``piece``; return ``recent``."""
        self._pieces.append(piece)
        self.length += len(piece)
        keep = self.keep
        recent = self.recent = (self.recent[-keep:] if keep else "") + piece
        return recent

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` characters only."""
        text = self.text[:length]
        self._pieces[:] = [text]
        self.length = len(text)
        self.recent = text[-self.keep:] if self.keep else ""
