"""Shared fixtures of the CLI tests."""

from __future__ import annotations

import pytest

from specthink.trace import Result, Rule, Statistics, TakeoverEvent, TextEvent


@pytest.fixture
def sample_result() -> Result:
    """Small text, a rule-1 takeover, a rule-2 continuation, small again, then rule 3."""
    stats = Statistics(small_tokens=12, target_tokens=9, intervention_tokens=8,
                       discarded_tokens=3, input_tokens=20, finish_reason="stop")
    stats.takeovers["rule1"] = 1
    stats.takeovers["rule2"] = 1
    stats.takeovers["rule3"] = 1
    stats.requests.update(small=3, target=3)
    stats.wait_seconds.update(small=0.25, target=0.5)
    events = (
        TextEvent("small", "x = 1 + 1.\n\n"),
        TakeoverEvent(Rule.AFFIRM_REFLECT, offset=12, discarded_tokens=3),
        TextEvent("target", "Wait, check: ", Rule.AFFIRM_REFLECT),
        TakeoverEvent(Rule.VERIFY, offset=25),
        TextEvent("target", "1 + 1 = 2.", Rule.VERIFY),
        TextEvent("small", " So <b>x</b> & y.\n\n"),
        TakeoverEvent(Rule.EXCESSIVE_REFLECTION, offset=54),
        TextEvent("intervention", "Let me check whether there are some wrong steps:",
                  Rule.EXCESSIVE_REFLECTION),
        TextEvent("target", " none.", Rule.EXCESSIVE_REFLECTION),
    )
    text = "".join(e.text for e in events if isinstance(e, TextEvent))
    return Result(text=text, events=events, stats=stats)
