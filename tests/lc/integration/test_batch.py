"""``abatch`` runs its conversations concurrently on one event loop, over real HTTP."""

from __future__ import annotations

import threading

from langchain_core.language_models import LanguageModelInput

from specthink.testing import EchoModel, LatencyModel, LoopbackServer, RequestRecord
from specthink_lc import ChatSpeculativeThinking


async def test_abatch_of_64_conversations_overlaps_on_both_servers() -> None:
    """If this fails, abatch ran the conversations one after another (or in threads)."""
    echo = EchoModel(prefix="<think>\nEasy.\n</think>\n\nYou said: ")
    # Latency per token keeps every stream open long enough for the others to start.
    latency = LatencyModel(per_token=0.02)
    with LoopbackServer(echo, latency=latency, model_id="test/small") as small, \
            LoopbackServer(echo, latency=latency, model_id="test/target") as target:
        model = ChatSpeculativeThinking(small_url=small.url, target_url=target.url,
                                        small_template="chatml", target_template="chatml")
        questions: list[LanguageModelInput] = [f"question {n}" for n in range(64)]
        threads_before = threading.active_count()
        try:
            answers = await model.abatch(questions, config={"max_concurrency": 64})
            threads_after = threading.active_count()
        finally:
            await model.aclose()
        records = small.records

    assert [a.text for a in answers] == [f"You said: question {n}" for n in range(64)]
    assert all(a.additional_kwargs["reasoning_content"] == "\nEasy.\n" for a in answers)
    assert len(records) == 64
    # One after another, at most one request would be open at a time; the exact 64 is
    # checked in-process (tests/lc/unit), where no HTTP overhead spreads the starts.
    assert most_open_at_once(records) >= 8
    assert threads_after == threads_before


def most_open_at_once(records: list[RequestRecord]) -> int:
    edges = sorted([(r.started, 1) for r in records]
                   + [(r.finished or float("inf"), -1) for r in records])
    open_now = most = 0
    for _, step in edges:
        open_now += step
        most = max(most, open_now)
    return most
