"""Real model-server routers as child processes on loopback, in front of a pool of replicas.

Two routers are supported, both installed from PyPI by the ``dev`` extra:

- ``smg`` (SGLang Model Gateway, ``python -m smg launch``): ``--policy cache_aware
  --sticky-sessions --routing-key-headers x-session-id --assignment-mode min_load`` keeps every
  request carrying one ``X-Session-ID`` on one replica; it proxies OpenAI
  ``/v1/completions`` but answers TGI's ``/generate_stream`` with 404. It binds every
  interface unless told otherwise, so both its listeners are given ``127.0.0.1``.
- ``vllm-router``: ``--policy consistent_hash`` hashes ``X-Session-ID`` (falling back to the
  request body) onto a replica; it proxies ``/v1/completions`` and TGI's ``/generate_stream``.

Example::

    replicas = [LoopbackServer(model).start() for _ in range(3)]
    with Router("smg", [r.url for r in replicas]) as router:
        backend = OpenAICompletionsBackend(router.url)
        ...

A router is started with fresh free ports each time (``smg`` holds its ports for a few seconds
after it stops), waits until it reports every replica healthy (bounded by ``startup_timeout``)
and is stopped by its own process handle: terminate, wait, kill.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import httpx

__all__ = ["ROUTER_KINDS", "Router", "RouterError", "RouterKind", "free_port",
           "router_command", "unavailable_reason"]

RouterKind = Literal["smg", "vllm-router"]
ROUTER_KINDS: tuple[RouterKind, ...] = get_args(RouterKind)

_MODULES: dict[RouterKind, str] = {"smg": "smg", "vllm-router": "vllm_router"}
_DEFAULT_POLICY: dict[RouterKind, str] = {"smg": "cache_aware", "vllm-router": "consistent_hash"}


class RouterError(RuntimeError):
    """The router did not start, or did not become ready in time (its log tail included)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def unavailable_reason(kind: RouterKind) -> str | None:
    """Why ``kind`` cannot run here (not installed), or ``None`` when it can."""
    if kind not in ROUTER_KINDS:
        raise ValueError(f"unknown router {kind!r}; choose from {', '.join(ROUTER_KINDS)}")
    module = _MODULES[kind]
    if importlib.util.find_spec(module) is None:
        return (f"{kind} is not installed (pip install '{kind}'; the project's dev extra "
                f"names it)")
    return None


def _executable(kind: RouterKind) -> list[str]:
    if kind == "smg":
        return [sys.executable, "-m", "smg", "launch"]
    # vllm-router's console script sits beside this interpreter; its module has no __main__.
    script = Path(sys.executable).with_name("vllm-router")
    found = str(script) if script.exists() else shutil.which("vllm-router")
    if found is None:
        raise RouterError("the vllm-router command is not on PATH nor beside this Python")
    return [found]


