"""``GET /metrics``: Prometheus text that prometheus-client's own parser reads, with every
metric docs/serve.md lists, counting what the requests did."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specthink.testing import Fault, LoopbackServer
from specthink.testing.server import Flavor

from .conftest import ConversationModel, Pair, Served, client
from .test_chat import HELLO

DOCUMENTED = {
    "specthink_serve_requests", "specthink_serve_requests_in_flight",
    "specthink_serve_time_to_first_token_seconds", "specthink_serve_request_duration_seconds",
    "specthink_serve_tokens", "specthink_serve_prompt_tokens", "specthink_serve_takeovers",
    "specthink_serve_target_share", "specthink_serve_upstream_requests",
    "specthink_serve_upstream_retries", "specthink_serve_upstream_errors",
    "specthink_serve_fallbacks", "specthink_serve_responses_requests",
}


def scrape(served: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    response = httpx.get(f"{served.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    families = list(text_string_to_metric_families(response.text))
    assert DOCUMENTED <= {family.name for family in families}
    for family in families:
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_requests_tokens_takeovers_and_upstream(
        pair: Pair, serve: Callable[..., Served]) -> None:
    """Two answers (one streamed), a 400, a 404 and an upstream failure, counted. Failing: a
    dashboard or alert built on docs/serve.md's names shows nothing or the wrong figure."""
    served = serve(pair)
    pair.reset()
    sdk = client(served)
    whole = sdk.chat.completions.create(model="specthink", messages=HELLO)
    chunks = list(sdk.chat.completions.create(model="specthink", messages=HELLO, stream=True,
                                              stream_options={"include_usage": True}))
    streamed_stats = (chunks[-1].model_extra or {})["specthink"]
    url = f"{served.base_url}/chat/completions"
    assert httpx.post(url, json={"model": "specthink", "messages": []}).status_code == 400
    assert httpx.post(url, json={"model": "x", "messages": HELLO}).status_code == 404
    pair.small.inject(Fault.error_event(error_type="generation", times=5))
    assert httpx.post(url, json={"model": "specthink", "messages": HELLO}).status_code == 502
    # every request sent counts, the failed call's too
    records = {"small": len(pair.small.records), "target": len(pair.target.records)}

    pair.reset()  # the faults left over
    samples = scrape(served)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("specthink_serve_requests_total", status="200") == 2
    assert value("specthink_serve_requests_total", status="400") == 1
    assert value("specthink_serve_requests_total", status="404") == 1
    assert value("specthink_serve_requests_total", status="502") == 1
    assert value("specthink_serve_requests_in_flight") == 0
    assert value("specthink_serve_time_to_first_token_seconds_count") == 1
    assert value("specthink_serve_request_duration_seconds_count") == 3
    stats = [(whole.model_extra or {})["specthink"], streamed_stats]
    for role in ("small", "target"):
        assert value("specthink_serve_tokens_total", model=role) == sum(
            s[f"{role}_tokens"] for s in stats)
        assert value("specthink_serve_upstream_requests_total", server=role,
                     kind="generation") == records[role]
        assert value("specthink_serve_upstream_retries_total", server=role,
                     kind="generation") == 0
    assert value("specthink_serve_takeovers_total", rule="rule1") == sum(
        s["takeovers"]["rule1"] for s in stats)
    assert value("specthink_serve_target_share_count") == 2
    # to_dict() rounds the share to six places
    assert abs(value("specthink_serve_target_share_sum")
               - sum(s["target_share"] for s in stats)) < 1e-5
    assert value("specthink_serve_prompt_tokens_total") == sum(s["input_tokens"] for s in stats)
    assert value("specthink_serve_upstream_errors_total", server="small") == 1
    assert value("specthink_serve_upstream_errors_total", server="target") == 0
    assert value("specthink_serve_fallbacks_total") == 0


