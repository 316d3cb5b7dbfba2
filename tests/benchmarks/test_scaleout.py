"""``specthink bench --replicas``: the cell figures from synthetic records, and a tiny run
through real ``smg`` routers end to end (only what does not depend on time is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from benchmarks.cli import register
from benchmarks.policies import Outcome
from benchmarks.runner import Level
from benchmarks.scaleout import (
    ScaleOutConfig,
    run_scale_out,
    scale_cell,
    scale_headline,
    write_scale_report,
)
from benchmarks.servers import RecordSummary
from specthink.testing.routers import unavailable_reason
from specthink.testing.server import LatencyModel

LATENCY = LatencyModel(per_request=0.01, per_uncached_prompt_token=0.001, per_token=0.01)


def record(conversation: int, replica: int, started: float, prompt: int, cached: int,
           sent: int = 10, role: str = "small") -> RecordSummary:
    return RecordSummary(role=role, conversation=conversation, path="/v1/completions",  # type: ignore[arg-type]
                         prompt_tokens=prompt, cached_prompt_tokens=cached, tokens_sent=sent,
                         finish_reason=None, disconnected=False, started=started,
                         finished=started + 1, service_seconds=0.0, previous_prompt_tokens=None,
                         extends_previous=None, replica=replica)


def outcome(conversation: int, started: float, finished: float, tokens: int) -> Outcome:
    return Outcome(conversation=conversation, started=started, finished=finished,
                   first_text=None, text="", small_tokens=tokens)


def test_a_follow_up_on_another_replica_counts_as_a_cache_miss() -> None:
    """Conversation 1 stays on replica 0 (its follow-up finds all of its previous prompt);
    conversation 2's follow-up lands on replica 1, which holds nothing of it. If this fails,
    the bench compares prompts per replica and hides what an unkeyed router costs."""
    records = {"small": [record(1, 0, 0.0, 100, 0), record(1, 0, 1.0, 150, 149),
                         record(2, 0, 0.5, 100, 0), record(2, 1, 1.5, 160, 0),
                         record(0, 1, 0.0, 500, 0)],  # the warm-up: ignored
               "target": []}
    cell = scale_cell(replicas=2, keyed=False, scale=2.0, max_batch=1,
                      outcomes=[outcome(1, 0.0, 3.0, 40), outcome(2, 0.5, 4.0, 20)],
                      records=records, latencies={"small": LATENCY, "target": LATENCY},
                      errors=0)
    assert cell.requests == 4
    assert cell.recomputed_per_request == pytest.approx((100 + 1 + 100 + 160) / 4)
    assert cell.recomputed_per_follow_up == pytest.approx((1 + 160) / 2)
    assert cell.cache_share_previous == pytest.approx(100 / 200)
    assert cell.cache_share_previous_min == 0.0
    assert cell.replicas_per_conversation == pytest.approx(1.5)
    assert cell.output_tokens == 60 and cell.wall_seconds == pytest.approx(4.0)
    assert cell.tokens_per_second_unscaled == pytest.approx(60 / 4.0 * 2.0)
    # Ideal: the pool's work over 2 x 1 slots, or the longest conversation if that is longer.
    work = {1: LATENCY.service_seconds(100, 10) + LATENCY.service_seconds(1, 10),
            2: LATENCY.service_seconds(100, 10) + LATENCY.service_seconds(160, 10)}
    assert cell.ideal_seconds == pytest.approx(max(sum(work.values()) / 2, *work.values()))


def test_bad_configurations_fail_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="replicas"):
        ScaleOutConfig(replicas=(0, 2))
    with pytest.raises(ValueError, match="max_batch"):
        ScaleOutConfig(max_batch=0)
    app = typer.Typer()
    register(app)
    answer = CliRunner().invoke(app, ["--replicas", "one"])
    assert answer.exit_code == 2
    assert "replica counts" in answer.output


@pytest.mark.timeout(120)
def test_a_tiny_scale_out_run_through_smg(tmp_path: Path) -> None:
    """Two pools of up to two replicas behind smg, with and without the key: if this fails,
    the bench code path is broken (servers, routers, routed policies, figures or report)."""
    reason = unavailable_reason("smg")
    if reason:
        pytest.skip(reason)
    config = ScaleOutConfig(replicas=(1, 2), levels=(Level(4, 4, rule2=False),), max_batch=2,
                            time_scale=0.02, isolate=False)
    result = run_scale_out(config)
    assert not result.errors, result.errors[0]
    assert {(c.replicas, c.keyed) for c in result.cells} == {(1, True), (1, False),
                                                             (2, True), (2, False)}
    for cell in result.cells:
        assert cell.conversations == 4 and cell.output_tokens > 0
        assert cell.fallbacks == 0
    for cell in (c for c in result.cells if c.keyed):
        assert cell.replicas_per_conversation == 1.0
        assert cell.cache_share_previous_min is not None
        assert cell.cache_share_previous_min >= 0.99
    files = write_scale_report(result, tmp_path)
    assert [f.name for f in files] == ["scale-out.md", "scale-out.json"]
    data = json.loads(files[1].read_text())
    assert len(data["cells"]) == 4 and data["targets"] == scale_headline(result)
    markdown = files[0].read_text()
    assert "| 4 | 2 | without |" in markdown and "## Targets" in markdown
