"""From what the client saw (outcomes) and what the servers saw (records) to the figures of a
cell. Pure functions: no I/O, no clocks.

Definitions (the methodology page repeats them):

- *ideal* time of a conversation: the sum of its requests' ``service_seconds``, the time the
  latency model charged (a conversation's requests run one after another). A cell's ideal time
  is its slowest conversation's: the servers model no contention between conversations.
- *wall/ideal*: the cell's wall time (first start to last end) over its ideal time. What is
  left over splits into *server overhead* (time inside the servers' requests beyond what the
  latency model charged: the loopback server's own Python, timer lateness) and *client
  overhead* (time when none of the conversation's requests was inside a server: the client,
  HTTP, the loopback network).
- *handoff*: control passing to the target (rule 1 or rule 3); rule 2 only lengthens a rule-1
  takeover. *Requests per handoff*: generation requests beyond each conversation's first,
  divided by handoffs.
- *discarded small tokens*: tokens the small server generated that never became accepted text
  (probes thrown away, tokens in flight when a stream was closed).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from benchmarks.policies import Outcome
from benchmarks.servers import RecordSummary
from specthink.testing.server import LatencyModel

__all__ = ["CellMetrics", "Rates", "busy_seconds", "cell_metrics"]


class Rates:
    """The rates of a cell that has ``output_tokens``, ``wall_seconds``, ``ideal_seconds`` and
    a time ``scale`` (mixed into the benchmark's and the scale-out's cell figures)."""

    __slots__ = ()
    output_tokens: int
    wall_seconds: float
    ideal_seconds: float
    scale: float

    @property
    def wall_over_ideal(self) -> float:
        return self.wall_seconds / self.ideal_seconds if self.ideal_seconds else float("nan")

    @property
    def tokens_per_second(self) -> float:
        """Aggregate accepted tokens per second, as measured."""
        return self.output_tokens / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def tokens_per_second_unscaled(self) -> float:
        """The same at the GPU profiles' own speed (``scale = 1``; as measured at scale 0)."""
        return self.tokens_per_second * (self.scale or 1.0)


@dataclass(frozen=True, slots=True)
class CellMetrics(Rates):
    """The figures of one policy at one concurrency."""

    policy: str
    layout: str
    conversations: int
    scale: float
    """Factor applied to every latency of the GPU profiles in this cell."""
    errors: int
    output_tokens: int
    small_tokens: int
    target_tokens: int
    wall_seconds: float
    ideal_seconds: float
    mean_conversation_ratio: float
    """Mean over conversations of their own wall/ideal."""
    client_overhead: float
    """Mean over conversations of client-side time / ideal."""
    server_overhead: float
    """Mean over conversations of loopback-server time beyond the latency model / ideal."""
    requests: int
    retries: int
    """Requests sent again after a transient failure (they count in ``requests``)."""
    fallbacks: int
    """Conversations whose target failed, so that the small model finished alone."""
    handoffs: int
    rule2: int
    non_extending_requests: int
    """Requests whose prompt is not a strict extension of the previous one to that server."""
    cache_share_all: float | None
    """Prompt tokens served from the prefix cache / all prompt tokens."""
    cache_share_previous: float | None
    """Of the previous request's prompt (to the same server, same conversation): the share
    served from the cache, summed over requests."""
    cache_share_previous_min: float | None
    discarded_server: int
    discarded_client: int
    ttft_seconds: float | None
    """Mean time to the caller's first text."""
    ttft_ideal_seconds: float | None
    """Mean time the latency model needs for the first token of the first request."""
    first_request_delay_seconds: float | None
    """Mean time from the caller's call to the first generation request reaching a server
    (rendering the prompt, any preliminary requests, connecting)."""
    cpu_seconds: float
    rss_peak_kb: int
    """Peak resident memory of the client process."""
    rss_growth_kb: int
    """How much the client's resident memory grew while the conversations ran."""

    @property
    def requests_per_handoff(self) -> float | None:
        if not self.handoffs:
            return None
        return (self.requests - self.conversations) / self.handoffs

    @property
    def discarded_per_handoff(self) -> float | None:
        return self.discarded_server / self.handoffs if self.handoffs else None

    @property
    def target_share(self) -> float:
        return self.target_tokens / self.output_tokens if self.output_tokens else 0.0

    @property
    def wall_seconds_unscaled(self) -> float:
        return self.wall_seconds / (self.scale or 1.0)

    @property
    def ideal_seconds_unscaled(self) -> float:
        return self.ideal_seconds / (self.scale or 1.0)

    @property
    def cpu_us_per_token(self) -> float:
        return self.cpu_seconds / self.output_tokens * 1e6 if self.output_tokens else 0.0

    @property
    def cores_at_scale_1(self) -> float:
        """Client CPU seconds per second of ideal time at the profiles' own speed: the cores
        the client would need to drive these conversations against real GPUs."""
        ideal = self.ideal_seconds_unscaled
        return self.cpu_seconds / ideal if ideal else float("nan")

    @property
    def rss_kb_per_conversation(self) -> float:
        return self.rss_growth_kb / self.conversations if self.conversations else 0.0


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total = 0.0
    current_start: float | None = None
    current_end = 0.0
    for start, end in sorted(intervals):
        if current_start is None or start > current_end:
            if current_start is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_start is not None:
        total += current_end - current_start
    return total


