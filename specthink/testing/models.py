"""Deterministic stand-ins for language models, shared by the loopback server and in-process
backends: a tokenizer and "models" whose output is a pure function of the prompt text, as greedy
decoding is."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ASSISTANT_MARKERS",
    "Continuation",
    "EchoModel",
    "RoutedModel",
    "Script",
    "ScriptedModel",
    "TextModel",
    "ThinkingModel",
    "Tokenizer",
    "assistant_text",
    "last_user_message",
]


class Tokenizer:
    """Splits text into word-like tokens, deterministically.

    ``"\\n\\n"`` is one token unless ``split_newlines`` is set, when every newline is its own
    token (so the paragraph delimiter spans two tokens). Angle-bracket markers such as
    ``<think>`` or ``<|im_end|>`` are single tokens.
    """

    _MARKER = r"<\|?/?[\w▁｜]+\|?>|<｜[^<>｜]{1,40}｜>"

    def __init__(self, *, split_newlines: bool = False) -> None:
        self.split_newlines = split_newlines
        newline = r"\n" if split_newlines else r"\n\n|\n"
        self._pattern = re.compile(
            rf"{self._MARKER}|{newline}| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|[^\S\n]")

    def tokenize(self, text: str) -> list[str]:
        return self._pattern.findall(text)

    def count(self, text: str) -> int:
        return len(self._pattern.findall(text))

    @staticmethod
    def token_id(token: str) -> int:
        return zlib.crc32(token.encode()) % 50_000 + 10


@dataclass(frozen=True, slots=True)
class Continuation:
    """What a model writes next: ``text``, then end-of-sequence if ``eos``."""

    text: str
    eos: bool = True


class TextModel(Protocol):
    """A model: the full prompt text in, its continuation out."""

    def continuation(self, prompt: str) -> Continuation: ...


ASSISTANT_MARKERS = (
    "<|im_start|>assistant\n",  # ChatML (Qwen, SmolLM2)
    "<｜Assistant｜>",  # DeepSeek-R1
    "<|start_header_id|>assistant<|end_header_id|>\n\n",  # Llama 3
    "Assistant:",
)


def assistant_text(prompt: str, markers: Sequence[str] = ASSISTANT_MARKERS, *,
                   keep_think: bool = False) -> str:
    """The text after the last assistant marker: what the model has written so far (without
    an opening ``<think>\n`` unless ``keep_think``)."""
    best = -1
    best_end = 0
    for marker in markers:
        at = prompt.rfind(marker)
        if at > best:
            best, best_end = at, at + len(marker)
    text = prompt[best_end:] if best >= 0 else prompt
    return text if keep_think else text.removeprefix("<think>\n")


def last_user_message(prompt: str) -> str:
    """The content of the last user turn of a ChatML or DeepSeek-R1 prompt ("" if none)."""
    for start, end in (("<|im_start|>user\n", "<|im_end|>"), ("<｜User｜>", "<｜Assistant｜>")):
        at = prompt.rfind(start)
        if at >= 0:
            body = prompt[at + len(start):]
            stop = body.find(end)
            return body if stop < 0 else body[:stop]
    return ""


@dataclass(frozen=True, slots=True)
class Script:
    """After assistant text ending with ``after``, the model writes ``text`` (then EOS if ``eos``).

    ``after=""`` applies from the start of the answer.
    """

    after: str
    text: str
    eos: bool = True


def _longest_prefix_suffix(pattern: str, text: str) -> int:
    """Length of the longest prefix of ``pattern`` that is a suffix of ``text`` (KMP)."""
    if not pattern or not text:
        return 0
    tail = text[-len(pattern):]
    if pattern.startswith(tail):
        return len(tail)
    joined = pattern + "\x00" + tail
    failure = [0] * len(joined)
    for i in range(1, len(joined)):
        k = failure[i - 1]
        while k and joined[i] != joined[k]:
            k = failure[k - 1]
        if joined[i] == joined[k]:
            k += 1
        failure[i] = k
    return failure[-1]


class ScriptedModel:
    """A model that follows scripts, resuming any of them from the middle.

    For the assistant text written so far (whoever wrote it), the model finds the script whose
    ``after + text`` has the longest prefix that the assistant text ends with (at least all of
    ``after``), and continues that script from there. No match: it writes ``default``.
    """

    def __init__(self, scripts: Sequence[Script | tuple[str, str]], *, default: str = "",
                 markers: Sequence[str] = ASSISTANT_MARKERS) -> None:
        self.scripts = [s if isinstance(s, Script) else Script(*s) for s in scripts]
        self.default = default
        self.markers = tuple(markers)

    @classmethod
    def single(cls, text: str, *, eos: bool = True) -> ScriptedModel:
        """A model that always writes ``text`` from the start of the answer."""
        return cls([Script("", text, eos)])

    def continue_text(self, written: str) -> Continuation:
        found = self._find(written)
        return Continuation(self.default, True) if found is None else found

    def _find(self, written: str) -> Continuation | None:
        best: tuple[int, Script, int] | None = None
        for script in self.scripts:
            full = script.after + script.text
            if script.after == "" and full.startswith(written):
                matched = len(written)
            else:
                matched = _longest_prefix_suffix(full, written)
                if matched < len(script.after) or (script.after == "" and matched == 0
                                                   and written):
                    continue
            if best is None or matched > best[0]:
                best = (matched, script, matched - len(script.after))
        if best is None:
            return None
        _, script, offset = best
        return Continuation(script.text[offset:], script.eos)

    def continuation(self, prompt: str) -> Continuation:
        written = assistant_text(prompt, self.markers)
        found = self._find(written)
        if found is None and written != (raw := assistant_text(prompt, self.markers,
                                                               keep_think=True)):
            # A script that writes its own "<think>\n" (under ChatML), resumed after it.
            found = self._find(raw)
        return Continuation(self.default, True) if found is None else found


class ThinkingModel:
    """A reasoning model whose whole output is a function of the conversation, under any chat
    template.

    ``think(conversation)`` gets the prompt before the assistant's generation marker and returns
    ``(reasoning, answer)``; the model writes ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``.
    After a generation prompt that already opened the block (DeepSeek-R1 and Qwen3 thinking
    templates end with ``<think>\\n``) it does not write the tag again, as those models do not;
    after any other (ChatML) it writes the tag itself, unless ``writes_start`` is false: models
    trained only under templates that open the block (the R1 distills, QwQ, Qwen3 thinking
    checkpoints) never write it, so under another template their reasoning arrives untagged
    and only ``</think>`` ends it. Empty reasoning: the answer alone (an opened block is closed
    first).

    It continues from the assistant text the prompt already holds, whichever model wrote it,
    as greedy decoding would: a takeover changes who writes a passage, not its words. Text the
    output does not hold makes it stop.

    >>> model = ThinkingModel(lambda conversation: ("Two and two.", "Four."))
    >>> model.continuation("<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n").text
    '<think>\\nTwo and two.\\n</think>\\n\\nFour.'
    >>> model.continuation("<｜User｜>2+2?<｜Assistant｜><think>\\n").text
    'Two and two.\\n</think>\\n\\nFour.'
    """

    def __init__(self, think: Callable[[str], tuple[str, str]], *,
                 markers: Sequence[str] = ASSISTANT_MARKERS, start: str = "<think>",
                 end: str = "</think>", writes_start: bool = True) -> None:
        self.think = think
        self.writes_start = writes_start
        self.markers = tuple(markers)
        self.start = start
        self.end = end

    def continuation(self, prompt: str) -> Continuation:
        at, marker = max((prompt.rfind(m), m) for m in self.markers)
        conversation, written = (prompt[:at], prompt[at + len(marker):]) if at >= 0 else (
            prompt, "")
        reasoning, answer = self.think(conversation)
        if reasoning:
            full = f"{reasoning}\n{self.end}\n\n{answer}"
            if self.writes_start or written.startswith(self.start):
                full = f"{self.start}\n{full}"
        elif written.startswith(self.start):
            full = f"{self.start}\n{self.end}\n\n{answer}"
        else:
            full = answer
        if full.startswith(written):
            return Continuation(full[len(written):], True)
        return Continuation("", True)


class RoutedModel:
    """Chooses a model by the last user message: the first route whose key it contains."""

    def __init__(self, routes: Sequence[tuple[str | Callable[[str], bool], TextModel]],
                 default: TextModel | None = None) -> None:
        self.routes = list(routes)
        self.default = default

    def continuation(self, prompt: str) -> Continuation:
        question = last_user_message(prompt)
        for key, model in self.routes:
            if (key(question) if callable(key) else key in question):
                return model.continuation(prompt)
        if self.default is None:
            return Continuation("I have no script for this question.", True)
        return self.default.continuation(prompt)


class EchoModel:
    """Writes back the last user message (``prefix`` first), a handy default for smoke tests."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def continuation(self, prompt: str) -> Continuation:
        answer = self.prefix + last_user_message(prompt)
        written = assistant_text(prompt)
        if answer.startswith(written):
            return Continuation(answer[len(written):], True)
        return Continuation("", True)
