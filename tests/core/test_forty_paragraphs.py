"""A 40-paragraph conversation over loopback TGI, judged from the servers' own records.

What it proves (DESIGN.md "How fast and how sure", the counts only; times live in benchmarks):
- at most 2 HTTP requests per takeover (the target's, and the small model's resume);
- every request's prompt is a strict extension of that server's previous request, so the
  previous prompt is >= 99% served from the prefix cache (the rest of a new prompt is the other
  model's text, which that server has never seen and must compute);
- only the probe up to the keyword that decided a takeover is read and thrown away, and the
  small model's stream is closed there.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest

from specthink import SpeculativeThinker, TakeoverRules
from specthink.backends.tgi import TGIBackend
from specthink.testing.models import Continuation, Tokenizer, assistant_text
from specthink.testing.server import LatencyModel, LoopbackServer
from specthink.trace import TakeoverEvent

PARAGRAPHS = [
    f"Wait, let me reconsider step {k} once more." if k % 3 == 1
    # longer than a probe window, so each "Wait" is seen only from its own trigger
    else f"Step {k}: the value is {k} times two, which gives {2 * k}, and we write it down "
         "carefully before we go on to the next part of the work."
    for k in range(40)
]
SCRIPT = "\n\n".join(PARAGRAPHS)
TARGET_TEXT = (" I see, the value is right and we continue with the plan exactly as stated before,"
               " carefully and in order.")


class ParagraphWriter:
    """The small model: writes the 40 paragraphs, picking up after whatever the target wrote."""

    def continuation(self, prompt: str) -> Continuation:
        written = assistant_text(prompt)
        if SCRIPT.startswith(written):
            return Continuation(SCRIPT[len(written):])
        breaks = written.count("\n\n")
        if written.endswith("\n\n"):
            return Continuation("\n\n".join(PARAGRAPHS[breaks:]))
        # the target wrote paragraph `breaks` in place of ours: go on with the next one
        rest = PARAGRAPHS[breaks + 1:]
        return Continuation("\n\n" + "\n\n".join(rest) if rest else "")


class Helper:
    """The target model: a calm sentence wherever it is asked to write."""

    def continuation(self, prompt: str) -> Continuation:
        return Continuation(TARGET_TEXT, eos=False)


@pytest.fixture
async def servers() -> AsyncIterator[tuple[LoopbackServer, LoopbackServer]]:
    # A token every 5 ms: the client has that long to hang up before the next one is sent.
    with LoopbackServer(ParagraphWriter(), latency=LatencyModel(per_token=0.005)) as small, \
            LoopbackServer(Helper(), latency=LatencyModel(per_token=0.002)) as target:
        yield small, target


async def test_forty_paragraphs_from_the_servers_records(
        servers: tuple[LoopbackServer, LoopbackServer]) -> None:
    small_server, target_server = servers
    rules = TakeoverRules.paper()
    thinker = SpeculativeThinker(small=TGIBackend(small_server.url),
                                 target=TGIBackend(target_server.url), rules=rules,
                                 small_template="chatml", target_template="chatml")
    try:
        result = await thinker.agenerate([{"role": "user", "content": "Work it out."}])
    finally:
        await thinker.aclose()

    takeovers = result.stats.total_takeovers
    assert takeovers == sum(p.startswith("Wait") for p in PARAGRAPHS) == 13
    assert result.text.count("Wait") == 0  # every reflection was handed to the target

    small_records = small_server.records
    target_records = target_server.records
    requests = len(small_records) + len(target_records)
    assert requests <= 1 + 2 * takeovers
    assert result.stats.requests == {"small": len(small_records), "target": len(target_records)}

    for records in (small_records, target_records):
        for previous, current in itertools.pairwise(records):
            assert current.prompt.startswith(previous.prompt)  # strict textual extension
            assert current.cached_prompt_tokens >= 0.99 * previous.prompt_tokens

    # How many tokens the server wrote before it noticed the hang-up depends on scheduling
    # (a busy machine lets it write ahead); what the client read and threw away does not: the
    # probe up to the keyword, and the stream closed right there.
    tokenizer = Tokenizer()
    closed = [r for r in small_records if r.disconnected]
    assert len(closed) == takeovers
    discarded = [e.discarded_tokens for e in result.events if isinstance(e, TakeoverEvent)]
    for record, thrown in zip(closed, discarded, strict=True):
        tokens = tokenizer.tokenize(ParagraphWriter().continuation(record.prompt).text)
        keyword_at = _first_decided_keyword(tokens, rules)
        trigger = _trigger_before(tokens, keyword_at, rules)
        assert thrown == keyword_at - trigger, (thrown, keyword_at, trigger)
        assert record.tokens_sent > keyword_at


def _trigger_before(tokens: list[str], keyword_at: int, rules: TakeoverRules) -> int:
    """Index of the trigger token whose probe window holds ``keyword_at``."""
    return max(i for i in range(keyword_at) if rules.delimiter in tokens[i])


def _first_decided_keyword(tokens: list[str], rules: TakeoverRules) -> int:
    """Index of the token completing the first keyword inside a probe window."""
    for trigger, token in enumerate(tokens):
        if rules.delimiter not in token:
            continue
        window = tokens[trigger + 1: trigger + 1 + rules.probe_tokens]
        for offset in range(len(window)):
            if rules.has_keyword("".join(window[: offset + 1])):
                return trigger + 1 + offset
    raise AssertionError("no keyword in any probe window")