def test_health_is_open_and_models_lists_the_model_name(pair: Pair,
                                                        serve: Callable[..., Served]) -> None:
    served = serve(pair, model_name="deep-thinker")
    assert httpx.get(f"{served.url}/health", timeout=10).json() == {"status": "ok"}
    sdk = client(served)
    assert [m.id for m in sdk.models.list()] == ["deep-thinker"]
    assert sdk.models.retrieve("deep-thinker").owned_by == "specthink"
    assert sdk.chat.completions.create(model="deep-thinker", messages=HELLO).model == \
        "deep-thinker"


def test_every_upstream_attempt_and_retry_is_counted_even_when_the_call_fails(
        pair: Pair, serve: Callable[..., Served]) -> None:
    """The small server answers 503 to every attempt: the call is a 503, and /metrics counts
    each attempt and each retry it made. Failing: retries of failed calls are missing, so an
    outage looks like no traffic at all on the upstream dashboards."""
    served = serve(pair)
    pair.reset()
    pair.small.inject(Fault.status(503, times=100))
    url = f"{served.base_url}/chat/completions"
    assert httpx.post(url, json={"model": "specthink", "messages": HELLO},
                      timeout=60).status_code == 503
    attempts = len(pair.small.records)
    pair.reset()
    samples = scrape(served)
    assert attempts >= 2  # the retry policy tried again
    generation = (("kind", "generation"), ("server", "small"))
    assert samples[("specthink_serve_upstream_requests_total", generation)] == attempts
    assert samples[("specthink_serve_upstream_retries_total", generation)] == attempts - 1
    assert samples[("specthink_serve_requests_total", (("status", "503"),))] == 1


@pytest.mark.parametrize(("backend", "flavor", "faulty"), [
    ("tgi", "tgi", ("/info", "/tokenize")),
    ("openai", "vllm", ("/v1/models", "/tokenize")),
])
def test_auxiliary_requests_and_their_retries_are_counted(
        serve: Callable[..., Served], backend: str, flavor: Flavor,
        faulty: tuple[str, str]) -> None:
    """The small server answers 503 once to what serve asks at start (TGI ``/info``, vLLM
    ``/v1/models``) and once to a ``/tokenize`` (a reply budget near the context makes the
    call count its prompt's tokens): both are retried, and /metrics counts, per server and
    kind, exactly the requests each server received, the failed attempts and their retries
    included. Failing: requests besides the generation streams (and their retries) go
    uncounted, so an outage of a tokenizer or /info looks like no traffic at all."""
    def server(model_id: str) -> LoopbackServer:  # a context within serve's max_tokens
        return LoopbackServer(ConversationModel(), model_id=model_id, flavor=flavor,
                              max_input_tokens=2048, max_total_tokens=4096)

    with server("test/small") as small, server("test/target") as target:
        pair = Pair(small, target)
        small.inject(*(Fault.status(503, retry_after=0, path=path) for path in faulty))
        # auto: the vLLM server renders the template (/tokenize, /detokenize) at start too
        served = serve(pair, backend=backend, small_template="auto", target_template="auto")
        answer = httpx.post(f"{served.base_url}/chat/completions", timeout=60, json={
            "model": "specthink", "messages": HELLO, "max_tokens": small.max_total_tokens - 8})
        assert answer.status_code == 200, answer.text
        samples = scrape(served)
        calls = {"small": small.calls, "target": target.calls}
    for path in faulty:  # each failed once, then was answered
        assert [call.status for call in small.calls_to(path)][:2] == [503, 200]
    for role, received in calls.items():
        for kind, generation in (("generation", True), ("auxiliary", False)):
            labels = (("kind", kind), ("server", role))
            sent = [call for call in received if call.generation is generation]
            assert samples[("specthink_serve_upstream_requests_total", labels)] == len(sent), \
                (role, kind, [call.path for call in sent])
    retries = {role: samples[("specthink_serve_upstream_retries_total",
                              (("kind", "auxiliary"), ("server", role)))]
               for role in ("small", "target")}
    assert retries == {"small": 2, "target": 0}
