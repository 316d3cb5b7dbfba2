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

from specthink._constants import ROLES
from specthink.backends.base import RequestKind
from specthink.trace import Statistics

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics", "multiprocess_dir"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
_SHARE_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
KINDS: tuple[RequestKind, ...] = ("generation", "auxiliary")
"""The ``kind`` label of the upstream counters (``RequestKind``): two values, never a path."""
_PREFIX = "specthink_serve_"
"""Every metric's name begins so (``docs/serve.md`` lists them)."""


def multiprocess_dir() -> str | None:
    """The multiprocess directory, when prometheus-client writes values to files."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServeMetrics:
    """The server's metrics, in a registry of their own (one per app, so tests can run several
    apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        counter, histogram = self._counter, self._histogram
        self.requests = counter(
            "requests", "Chat completion and Responses API requests answered, by HTTP status.",
            "status")
        self.responses = counter(
            "responses_requests",
            "Responses API requests answered, by HTTP status (requests counts them too).",
            "status")
        self.in_flight = Gauge(
            f"{_PREFIX}requests_in_flight", "Chat completion requests being answered.",
            registry=self.registry, multiprocess_mode="livesum")
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Seconds from a streamed request's arrival to its first reasoning or answer text.",
            _LATENCY_BUCKETS)
        self.duration = histogram(
            "request_duration_seconds",
            "Seconds from a chat request's arrival to the end of its answer.", _LATENCY_BUCKETS)
        self.tokens = counter("tokens", "Accepted output tokens, by who wrote them.", "model")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of answered requests.")
        self.takeovers = counter("takeovers", "Takeovers by the target model, by rule.", "rule")
        self.target_share = histogram(
            "target_share", "Share of a request's output tokens the target model wrote.",
            _SHARE_BUCKETS)
        self.upstream_requests = counter(
            "upstream_requests",
            "Requests sent to the model servers, retries included, by server and kind "
            "(generation streams; auxiliary: /info, tokenizers, chat templates).",
            "server", "kind")
        self.upstream_retries = counter(
            "upstream_retries",
            "Requests to the model servers repeated after an overload or outage, by server "
            "and kind.", "server", "kind")
        self.upstream_errors = counter(
            "upstream_errors",
            "Failures of a model server that reached a request (the target's include those "
            "the small model finished alone after).", "server")
        self.fallbacks = counter(
            "fallbacks", "Requests the small model finished alone because the target failed.")
        for role in ROLES:  # present at zero from the start, so rates work at once
            self.upstream_errors.labels(role)
            for kind in KINDS:
                self.upstream_retries.labels(role, kind)
                self.upstream_requests.labels(role, kind)

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(_PREFIX + name, documentation, labels, registry=self.registry)

    def _histogram(self, name: str, documentation: str,
                   buckets: tuple[float, ...]) -> Histogram:
        return Histogram(_PREFIX + name, documentation, buckets=buckets, registry=self.registry)

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
        if stats.fallback:
            self.fallbacks.inc()
            self.upstream_errors.labels("target").inc()

    def upstream_attempt(self, role: str, attempt: int, kind: RequestKind) -> None:
        """One upstream request sent (``attempt`` > 1: a retry), a generation stream or an
        auxiliary request, counted as it goes out, so calls that fail or are cancelled
        afterwards count too (the engine's ``on_request``, the one way requests are
        counted)."""
        self.upstream_requests.labels(role, kind).inc()
        if attempt > 1:
            self.upstream_retries.labels(role, kind).inc()

    def upstream_failed(self, role: str | None) -> None:
        self.upstream_errors.labels(role or "unknown").inc()

    def exposition(self) -> bytes:
        """The Prometheus text format: this process's values, or every worker's."""
        if multiprocess_dir() is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
