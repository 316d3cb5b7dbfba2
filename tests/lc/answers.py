"""A deterministic "model" defined by its whole answer to each conversation.

``AnswerModel(answer)`` writes ``answer(prompt)``, resumed from wherever the assistant text of
the prompt stands (whichever model wrote it): so when a pair shares one, the target continues
the very text the small model would have written, and a takeover changes the author of a
passage, not its words. Unlike ``ScriptedModel`` it keeps a leading ``<think>`` in the written
text, which ChatML models write themselves.
"""

from __future__ import annotations

from collections.abc import Callable

from specthink.testing.models import Continuation

__all__ = ["CHATML_ASSISTANT", "AnswerModel"]

CHATML_ASSISTANT = "<|im_start|>assistant\n"


class AnswerModel:
    def __init__(self, answer: Callable[[str], str]) -> None:
        self.answer = answer

    def continuation(self, prompt: str) -> Continuation:
        answer = self.answer(prompt)
        written = prompt.rsplit(CHATML_ASSISTANT, 1)[-1]
        if answer.startswith(written):
            return Continuation(answer[len(written):], True)
        return Continuation("", True)  # text the answer does not hold: stop