def router_command(kind: RouterKind, worker_urls: Sequence[str], *, port: int,
                   prometheus_port: int, policy: str | None = None,
                   routing_key_headers: Sequence[str] = ("x-session-id",),
                   health_check_interval: int | None = None,
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The command line that starts ``kind`` on 127.0.0.1 in front of ``worker_urls``.

    ``policy`` defaults to ``cache_aware`` with sticky sessions on the ``routing_key_headers``
    for ``smg`` and to ``consistent_hash`` for ``vllm-router`` (which reads ``X-Session-ID``
    itself and takes no header option). ``routing_key_headers=()`` turns ``smg``'s sticky
    sessions off. ``health_check_interval`` (seconds) makes the router probe its replicas'
    ``/health`` that often (both default to 60 s).
    """
    if not worker_urls:
        raise ValueError("a router needs at least one worker URL")
    if kind not in ROUTER_KINDS:
        raise ValueError(f"unknown router {kind!r}; choose from {', '.join(ROUTER_KINDS)}")
    command = [*_executable(kind), "--host", "127.0.0.1", "--port", str(port),
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus_port),
               "--worker-urls", *worker_urls, "--policy", policy or _DEFAULT_POLICY[kind]]
    if kind == "smg":
        if routing_key_headers:
            # A new key goes to the replica with the fewest requests in flight: smg's default
            # asks cache_aware, which piles conversations sharing an instruction prefix onto
            # one replica.
            command += ["--sticky-sessions", "--routing-key-headers", *routing_key_headers,
                        "--assignment-mode", "min_load"]
        # In-flight requests are the test's own; a long drain only delays the next test.
        command += ["--shutdown-grace-period-secs", "1"]
    else:
        # One failed request opens a replica's circuit, so the router's next retry goes to
        # another replica instead of answering 500 (it retries 5 times; the default threshold
        # of 10 failures lets the first two calls to a dead replica fail).
        command += ["--cb-failure-threshold", "3"]
    if health_check_interval is not None:
        command += ["--health-check-interval-secs", str(health_check_interval),
                    "--health-failure-threshold", "1"]
    return [*command, *extra_args]


class Router:
    """A router (``"smg"`` or ``"vllm-router"``) in a child process on 127.0.0.1.

    Use it as a context manager or call :meth:`start` and :meth:`stop`. ``url`` is known once
    started; ``log`` holds what the router printed (for failure messages). Options as
    :func:`router_command`; ``startup_timeout`` bounds the wait for every replica to be
    reported healthy, ``stop_timeout`` the wait after SIGTERM before SIGKILL.
    """

    def __init__(self, kind: RouterKind, worker_urls: Sequence[str], *,
                 policy: str | None = None,
                 routing_key_headers: Sequence[str] = ("x-session-id",),
                 health_check_interval: int | None = None, extra_args: Sequence[str] = (),
                 startup_timeout: float = 30.0, stop_timeout: float = 10.0) -> None:
        if kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router {kind!r}; choose from {', '.join(ROUTER_KINDS)}")
        if not worker_urls:
            raise ValueError("a router needs at least one worker URL")
        if startup_timeout <= 0 or stop_timeout <= 0:
            raise ValueError("startup_timeout and stop_timeout must be > 0 seconds")
        self.kind = kind
        self.worker_urls = tuple(worker_urls)
        self.policy = policy
        self.routing_key_headers = tuple(routing_key_headers)
        self.health_check_interval = health_check_interval
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.port = 0
        self.command: list[str] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def __repr__(self) -> str:
        where = f"127.0.0.1:{self.port}" if self._process is not None else "stopped"
        return f"Router({self.kind!r}, {len(self.worker_urls)} workers, {where})"

    @property
    def url(self) -> str:
        if self._process is None:
            raise RuntimeError("the router is not running: call start() or use `with`")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def log(self) -> str:
        """Everything the router printed so far."""
        if self._log_file is None:
            return ""
        self._log_file.flush()
        return Path(self._log_file.name).read_text(errors="replace")

    def start(self) -> Router:
        """Start the router and wait until it reports every replica healthy."""
        if self._process is not None:
            return self
        reason = unavailable_reason(self.kind)
        if reason is not None:
            raise RouterError(reason)
        # A port taken between free_port() and the router's bind makes it exit at once: take
        # fresh ports and try again.
        for attempt in range(3):
            self._launch()
            try:
                self._wait_ready()
                return self
            except RouterError as exc:
                log = self.log
                self.stop()
                if "in use" not in log.lower() or attempt == 2:
                    raise RouterError(f"{exc}\n--- {self.kind} log (tail) ---\n"
                                      f"{log[-3000:]}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self) -> None:
        self.port = free_port()
        self.command = router_command(
            self.kind, self.worker_urls, port=self.port, prometheus_port=free_port(),
            policy=self.policy, routing_key_headers=self.routing_key_headers,
            health_check_interval=self.health_check_interval, extra_args=self.extra_args)
        self._log_file = tempfile.NamedTemporaryFile(  # closed by stop()
            prefix=f"specthink-{self.kind}-", suffix=".log", delete=False)
        env = {**os.environ, "NO_COLOR": "1", "RUST_LOG_STYLE": "never"}
        self._process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                         stdout=self._log_file, stderr=subprocess.STDOUT,
                                         env=env)

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer"
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                code = self._process.poll()
                if code is not None:
                    raise RouterError(f"{self.kind} exited with status {code} while starting")
                try:
                    answer = client.get(f"{self.url}/readiness")
                    last = f"{answer.status_code} {answer.text[:200]}"
                    if answer.status_code == 200 and self._healthy_count(answer) >= len(
                            self.worker_urls):
                        return
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.05)
        raise RouterError(f"{self.kind} did not report {len(self.worker_urls)} healthy workers "
                          f"within {self.startup_timeout:g} s (last /readiness: {last})")

    @staticmethod
    def _healthy_count(answer: httpx.Response) -> int:
        try:
            body = answer.json()
        except json.JSONDecodeError:
            return 0
        count = body.get("healthy_workers") if isinstance(body, dict) else None
        return count if isinstance(count, int) else 0

    def workers(self) -> list[dict[str, Any]]:
        """The router's own view of its replicas (``GET /workers``)."""
        answer = httpx.get(f"{self.url}/workers", timeout=5.0, trust_env=False)
        answer.raise_for_status()
        workers = answer.json().get("workers", [])
        return [w for w in workers if isinstance(w, dict)]

    def wait_unhealthy(self, worker_url: str, timeout: float = 15.0) -> None:
        """Wait until the router no longer counts ``worker_url`` as healthy (its health checks
        or circuit breaker noticed), bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = httpx.get(f"{self.url}/readiness", timeout=2.0, trust_env=False)
            healthy = self._healthy_count(answer)
            if healthy < len(self.worker_urls):
                return
            time.sleep(0.1)
        raise RouterError(f"{self.kind} still counts {worker_url} healthy after {timeout:g} s")

    def stop(self) -> None:
        """Stop the router by its own pid: SIGTERM, wait, then SIGKILL."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=self.stop_timeout)
        log_file, self._log_file = self._log_file, None
        if log_file is not None:
            log_file.close()
            with contextlib.suppress(OSError):
                os.unlink(log_file.name)

    def __enter__(self) -> Router:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
