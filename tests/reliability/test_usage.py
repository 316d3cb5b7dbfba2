"""``input_tokens`` is the conversation's prompt as the small server tokenised it, whatever the
takeovers and resumes did to the requests (issue: usage showed byte lengths and resumed
requests' counts)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from specthink import SpeculativeThinker
from specthink.backends.base import Backend
from specthink.backends.openai import OpenAICompletionsBackend
from specthink.backends.tgi import TGIBackend
from specthink.testing.models import Script, ScriptedModel, Tokenizer
from specthink.testing.server import Fault, LoopbackServer

QUESTION = [{"role": "user", "content": "What is x? Think it through, please."}]
FIX = "Actually x is two because both terms are equal"
FIX20 = "".join(Tokenizer().tokenize(FIX + " and the sum doubles one of them, so two")[:20])
SMALL = ScriptedModel([
    Script("", "Let x be 2.\n\nWait, x is 3.\n\nSo x is 3."),
    Script(FIX20, "\n\nSo the answer is 2, as we found above with some care."),
])
TARGET = ScriptedModel([Script("Let x be 2.\n\n", FIX + " and the sum doubles one of them, "
                               "so two")])


@pytest.fixture
def servers() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    with LoopbackServer(SMALL, model_id="Qwen/Qwen2.5-1.5B") as small, \
            LoopbackServer(TARGET, model_id="Qwen/Qwen2.5-32B") as target:
        yield small, target


def backends(kind: str, small: LoopbackServer, target: LoopbackServer) -> tuple[Backend, Backend]:
    if kind == "tgi":
        return TGIBackend(small.url, retry_backoff=0.01), TGIBackend(target.url, retry_backoff=0.01)
    return (OpenAICompletionsBackend(small.url, retry_backoff=0.01),
            OpenAICompletionsBackend(target.url, retry_backoff=0.01))


@pytest.mark.parametrize("kind", ["tgi", "openai"])
async def test_input_tokens_is_the_first_prompt_as_the_server_counted_it(
        servers: tuple[LoopbackServer, LoopbackServer], kind: str) -> None:
    """A takeover cuts the first small stream (so its count never arrives) and a dropped
    stream is resumed from a longer prompt: neither may leak into input_tokens."""
    small, target = servers
    small.inject(Fault.drop(after_tokens=3))  # the resumed request carries accepted text
    small_backend, target_backend = backends(kind, small, target)
    thinker = SpeculativeThinker(small=small_backend, target=target_backend,
                                 small_template="chatml", target_template="chatml")
    try:
        result = await thinker.agenerate(QUESTION)
    finally:
        await thinker.aclose()
    assert result.stats.takeovers["rule1"] == 1
    assert result.stats.resumed_streams["small"] == 1
    first = small.records[0]
    later = [r.prompt_tokens for r in small.records[1:]]
    assert later and all(count > first.prompt_tokens for count in later)
    assert result.stats.input_tokens == first.prompt_tokens
    assert result.stats.input_tokens != len(first.prompt.encode())
