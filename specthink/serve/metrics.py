"""Prometheus metrics of ``specthink serve`` (``GET /metrics``).

Every name is documented in ``docs/serve.md``. With ``--workers`` above one the CLI points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start, each worker writes
its values there, and ``/metrics`` sums them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as multiprocess

from specthink.trace import Statistics

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics", "multiprocess_dir"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
_SHARE_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
ROLES = ("small", "target")


def multiprocess_dir() -> str | None:
    """The multiprocess directory, when prometheus-client writes values to files."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServeMetrics:
    """The server's metrics, in a registry of their own (one per app, so tests can run several
    apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "specthink_serve_requests", "Chat completion requests answered, by HTTP status.",
            ["status"], registry=r)
        self.in_flight = Gauge(
            "specthink_serve_requests_in_flight", "Chat completion requests being answered.",
            registry=r, multiprocess_mode="livesum")
        self.time_to_first_token = Histogram(
            "specthink_serve_time_to_first_token_seconds",
            "Seconds from a streamed request's arrival to its first reasoning or answer text.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram(
            "specthink_serve_request_duration_seconds",
            "Seconds from a chat request's arrival to the end of its answer.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(
            "specthink_serve_tokens", "Accepted output tokens, by who wrote them.",
            ["model"], registry=r)
        self.prompt_tokens = Counter(
            "specthink_serve_prompt_tokens", "Prompt tokens of answered requests.", registry=r)
        self.takeovers = Counter(
            "specthink_serve_takeovers", "Takeovers by the target model, by rule.",
            ["rule"], registry=r)
        self.target_share = Histogram(
            "specthink_serve_target_share",
            "Share of a request's output tokens the target model wrote.",
            buckets=_SHARE_BUCKETS, registry=r)
        self.upstream_requests = Counter(
            "specthink_serve_upstream_requests", "Generation requests sent, by model server.",
            ["server"], registry=r)
        self.upstream_retries = Counter(
            "specthink_serve_upstream_retries",
            "Generation requests repeated after an overload, outage or dropped stream.",
            ["server"], registry=r)
        self.upstream_errors = Counter(
            "specthink_serve_upstream_errors",
            "Failures of a model server that reached a request (the target's include those "
            "the small model finished alone after).", ["server"], registry=r)
        self.fallbacks = Counter(
            "specthink_serve_fallbacks",
            "Requests the small model finished alone because the target failed.", registry=r)
        for role in ROLES:  # present at zero from the start, so rates work at once
            self.upstream_errors.labels(role)
            self.upstream_retries.labels(role)
            self.upstream_requests.labels(role)

    def observe_statistics(self, stats: Statistics) -> None:
        """One finished request's engine statistics."""
        self.tokens.labels("small").inc(stats.small_tokens)
        self.tokens.labels("target").inc(stats.target_tokens)
        self.tokens.labels("intervention").inc(stats.intervention_tokens)
        self.prompt_tokens.inc(stats.input_tokens)
        for rule, count in stats.takeovers.items():
            if count:
                self.takeovers.labels(rule).inc(count)
        if stats.output_tokens:
            self.target_share.observe(stats.target_share)
        for role in ROLES:
            self.upstream_requests.labels(role).inc(stats.requests.get(role, 0))
            self.upstream_retries.labels(role).inc(stats.retries.get(role, 0))
        if stats.fallback:
            self.fallbacks.inc()
            self.upstream_errors.labels("target").inc()

    def upstream_failed(self, role: str | None) -> None:
        self.upstream_errors.labels(role or "unknown").inc()

    def exposition(self) -> bytes:
        """The Prometheus text format: this process's values, or every worker's."""
        if multiprocess_dir() is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
