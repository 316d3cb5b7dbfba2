"""``specthink serve`` as a process: the command line, SIGTERM's drain, ``--workers`` with
metrics summed across workers, the open-server warning and keys kept out of the logs.

Each test starts the command as a child process on 127.0.0.1 and stops it by its pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specthink.testing import LatencyModel

from .conftest import Pair, conversation_pair

ROOT = Path(__file__).resolve().parents[2]
EXITED = (0, -signal.SIGTERM)
"""uvicorn re-raises the SIGTERM it handled once it has shut down, as a process should."""
HELLO = {"model": "specthink", "messages": [{"role": "user", "content": "hello there"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServeProcess:
    """``specthink serve`` in a child process; output collected for the assertions."""

    def __init__(self, pair: Pair, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-c", "from specthink.cli import main; main()", "serve",
                   "--small", pair.small.url, "--target", pair.target.url,
                   "--port", str(self.port), "--small-template", "chatml",
                   "--target-template", "chatml", *args]
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        for name in ("SPECTHINK_SERVE_API_KEYS", "PROMETHEUS_MULTIPROC_DIR"):
            if env is None or name not in env:
                environment.pop(name, None)
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.output = ""

    def wait_ready(self, timeout: float = 60) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited: {self.stop()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve did not become healthy: {self.stop()}")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30) -> str:
        """Stop the child (SIGTERM, then SIGKILL) and return its output."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate(timeout=10)
        self.output += out or ""
        return self.output


@pytest.fixture
def slow_pair() -> Iterator[Pair]:
    with conversation_pair(LatencyModel(per_token=0.03)) as servers:
        yield servers


@pytest.mark.timeout(120)
def test_sigterm_stops_accepting_and_lets_the_stream_in_flight_finish(slow_pair: Pair) -> None:
    """SIGTERM while a stream runs: new connections are refused, the stream ends with its whole
    answer and [DONE], and the process exits 0. Failing: a rolling update cuts answers."""
    served = ServeProcess(slow_pair, "--drain-timeout", "30").wait_ready()
    lines: list[str] = []
    try:
        with httpx.stream("POST", f"{served.url}/v1/chat/completions",
                          json={**HELLO, "stream": True}, timeout=30) as response:
            iterator = response.iter_lines()
            lines.append(next(iterator))
            served.terminate()
            refused = threading.Event()

            def probe() -> None:
                for _ in range(100):
                    try:
                        httpx.get(f"{served.url}/health", timeout=1)
                    except (httpx.ConnectError, httpx.RemoteProtocolError):
                        # Refused, or accepted in the instant before the listener closed and
                        # then closed unanswered: either way a new client is not served.
                        refused.set()
                        return
                    except httpx.TransportError:
                        pass  # a busy machine's timeout says nothing yet; ask again
                    time.sleep(0.05)

            prober = threading.Thread(target=probe)
            prober.start()
            lines.extend(iterator)
            prober.join(timeout=10)
        assert served.process.wait(timeout=30) in EXITED
    finally:
        output = served.stop()
    assert refused.is_set(), "new connections were still accepted while draining"
    data = [line.removeprefix("data: ") for line in lines if line]
    assert data[-1] == "[DONE]"
    content = "".join(orjson.loads(d)["choices"][0]["delta"].get("content") or ""
                      for d in data[:-1])
    assert content == "You said: hello there", output


@pytest.mark.timeout(120)
def test_drain_timeout_cuts_a_stream_that_takes_too_long_and_closes_upstream(
        slow_pair: Pair) -> None:
    """Past --drain-timeout the stream in flight is cancelled, so the model server's stream
    closes too, and the process still exits."""
    served = ServeProcess(slow_pair, "--drain-timeout", "0.3").wait_ready()
    try:
        with httpx.stream("POST", f"{served.url}/v1/chat/completions",
                          json={**HELLO, "stream": True}, timeout=30) as response:
            iterator = response.iter_lines()
            next(iterator)
            served.terminate()
            with pytest.raises(httpx.HTTPError):
                list(iterator)
        assert served.process.wait(timeout=30) in EXITED
    finally:
        served.stop()
    records = [*slow_pair.small.records, *slow_pair.target.records]
    assert any(r.disconnected for r in records)
    assert all(r.disconnected or r.finished is not None for r in records)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_requests(client: httpx.Client, url: str) -> float:
    values = samples(client.get(f"{url}/metrics", headers={"Connection": "close"}).text)
    return values.get(("specthink_serve_requests_total", (("status", "200"),)), 0.0)


