"""specthink.testing.routers: the command lines, bad input, and a real start and stop of each
router (by its own pid), including a router that cannot become ready."""

from __future__ import annotations

import os

import httpx
import pytest

from specthink.testing import LoopbackServer, ScriptedModel
from specthink.testing.routers import (
    ROUTER_KINDS,
    Router,
    RouterError,
    free_port,
    router_command,
    unavailable_reason,
)

URLS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]


def _value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_every_listener_binds_loopback_only(kind: str) -> None:
    """smg binds every interface unless told: if this fails, a test router listens beyond
    127.0.0.1."""
    command = router_command(kind, URLS, port=1234, prometheus_port=1235)  # type: ignore[arg-type]
    assert _value(command, "--host") == "127.0.0.1"
    assert _value(command, "--prometheus-host") == "127.0.0.1"
    assert (_value(command, "--port"), _value(command, "--prometheus-port")) == ("1234", "1235")
    at = command.index("--worker-urls")
    assert command[at + 1:at + 3] == URLS


def test_smg_is_sticky_on_the_session_header_unless_told_not_to() -> None:
    """If this fails, smg routes by load alone and conversations leave their warm replica."""
    command = router_command("smg", URLS, port=1, prometheus_port=2)
    assert _value(command, "--policy") == "cache_aware"
    assert "--sticky-sessions" in command
    assert _value(command, "--routing-key-headers") == "x-session-id"
    assert _value(command, "--assignment-mode") == "min_load"
    loose = router_command("smg", URLS, port=1, prometheus_port=2, routing_key_headers=())
    assert "--sticky-sessions" not in loose and "--routing-key-headers" not in loose
    assert "--assignment-mode" not in loose


def test_vllm_router_hashes_the_session_and_opens_a_dead_replicas_circuit() -> None:
    """If this fails, vllm-router no longer keeps a session on one replica, or answers 500 for
    a dead replica instead of retrying another."""
    command = router_command("vllm-router", URLS, port=1, prometheus_port=2,
                             health_check_interval=2)
    assert _value(command, "--policy") == "consistent_hash"
    assert int(_value(command, "--cb-failure-threshold")) < 5  # its retries: 5 attempts
    assert _value(command, "--health-check-interval-secs") == "2"


def test_bad_input_fails_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        Router("smg", [])
    with pytest.raises(ValueError, match="unknown router"):
        Router("nginx", URLS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="> 0 seconds"):
        Router("smg", URLS, startup_timeout=0)
    with pytest.raises(RuntimeError, match="not running"):
        _ = Router("smg", URLS).url


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; /proc tells it apart.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_a_router_starts_proxies_and_stops_by_its_pid(kind: str) -> None:
    """If this fails, the router does not come up within its bound, does not reach the
    replica, or outlives ``stop()``."""
    reason = unavailable_reason(kind)  # type: ignore[arg-type]
    if reason:
        pytest.skip(reason)
    with LoopbackServer(ScriptedModel.single("Hi."), model_id="m") as replica:
        router = Router(kind, [replica.url], startup_timeout=30)  # type: ignore[arg-type]
        with router:
            pid = router.pid
            assert pid is not None
            answer = httpx.post(f"{router.url}/v1/completions", timeout=10, json={
                "model": "m", "prompt": "Assistant:", "max_tokens": 4})
            assert answer.status_code == 200, answer.text
            assert replica.records and replica.records[0].path == "/v1/completions"
            assert router.workers(), "the router lists no replica"
        assert not _alive(pid)
        assert router.pid is None


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_a_router_that_never_becomes_ready_is_stopped_with_its_log(kind: str) -> None:
    """A replica that is not there: the start gives up within its bound, with the router's
    log in the error, and leaves no process behind."""
    reason = unavailable_reason(kind)  # type: ignore[arg-type]
    if reason:
        pytest.skip(reason)
    nowhere = f"http://127.0.0.1:{free_port()}"
    router = Router(kind, [nowhere], startup_timeout=2,  # type: ignore[arg-type]
                    extra_args=["--worker-startup-timeout-secs", "1"])
    with pytest.raises(RouterError, match=r"healthy workers within 2 s|exited") as info:
        router.start()
    assert "log (tail)" in str(info.value)
    assert router.pid is None
