"""One generation as the loopback server runs it: the model's continuation cut into tokens,
prefill against the prefix cache, the latency model's time, and a fault applied mid-stream."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from specthink.testing._accounting import LatencyModel, PrefixCache, RequestRecord
from specthink.testing._faults import ERROR_MESSAGES, Fault
from specthink.testing._streaming import StreamControl, Write
from specthink.testing._wire import EOS_ID, EOS_TEXT, Job, TGIFinish, Token
from specthink.testing.models import TextModel, Tokenizer

__all__ = ["Generation", "Host", "RenderError", "RenderToken", "continuation"]

RenderToken = Callable[[int, Token, bool], bytes]
"""The bytes of token ``index`` (the last one when the flag is set)."""
RenderError = Callable[[str, str], bytes]
"""The bytes of an in-stream error event (message, error type)."""


class Host(Protocol):
    """Where a generation finds the latency model and the prefix cache: the server, read on
    every use, so that a test may swap them while requests run."""

    @property
    def latency(self) -> LatencyModel: ...

    @property
    def cache(self) -> PrefixCache: ...

    @property
    def in_flight(self) -> int:
        """Generations holding a concurrency permit now (for ``LatencyModel.max_batch``)."""
        ...


def continuation(model: TextModel, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
                 stop: Sequence[str], *, special_tokens: Sequence[str] = (),
                 stop_tokens: Sequence[str] = ()) -> tuple[list[Token], TGIFinish]:
    """The tokens ``model`` writes after ``prompt`` and TGI's finish reason.

    ``special_tokens`` are cut out of the text as tokens of their own, flagged special; the
    first of ``stop_tokens`` the model writes ends the generation as end-of-sequence does (it
    is the last token, and no server puts it in the text)."""
    answer = model.continuation(prompt)
    tokens: list[Token] = []
    text = ""
    for piece, special in special_pieces(tokenizer, answer.text, special_tokens):
        if len(tokens) >= max_new_tokens:
            return tokens, "length"
        tokens.append((piece, tokenizer.token_id(piece), special))
        if special and piece in stop_tokens:
            return tokens, "eos_token"
        if not special:
            text += piece
            if any(s and text.endswith(s) for s in stop):
                return tokens, "stop_sequence"
    if len(tokens) >= max_new_tokens or not answer.eos:
        # A continuation without end-of-sequence ends as if the budget ran out.
        return tokens, "length"
    tokens.append((EOS_TEXT, EOS_ID, True))
    return tokens, "eos_token"


def special_pieces(tokenizer: Tokenizer, text: str,
                   special_tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """``text``'s tokens, each ``special_tokens`` string a token of its own flagged special."""
    if not special_tokens:
        return [(piece, False) for piece in tokenizer.tokenize(text)]
    pattern = "(" + "|".join(re.escape(t) for t in sorted(special_tokens, key=len,
                                                              reverse=True)) + ")"
    out: list[tuple[str, bool]] = []
    for index, part in enumerate(re.split(pattern, text)):
        if index % 2:
            out.append((part, True))
        else:
            out.extend((piece, False) for piece in tokenizer.tokenize(part))
    return out


@dataclass(eq=False)
class Generation:
    """An admitted request: its record, the validated job and the fault it drew."""

    record: RequestRecord
    job: Job
    fault: Fault | None
    lock: threading.Lock
    host: Host

    def update(self, **changes: Any) -> None:
        with self.lock:
            for name, value in changes.items():
                setattr(self.record, name, value)

    def _prefill(self) -> tuple[list[int], float]:
        """Look the prompt up in the prefix cache; returns the hash chain and prefill seconds."""
        record, job = self.record, self.job
        hashes = PrefixCache.chain(job.prompt_ids)
        with self.lock:
            cache = self.host.cache
            matched = cache.match(hashes)
            # Like TGI and vLLM, the last prompt token is always recomputed (its logits are
            # needed for the first new token).
            cached = min(matched, max(len(hashes) - 1, 0))
            cache.add(hashes[matched:])
            record.prompt_tokens = len(hashes)
            record.cached_prompt_tokens = cached
            record.max_new_tokens = job.max_new_tokens
        latency = self.host.latency
        seconds = latency.prefill_seconds(len(hashes) - cached)
        return hashes, seconds * latency.slowdown(self.host.in_flight)

    async def complete(self) -> None:
        """A non-streamed generation: the latency model's time, then everything at once."""
        record, job = self.record, self.job
        hashes, prefill = self._prefill()
        latency = self.host.latency
        service = prefill + latency.per_token * len(job.tokens) * latency.slowdown(
            self.host.in_flight)
        if service > 0:
            await asyncio.sleep(service)
        head = hashes[-1] if hashes else 0
        with self.lock:
            self.host.cache.add(PrefixCache.chain((i for _, i, s in job.tokens if not s), head))
            record.tokens_sent = len(job.tokens)
            record.finish_reason = job.finish
            record.service_seconds = service
            record.finished = time.monotonic()

    async def stream(self, write: Write, control: StreamControl, render: RenderToken,
                     render_error: RenderError) -> None:
        """Prefill, then send each token with the latency model, applying the fault."""
        record, job, fault = self.record, self.job, self.fault
        hashes, prefill = self._prefill()
        head = hashes[-1] if hashes else 0
        service = prefill
        # Tokens follow a schedule, as a GPU's decode steps do: each is due a fixed time after
        # the previous one was due, so the server's own overhead and the sleeps' overshoot do
        # not pile up on top of the latency model.
        clock = asyncio.get_running_loop().time
        due = clock() + prefill
        if prefill > 0:
            await asyncio.sleep(prefill)
        last = len(job.tokens) - 1
        burst: list[bytes] = []
        sent = 0

        async def flush() -> None:
            nonlocal head, sent
            if not burst:
                return
            await write(b"".join(burst))
            written, sent = job.tokens[sent:sent + len(burst)], sent + len(burst)
            burst.clear()
            with self.lock:
                for _, token_id, special in written:
                    record.tokens_sent += 1
                    if not special:
                        head = hash((head, token_id))
                        self.host.cache.add((head,))
                record.service_seconds = service

        for index, token in enumerate(job.tokens):
            if fault is not None and fault.after_tokens == index:
                await flush()
                if fault.kind == "error_event":
                    message = ERROR_MESSAGES.get(fault.error_type,
                                                 f"injected {fault.error_type} error")
                    self.update(error_type=fault.error_type, service_seconds=service)
                    await write(render_error(message, fault.error_type))
                    return
                if fault.kind == "drop":
                    self.update(service_seconds=service)
                    await control.drop_connection()
                    return
                if fault.kind == "stall":
                    await asyncio.sleep(fault.seconds)
                    due = max(due, clock())
            latency = self.host.latency
            step = latency.per_token * latency.slowdown(self.host.in_flight)
            due += step
            wait = due - clock()
            if wait > 0 or len(burst) >= latency.burst:
                await flush()
                # Sleep (zero seconds when late) even without latency, so 256 streams share
                # the loop.
                await asyncio.sleep(max(0.0, wait))
            service += step
            burst.append(render(index, token, index == last))
        # Recorded before the last write: a client that has read the end may look at once.
        self.update(finish_reason=job.finish)
        await flush()
        self.update(service_seconds=service)
