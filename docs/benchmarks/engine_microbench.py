"""Client CPU per streamed token of the engine alone, with in-memory backends (no sockets).

Run it against any tree: ``PYTHONPATH=<tree> python docs/benchmarks/engine_microbench.py``. The
backends hand out pre-built tokens from a plain async iterator, so what is measured is the engine
(and the takeover policy) per token: accepting, holding probes, deciding, accounting. ``specthink
bench`` measures the whole client over HTTP; this isolates the loop. Figures are CPU microseconds
per streamed token (small + target), best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from specthink import SpeculativeThinker, TakeoverRules
from specthink.backends.base import ServerInfo, StreamToken
from specthink.testing.models import Tokenizer, assistant_text

TOKENS = Tokenizer()


class _Tokens:
    __slots__ = ("_items", "_next")

    def __init__(self, items: list[StreamToken]) -> None:
        self._items = items
        self._next = 0

    def __aiter__(self) -> _Tokens:
        return self

    async def __anext__(self) -> StreamToken:
        if self._next >= len(self._items):
            raise StopAsyncIteration
        item = self._items[self._next]
        self._next += 1
        return item


class MemoryBackend:
    """Writes ``continuation(text_so_far)``, tokenised once per request."""

    adds_bos_token = False
    supports_grammar = False
    renders_chat_template = False

    def __init__(self, continuation: Callable[[str], tuple[str, bool]]) -> None:
        self.continuation = continuation
        self.url = "memory://"
        self.streamed = 0
        self._cache: dict[tuple[str, bool, int], list[StreamToken]] = {}

    @asynccontextmanager
    async def stream(self, prompt: str, *, max_new_tokens: int, sampling: Any,
                     on_attempt: Any = None, **_: Any) -> AsyncIterator[_Tokens]:
        if on_attempt is not None:
            on_attempt(1)
        text, eos = self.continuation(assistant_text(prompt))
        key = (text, eos, max_new_tokens)
        items = self._cache.get(key)
        if items is None:  # built once (in the warm-up run), so requests cost little
            pieces = TOKENS.tokenize(text)[:max_new_tokens]
            items = [StreamToken(p) for p in pieces]
            if eos and len(pieces) < max_new_tokens:
                items.append(StreamToken("", special=True, finish_reason="eos"))
            elif items:
                items[-1] = StreamToken(items[-1].text, finish_reason="length")
            self._cache[key] = items
        yield _Counting(items, self)

    async def info(self, **_: Any) -> ServerInfo:
        return ServerInfo(model_id="memory")

    async def health(self) -> bool:
        return True

    async def count_tokens(self, text: str) -> int:
        return TOKENS.count(text)

    async def render_chat(self, messages: Any, tools: Any = None) -> str | None:
        return None

    async def aclose(self) -> None:
        return None


class _Counting(_Tokens):
    __slots__ = ("_backend",)

    def __init__(self, items: list[StreamToken], backend: MemoryBackend) -> None:
        super().__init__(items)
        self._backend = backend

    async def __anext__(self) -> StreamToken:
        item = await super().__anext__()
        self._backend.streamed += 1
        return item


def paragraphs(count: int, reflect_every: int) -> list[str]:
    return [f"Wait, let me reconsider step {k} once more."
            if reflect_every and k % reflect_every == 1
            else f"Step {k}: the value is {k} times two, which gives {2 * k}, and we write it "
                 "down carefully before we go on to the next part of the work."
            for k in range(count)]


def writer(parts: list[str]) -> Callable[[str], tuple[str, bool]]:
    script = "\n\n".join(parts)

    def continuation(written: str) -> tuple[str, bool]:
        if script.startswith(written):
            return script[len(written):], True
        breaks = written.count("\n\n")
        if written.endswith("\n\n"):
            return "\n\n".join(parts[breaks:]), True
        rest = parts[breaks + 1:]
        return ("\n\n" + "\n\n".join(rest) if rest else ""), True

    return continuation


TARGET = (" I see, the value is right and we continue with the plan exactly as stated before,"
          " carefully and in order.")

SCENARIOS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "takeovers (a reflection every 3rd paragraph)": (paragraphs(400, 3), {}),
    "no takeovers (every paragraph probed)": (paragraphs(400, 0), {}),
    "one paragraph, no delimiter": ([" ".join(paragraphs(400, 0)).replace("\n", " ")], {}),
    "takeovers, with a stop sequence": (paragraphs(400, 3), {"stop": ["Observation:"]}),
}


async def measure(parts: list[str], params: dict[str, Any], conversations: int) -> float:
    small = MemoryBackend(writer(parts))
    target = MemoryBackend(lambda written: (TARGET, False))
    thinker = SpeculativeThinker(small=small, target=target,  # type: ignore[arg-type]
                                 rules=TakeoverRules.paper(), small_template="chatml",
                                 target_template="chatml", check_prompt_length=False)
    question = [{"role": "user", "content": "Work it out."}]
    await thinker.agenerate(question, max_new_tokens=200_000, **params)  # warm up
    small.streamed = target.streamed = 0
    started = time.process_time()
    for _ in range(conversations):
        await thinker.agenerate(question, max_new_tokens=200_000, **params)
    cpu = time.process_time() - started
    return cpu / (small.streamed + target.streamed) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for name, (parts, params) in SCENARIOS.items():
        best = min(asyncio.run(measure(parts, params, args.conversations))
                   for _ in range(args.repeat))
        print(f"{best:7.2f} us/token  {name}")


if __name__ == "__main__":
    main()