@pytest.mark.timeout(180)
def test_two_workers_serve_and_metrics_sum_over_both(pair_for_process: Pair) -> None:
    """--workers 2: both worker processes answer, and /metrics (from whichever worker) counts
    every worker's requests (prometheus-client's multiprocess mode). Failing: a scrape sees
    only the worker that answered it."""
    served = ServeProcess(pair_for_process, "--workers", "2").wait_ready()
    try:
        with httpx.Client(timeout=30) as client:
            statuses = []
            for _ in range(12):
                # A fresh connection each time, so the kernel spreads them over the workers.
                response = client.post(f"{served.url}/v1/chat/completions", json=HELLO,
                                       headers={"Connection": "close"})
                statuses.append(response.status_code)
            assert statuses == [200] * 12
            # A request is counted once its response is over, just after its last byte left:
            # wait (bounded) until the worker that served the twelfth has counted it.
            for _ in range(100):
                if scrape_requests(client, served.url) == 12:
                    break
                time.sleep(0.05)
            scraped = [samples(client.get(f"{served.url}/metrics",
                                          headers={"Connection": "close"}).text)
                       for _ in range(4)]
    finally:
        output = served.stop()
    for values in scraped:
        assert values[("specthink_serve_requests_total", (("status", "200"),))] == 12
        assert values[("specthink_serve_upstream_requests_total", (("server", "small"),))] == \
            len(pair_for_process.small.records)
    assert output.count("Started server process") == 2, output


@pytest.fixture
def pair_for_process() -> Iterator[Pair]:
    with conversation_pair() as servers:
        yield servers


SECRET = "sk-serve-4b1d6e0f9a"


@pytest.mark.timeout(120)
def test_keys_from_the_environment_are_enforced_and_never_logged(
        pair_for_process: Pair) -> None:
    """SPECTHINK_SERVE_API_KEYS (comma-separated) sets the client keys; the process never
    prints a key, not even a wrong one a client sent."""
    served = ServeProcess(pair_for_process, env={
        "SPECTHINK_SERVE_API_KEYS": f"other-key, {SECRET}"}).wait_ready()
    try:
        url = f"{served.url}/v1/chat/completions"
        assert httpx.post(url, json=HELLO, timeout=30).status_code == 401
        assert httpx.post(url, json=HELLO, headers={"Authorization": f"Bearer {SECRET}x"},
                          timeout=30).status_code == 401
        assert httpx.post(url, json=HELLO, headers={"Authorization": f"Bearer {SECRET}"},
                          timeout=30).status_code == 200
    finally:
        output = served.stop()
    assert SECRET not in output and "no API key set" not in output
    assert "POST /v1/chat/completions" in output  # the access log is on, without headers


@pytest.mark.timeout(120)
def test_an_open_server_says_so_at_start(pair_for_process: Pair) -> None:
    served = ServeProcess(pair_for_process).wait_ready()
    output = served.stop()
    assert "no API key set" in output and "every client is served" in output
    assert f"http://127.0.0.1:{served.port}/v1" in output


@pytest.mark.timeout(120)
def test_the_server_runs_on_uvloop_and_httptools(pair_for_process: Pair) -> None:
    """The server extra's event loop and HTTP parser are the ones serving (broken: the
    pure-Python loop and parser, several times the time to first token under a burst)."""
    served = ServeProcess(pair_for_process).wait_ready()
    output = served.stop()
    assert "uvloop, httptools)" in " ".join(output.split())  # the console wraps lines


def test_without_uvloop_and_httptools_the_server_uses_asyncio_and_h11(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from specthink.serve import cli

    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert cli.event_loop_and_parser() == {"loop": "asyncio", "http": "h11"}


def test_bad_options_are_refused_before_serving(pair_for_process: Pair) -> None:
    """A rules preset that does not exist is a usage error; nothing starts."""
    result = subprocess.run(
        [sys.executable, "-c", "from specthink.cli import main; main()", "serve", "--small",
         pair_for_process.small.url, "--target", pair_for_process.target.url,
         "--rules", "fastest", "--port", str(free_port())],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 2 and "fastest" in result.stderr


def test_without_the_server_extra_serve_prints_the_install_hint() -> None:
    """The command is listed with only typer installed; running it without starlette says
    which extra to install instead of a traceback."""
    code = ("import sys; sys.modules['starlette'] = None\n"
            "from specthink.cli import main\n"
            "sys.argv = ['specthink', 'serve', '--small', 'http://a', '--target', 'http://b']\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60, check=False)
    assert done.returncode == 1
    assert "pip install 'specthink[server]'" in done.stderr
