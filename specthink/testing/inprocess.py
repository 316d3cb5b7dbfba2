"""An in-process backend: the :class:`~specthink.backends.base.Backend` protocol over a
deterministic model, with no sockets. For unit tests of the engine and of framework adapters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import OnAttempt, SamplingParams, ServerInfo, StreamToken
from ..errors import BackendConnectionError, StreamDroppedError
from .models import Continuation, TextModel, Tokenizer

__all__ = ["InProcessRequest", "ScriptedBackend"]


@dataclass(slots=True)
class InProcessRequest:
    """One ``stream`` call as the backend saw it."""

    prompt: str
    max_new_tokens: int
    sampling: SamplingParams
    routing_key: str | None = None
    tokens_sent: int = 0
    closed_early: bool = False
    """The caller left the stream before it ended (the server would cancel the generation)."""


@dataclass(slots=True)
class _Faults:
    unreachable: bool = False
    drop_after: list[int] = field(default_factory=list)


class ScriptedBackend:
    """A backend whose model runs in-process: ``model.continuation(prompt)``, tokenized.

    ``fail_connections()`` makes every request fail as an unreachable server would;
    ``drop_after(k)`` breaks the next stream after ``k`` tokens.
    """

    adds_bos_token = False
    supports_grammar = False
    keeps_tool_turns = True

    async def call_grammar(self, tools: Sequence[dict[str, Any]],
                           name: str | None) -> dict[str, Any] | None:
        return None

    def __init__(self, model: TextModel, *, tokenizer: Tokenizer | None = None,
                 url: str = "inprocess://scripted", model_id: str = "specthink/scripted",
                 max_input_tokens: int | None = None, max_total_tokens: int | None = None,
                 max_stop_sequences: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer or Tokenizer()
        self.url = url
        self.model_id = model_id
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.max_stop_sequences = max_stop_sequences
        self.requests: list[InProcessRequest] = []
        self.info_calls = 0
        self._faults = _Faults()

    def __repr__(self) -> str:
        return f"ScriptedBackend(url={self.url!r})"

    def fail_connections(self, failing: bool = True) -> None:
        self._faults.unreachable = failing

    def drop_after(self, tokens: int) -> None:
        self._faults.drop_after.append(tokens)

    def continuation(self, prompt: str) -> Continuation:
        return self.model.continuation(prompt)

    @asynccontextmanager
    async def stream(self, prompt: str, *, max_new_tokens: int, sampling: SamplingParams,
                     on_attempt: OnAttempt | None = None, routing_key: str | None = None,
                     ) -> AsyncIterator[AsyncIterator[StreamToken]]:
        if on_attempt is not None:
            on_attempt(1)
        if self._faults.unreachable:
            raise BackendConnectionError("connection refused", url=self.url)
        record = InProcessRequest(prompt, max_new_tokens, sampling, routing_key)
        self.requests.append(record)
        drop_after = self._faults.drop_after.pop(0) if self._faults.drop_after else None
        iterator = self._tokens(record, drop_after)
        try:
            yield iterator
        finally:
            finished = await _drain_state(iterator)
            record.closed_early = not finished

    async def _tokens(self, record: InProcessRequest,
                      drop_after: int | None) -> AsyncIterator[StreamToken]:
        continuation = self.model.continuation(record.prompt)
        pieces = self.tokenizer.tokenize(continuation.text)[: record.max_new_tokens]
        input_tokens = self.tokenizer.count(record.prompt)
        ends_with_eos = continuation.eos and len(pieces) < record.max_new_tokens
        for index, piece in enumerate(pieces):
            if drop_after is not None and index == drop_after:
                raise StreamDroppedError("connection dropped mid-stream", url=self.url,
                                         tokens_received=index)
            await asyncio.sleep(0)  # let other conversations run, as a socket read would
            last = index == len(pieces) - 1 and not ends_with_eos
            record.tokens_sent += 1
            yield StreamToken(piece, finish_reason="length" if last else None,
                              input_tokens=input_tokens if last else None)
        if ends_with_eos or not pieces:
            record.tokens_sent += 1
            yield StreamToken("", special=True, finish_reason="eos", input_tokens=input_tokens)

    async def info(self, *, refresh: bool = False) -> ServerInfo:
        """Always current: the limits are read from this object's attributes on each call."""
        self.info_calls += 1
        return ServerInfo(model_id=self.model_id, max_input_tokens=self.max_input_tokens,
                          max_total_tokens=self.max_total_tokens,
                          max_stop_sequences=self.max_stop_sequences)

    async def health(self) -> bool:
        return not self._faults.unreachable

    async def count_tokens(self, text: str) -> int:
        return self.tokenizer.count(text)

    async def tokenize(self, text: str) -> list[int]:
        return [self.tokenizer.token_id(piece) for piece in self.tokenizer.tokenize(text)]

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None,
                          chat_template_kwargs: Mapping[str, Any] | None = None,
                          ) -> str | None:
        """ChatML, as a server whose model uses it would render (SmolLM2, Qwen)."""
        from specthink.prompts import CHATML

        return CHATML.render_text(messages, tools)

    async def aclose(self) -> None:
        return None


async def _drain_state(iterator: AsyncIterator[StreamToken]) -> bool:
    """Close the token generator; report whether it had already run to its end."""
    frame = getattr(iterator, "ag_frame", None)
    finished = frame is None
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
    return finished