def _first_token_seconds(record: RecordSummary, latency: LatencyModel) -> float:
    uncached = record.prompt_tokens - record.cached_prompt_tokens
    return latency.prefill_seconds(uncached) + latency.per_token


def cell_metrics(*, policy: str, layout: str, scale: float, outcomes: Sequence[Outcome],
                 records: Sequence[RecordSummary], latencies: dict[str, LatencyModel],
                 errors: int, cpu_seconds: float, rss_peak_kb: int,
                 rss_growth_kb: int) -> CellMetrics:
    """The figures of a cell; ``records`` of conversations not in ``outcomes`` (warm-up) are
    ignored."""
    conversations = {o.conversation for o in outcomes}
    records = [r for r in records if r.conversation in conversations]
    per_conversation: dict[int, list[RecordSummary]] = {c: [] for c in conversations}
    for record in records:
        per_conversation[record.conversation].append(record)

    ratios, client, server = [], [], []
    ideal_max = 0.0
    ttft, ttft_ideal, delays = [], [], []
    for outcome in outcomes:
        own = per_conversation[outcome.conversation]
        ideal = sum(r.service_seconds for r in own)
        ideal_max = max(ideal_max, ideal)
        wall = outcome.finished - outcome.started
        busy = busy_seconds((r.started, r.finished if r.finished is not None
                             else r.started + r.service_seconds) for r in own)
        if ideal > 0:
            ratios.append(wall / ideal)
            client.append((wall - busy) / ideal)
            server.append((busy - ideal) / ideal)
        first = min(own, key=lambda r: r.started, default=None)
        if first is not None:
            delays.append(first.started - outcome.started)
        if outcome.first_text is not None:
            ttft.append(outcome.first_text - outcome.started)
            if first is not None:
                ttft_ideal.append(_first_token_seconds(first, latencies[first.role]))

    small_accepted = sum(o.small_tokens for o in outcomes)
    small_generated = sum(r.generated_text_tokens for r in records if r.role == "small")
    cached = sum(r.cached_prompt_tokens for r in records)
    prompt = sum(r.prompt_tokens for r in records)
    with_previous = [r for r in records if r.previous_prompt_tokens]
    previous_total = sum(r.previous_prompt_tokens or 0 for r in with_previous)
    previous_cached = sum(min(r.cached_prompt_tokens, r.previous_prompt_tokens or 0)
                          for r in with_previous)
    previous_min = min((min(r.cached_prompt_tokens, r.previous_prompt_tokens or 0)
                        / (r.previous_prompt_tokens or 1) for r in with_previous), default=None)
    wall = (max(o.finished for o in outcomes) - min(o.started for o in outcomes)
            if outcomes else 0.0)
    return CellMetrics(
        policy=policy, layout=layout, conversations=len(outcomes), scale=scale, errors=errors,
        output_tokens=sum(o.output_tokens for o in outcomes), small_tokens=small_accepted,
        target_tokens=sum(o.target_tokens for o in outcomes), wall_seconds=wall,
        ideal_seconds=ideal_max,
        mean_conversation_ratio=statistics.fmean(ratios) if ratios else float("nan"),
        client_overhead=statistics.fmean(client) if client else float("nan"),
        server_overhead=statistics.fmean(server) if server else float("nan"),
        requests=len(records), retries=sum(o.retries for o in outcomes),
        fallbacks=sum(o.fallback for o in outcomes), handoffs=sum(o.handoffs for o in outcomes),
        rule2=sum(o.takeovers.get("rule2", 0) for o in outcomes),
        non_extending_requests=sum(1 for r in with_previous if not r.extends_previous),
        cache_share_all=cached / prompt if prompt else None,
        cache_share_previous=previous_cached / previous_total if previous_total else None,
        cache_share_previous_min=previous_min,
        discarded_server=max(0, small_generated - small_accepted),
        discarded_client=sum(o.discarded_tokens for o in outcomes),
        ttft_seconds=statistics.fmean(ttft) if ttft else None,
        ttft_ideal_seconds=statistics.fmean(ttft_ideal) if ttft_ideal else None,
        first_request_delay_seconds=statistics.fmean(delays) if delays else None,
        cpu_seconds=cpu_seconds, rss_peak_kb=rss_peak_kb, rss_growth_kb=rss_growth_kb)
