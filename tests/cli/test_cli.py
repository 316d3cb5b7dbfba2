"""The ``specthink`` command against two loopback servers (TGI protocol and /v1/completions)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from specthink.backends import kinds
from specthink.cli import EXIT_CODES, _register_extensions, app
from specthink.errors import BackendError, ConfigError
from specthink.local import LocalPairError
from specthink.testing.models import Script, ScriptedModel, Tokenizer
from specthink.testing.server import LoopbackServer
from tests.ollama_support import ANSWER as OLLAMA_ANSWER
from tests.ollama_support import MODELS, Ollama

TARGET_FIX = ("Actually x is two because both terms are equal and their sum doubles one of them "
              "so we keep going with two here and more words follow")
FIX20 = "".join(Tokenizer().tokenize(TARGET_FIX)[:20])
ANSWER = "Let x be 2.\n\n" + FIX20 + "\n\nSo the answer is 2."
"""What the pair writes: the small model's "Wait" probe hands 20 tokens to the target (rule 1)."""

runner = CliRunner()


@pytest.fixture
def urls() -> Iterator[tuple[str, str]]:
    small = ScriptedModel([Script("", "Let x be 2.\n\nWait, x is 3.\n\nSo x is 3."),
                           Script(FIX20, "\n\nSo the answer is 2.")])
    target = ScriptedModel([Script("Let x be 2.\n\n", TARGET_FIX)])
    with LoopbackServer(small, model_id="org/small-1.5b") as s, \
            LoopbackServer(target, model_id="org/target-32b", max_input_tokens=30000,
                           max_total_tokens=32768) as t:
        yield s.url, t.url


@pytest.fixture
def env(urls: tuple[str, str]) -> dict[str, str | None]:
    return {"SPECTHINK_SMALL_URL": urls[0], "SPECTHINK_TARGET_URL": urls[1],
            "SPECTHINK_BACKEND": None, "SPECTHINK_API_KEY": None}


def unused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_ask_json_prints_the_trace_on_stdout(env: dict[str, str | None]) -> None:
    result = runner.invoke(app, ["ask", "What is x?", "--json"], env=env)

    assert result.exit_code == 0, result.output
    trace = json.loads(result.stdout)
    assert trace["text"] == ANSWER
    assert [s["source"] for s in trace["segments"]] == ["small", "target", "small"]
    assert trace["segments"][1] == {"source": "target", "rule": "rule1", "text": FIX20}
    assert trace["takeovers"] == [{"rule": "rule1", "offset": len("Let x be 2.\n\n"),
                                   "discarded_tokens": 1}]
    stats = trace["stats"]
    assert stats["target_tokens"] == 20
    assert stats["requests"] == {"small": 2, "target": 1}
    assert stats["finish_reason"] == "stop"
    assert "target share" not in result.stderr  # no table in --json mode


def test_ask_streams_coloured_text_with_takeover_markers_and_a_table(
        env: dict[str, str | None]) -> None:
    result = runner.invoke(app, ["ask", "What is x?"], env=env)

    assert result.exit_code == 0, result.output
    assert result.stdout == "Let x be 2.\n\n⟨rule1⟩" + FIX20 + "\n\nSo the answer is 2.\n"
    assert "⟨rule⟩ = takeover point" in result.stderr
    assert "target share" in result.stderr
    assert "rule1 1 (total 1)" in result.stderr


def test_ask_plain_prints_only_the_answer(env: dict[str, str | None]) -> None:
    result = runner.invoke(app, ["ask", "What is x?", "--plain"], env=env)

    assert result.exit_code == 0, result.output
    assert result.stdout == ANSWER + "\n"
    assert result.stderr == ""


def test_ask_over_openai_completions(env: dict[str, str | None]) -> None:
    result = runner.invoke(app, ["ask", "What is x?", "--json", "--backend", "openai",
                                 "--template", "chatml"], env=env)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] == ANSWER


def test_ask_and_servers_check_over_ollama(ollama: Ollama) -> None:
    """Broken: ``--backend`` keeps its own list of protocols, so ``ollama``, which the factory
    builds, is a usage error, or the model names stay behind."""
    env = {"SPECTHINK_SMALL_URL": ollama.url, "SPECTHINK_TARGET_URL": ollama.url,
           "SPECTHINK_BACKEND": "ollama", "SPECTHINK_API_KEY": None,
           "SPECTHINK_SMALL_MODEL": MODELS[1], "SPECTHINK_TARGET_MODEL": MODELS[0]}

    asked = runner.invoke(app, ["ask", "Hi", "--json", "--template", "chatml",
                                "--max-tokens", "16"], env=env)
    checked = runner.invoke(app, ["servers", "check", "--json"], env=env)

    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.stdout)["text"] == OLLAMA_ANSWER
    assert ollama.models() == [MODELS[1]]
    assert checked.exit_code == 0, checked.output
    rows = {row["role"]: row for row in json.loads(checked.stdout)}
    assert rows["small"]["protocol"] == rows["target"]["protocol"] == "ollama"
    assert (rows["small"]["model_id"], rows["target"]["model_id"]) == (MODELS[1], MODELS[0])


@pytest.mark.parametrize("command", [["ask", "q"], ["servers", "check"]])
def test_an_unknown_backend_is_a_usage_error_naming_the_kinds(
        env: dict[str, str | None], command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--backend", "grpc"], env=env)
    assert result.exit_code == 2
    assert f"choose one of auto, {', '.join(kinds())}" in " ".join(result.output.split())


def test_saved_trace_renders_as_html_and_in_the_terminal(env: dict[str, str | None],
                                                         tmp_path: Path) -> None:
    trace_file = tmp_path / "trace.json"
    page = tmp_path / "trace.html"

    asked = runner.invoke(app, ["ask", "What is <x>?", "--plain", "--save-trace",
                                str(trace_file)], env=env)
    assert asked.exit_code == 0, asked.output
    saved = json.loads(trace_file.read_text())
    assert saved["messages"] == [{"role": "user", "content": "What is <x>?"}]
    assert saved["rules"] == "paper"

    rendered = runner.invoke(app, ["trace", str(trace_file), "--html", str(page)])
    assert rendered.exit_code == 0, rendered.output
    assert rendered.stdout.strip() == str(page)
    html = page.read_text()
    assert "What is &lt;x&gt;?" in html
    assert '<span class="seg-target" title="target model — rule 1 · affirmation/reflection">' \
        in html

    shown = runner.invoke(app, ["trace", str(trace_file)])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == "Let x be 2.\n\n⟨rule1⟩" + FIX20 + "\n\nSo the answer is 2.\n"
    assert "target share" in shown.stderr


def test_servers_check_reports_model_ids_and_limits(env: dict[str, str | None]) -> None:
    result = runner.invoke(app, ["servers", "check", "--json"], env=env)

    assert result.exit_code == 0, result.output
    rows = {row["role"]: row for row in json.loads(result.stdout)}
    assert rows["small"]["protocol"] == "tgi" and rows["small"]["healthy"]
    assert rows["small"]["model_id"] == "org/small-1.5b"
    assert rows["target"]["model_id"] == "org/target-32b"
    assert rows["target"]["max_input_tokens"] == 30000
    assert rows["target"]["max_total_tokens"] == 32768


def test_servers_check_fails_with_exit_3_when_a_server_is_down(
        env: dict[str, str | None]) -> None:
    result = runner.invoke(app, ["servers", "check"], env={**env,
                                                           "SPECTHINK_TARGET_URL": unused_url()})
    assert result.exit_code == 3
    assert "│ small " in result.stdout and "│ yes " in result.stdout and "│ no " in result.stdout
    assert "target: cannot reach the server" in result.stderr


def test_one_url_without_the_other_is_a_config_error(env: dict[str, str | None]) -> None:
    result = runner.invoke(app, ["ask", "q"], env={**env, "SPECTHINK_TARGET_URL": None})
    assert result.exit_code == 2
    assert "--target / SPECTHINK_TARGET_URL is not set" in result.stderr


def test_an_unreachable_server_exits_with_the_backend_code(env: dict[str, str | None]) -> None:
    result = runner.invoke(app, ["ask", "q"], env={**env, "SPECTHINK_SMALL_URL": unused_url()})
    assert result.exit_code == 3
    assert result.stderr.startswith("error: cannot reach the server")


def test_an_unknown_rules_preset_is_a_usage_error(env: dict[str, str | None]) -> None:
    result = runner.invoke(app, ["ask", "q", "--rules", "fastest"], env=env)
    assert result.exit_code == 2
    assert "'fastest' is not a preset" in result.output


def test_each_error_family_has_its_own_exit_code() -> None:
    codes = dict(EXIT_CODES)
    assert codes[ConfigError] == 2 and codes[BackendError] == 3 and codes[LocalPairError] == 4
    assert len(set(codes.values())) == len(codes)


def test_local_status_without_a_pair_exits_1(tmp_path: Path) -> None:
    result = runner.invoke(app, ["local", "status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "small" in result.stdout and "target" in result.stdout


def test_local_down_without_a_pair_stops_nothing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["local", "down", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0
    assert "stopped 0 server(s)" in result.stderr


def test_local_up_names_options_each_command_takes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If this fails, `local up` tells newcomers to run `serve --template chatml`, which
    `serve` rejects (it takes --small-template / --target-template)."""
    from specthink.local import LocalPair

    monkeypatch.setattr(LocalPair, "up", lambda self: self.urls)
    result = runner.invoke(app, ["local", "up", "--state-dir", str(tmp_path),
                                 "--small-port", "18031", "--target-port", "18032"])
    assert result.exit_code == 0, result.output
    assert "SPECTHINK_SMALL_URL=http://127.0.0.1:18031" in result.stdout
    hint = " ".join(result.stderr.split())
    commands = re.findall(r"specthink ((?:ask|serve)[^\n]*?--rules paper_instruct)", hint)
    assert [command.split()[0] for command in commands] == ["ask", "serve"], hint
    for command in commands:
        # Click parses every option before --help acts: an unknown one is a usage error.
        args = [arg for arg in command.split() if arg != '"..."']
        checked = runner.invoke(app, [*args, "--help"])
        assert checked.exit_code == 0, (command, checked.output)


def test_local_up_help_shows_its_defaults() -> None:
    """If this fails, Rich reads `[default: …]` in the help as markup and swallows it."""
    result = runner.invoke(app, ["local", "up", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for default in ("[default: 8031]", "[default: 8032]", "[default: half the cores]",
                    "[default: ~/.cache/specthink/local]"):
        assert default in text, text


def test_extension_commands_register_when_their_module_exists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench` and `eval` plug in this way; a module that is not there is skipped."""
    (tmp_path / "specthink_fake_ext.py").write_text(textwrap.dedent("""\
        import typer

        def register(app: typer.Typer) -> None:
            @app.command()
            def hello() -> None:
                print("hello from an extension")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    extended = typer.Typer()

    @extended.command()
    def base() -> None:
        """A first command, so typer keeps subcommand names."""

    _register_extensions(extended, ["specthink_fake_ext", "specthink_no_such_module"])
    result = runner.invoke(extended, ["hello"])
    assert result.exit_code == 0
    assert result.stdout == "hello from an extension\n"


def test_bench_hands_its_arguments_to_the_checkouts_benchmarks() -> None:
    """`specthink bench` runs the top-level benchmarks package with its own options and help
    (broken: the command vanished when the benchmark left the package, or the forwarding
    command parses the options itself)."""
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    assert "specthink bench" in result.stdout
    assert "--ttft" in result.stdout and "--replicas" in result.stdout
    serve = runner.invoke(app, ["bench-serve", "--help"])
    assert serve.exit_code == 0 and "--quick" in serve.stdout


@pytest.fixture
def no_benchmarks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ``benchmarks`` package importable: its modules forgotten and the checkout off the
    path; whatever a test imports under that name is forgotten again afterwards."""
    root = Path(__file__).resolve().parents[2]
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if p and Path(p).resolve() != root])
    for name in [n for n in sys.modules if n.partition(".")[0] == "benchmarks"]:
        monkeypatch.delitem(sys.modules, name)
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n.partition(".")[0] == "benchmarks"]:
            del sys.modules[name]


def test_bench_without_a_checkout_says_to_run_it_from_one(
        no_benchmarks: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Installed from the wheel (no benchmarks package anywhere), `specthink bench` says where
    the benchmark lives instead of a traceback or "no such command"."""
    monkeypatch.setattr("specthink.cli._checkout_roots", lambda: [tmp_path])
    result = runner.invoke(app, ["bench", "--quick"])
    assert result.exit_code == 2
    assert "make bench" in result.stderr and "checkout" in result.stderr


def test_bench_finds_the_benchmarks_beside_the_imported_package(
        no_benchmarks: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A checkout run through the installed ``specthink`` script has no checkout on the path:
    the command finds ``benchmarks/`` beside ``specthink/`` (broken: `specthink bench` works
    only under `python -m` from the checkout's root)."""
    (tmp_path / "specthink").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "cli.py").write_text(textwrap.dedent("""\
        def bench(out: str = "docs/benchmarks") -> None:
            print(f"benchmark of this checkout into {out}")
    """))
    monkeypatch.setattr("specthink.cli._checkout_roots", lambda: [tmp_path])
    result = runner.invoke(app, ["bench", "--out", "elsewhere"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "benchmark of this checkout into elsewhere\n"


def test_main_without_the_cli_extra_prints_the_install_hint() -> None:
    code = ("import sys; sys.modules['typer'] = None\n"
            "from specthink.cli import main\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == ("The specthink command needs the `cli` extra: "
                                   "pip install 'specthink[cli]'")


def test_a_local_pair_that_cannot_start_exits_with_its_own_code(tmp_path: Path) -> None:
    """No URL configured: `ask` starts the local pair, and its failure has exit code 4."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        result = runner.invoke(app, ["ask", "q"], env={
            "SPECTHINK_SMALL_URL": None, "SPECTHINK_TARGET_URL": None,
            "SPECTHINK_STATE_DIR": str(tmp_path),
            "SPECTHINK_LOCAL_SMALL_PORT": str(taken),
            "SPECTHINK_LOCAL_TARGET_PORT": str(taken + 1 if taken < 65535 else taken - 1)})
    assert result.exit_code == 4
    # Without llama-cpp-python or the GGUF the install hint comes first; with them, the port.
    assert ("is taken by another program" in result.stderr
            or "install it with" in result.stderr), result.stderr
    assert not list(tmp_path.glob("*.pid"))


def _command_paths(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    click_group = typer.main.get_command(group)
    paths = [prefix]

    def walk(command: object, path: tuple[str, ...]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            paths.append((*path, name))
            walk(sub, (*path, name))

    walk(click_group, prefix)
    return paths


@pytest.mark.parametrize("path", _command_paths(app), ids=lambda p: " ".join(p) or "specthink")
def test_every_command_has_readable_help(path: tuple[str, ...]) -> None:
    """Rich renders help text as markup: a stray ``[/...]`` in an option's help crashes it."""
    result = runner.invoke(app, [*path, "--help"])

    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


@pytest.fixture
def gemma_pair() -> Iterator[tuple[str, str]]:
    """A Gemma 4 pair over vLLM-protocol servers rendering its real template."""
    from tests.core.formats.test_pair_formats import FAMILY_PAIRS, GEMMA_4, Gemma4Model

    small, target = FAMILY_PAIRS["gemma-4"]
    with LoopbackServer(Gemma4Model(), model_id=small, flavor="vllm",
                        chat_template=GEMMA_4) as s, \
            LoopbackServer(Gemma4Model(), model_id=target, flavor="vllm",
                           chat_template=GEMMA_4) as t:
        yield s.url, t.url


def test_ask_takes_a_response_template_and_template_kwargs(
        gemma_pair: tuple[str, str], env: dict[str, str | None]) -> None:
    """If this fails, ``specthink ask`` cannot read a Gemma 4 pair (``--response-template``),
    does not switch its thinking on by default, or ``--template-kwargs`` cannot switch it
    off; a bad ``--template-kwargs`` is not a usage error."""
    from tests.core.formats.test_pair_formats import ANSWER, FAMILY_PAIRS

    small, target = FAMILY_PAIRS["gemma-4"]
    args = ["ask", "What is 12 * 13?", "--json", "--backend", "openai", "--small",
            gemma_pair[0], "--target", gemma_pair[1], "--small-model", small,
            "--target-model", target, "--template", "server", "--response-template", "auto"]
    thinking = runner.invoke(app, args, env=env)
    assert thinking.exit_code == 0, thinking.output
    trace = json.loads(thinking.stdout)
    assert trace["takeovers"] and trace["text"].endswith(ANSWER)
    plain = runner.invoke(app, [*args, "--template-kwargs", '{"enable_thinking": false}'],
                          env=env)
    assert plain.exit_code == 0, plain.output
    trace = json.loads(plain.stdout)
    assert trace["takeovers"] == [] and trace["text"].endswith(ANSWER)
    bad = runner.invoke(app, [*args, "--template-kwargs", "[1]"], env=env)
    assert bad.exit_code == 2 and "JSON object" in bad.output


def test_serve_takes_a_response_template_and_template_kwargs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """If this fails, ``specthink serve`` cannot be given a response template or template
    kwargs, or an unreadable response template gets as far as serving."""
    pytest.importorskip("uvicorn")
    import uvicorn

    from specthink.serve import app as serve_app

    built: list[Any] = []
    monkeypatch.setattr(serve_app, "create_app",
                        lambda settings, **options: built.append(settings) or object())
    monkeypatch.setattr(uvicorn, "run", lambda *args, **options: None)
    args = ["serve", "--small", "http://127.0.0.1:9", "--target", "http://127.0.0.1:9",
            "--backend", "openai"]
    env = {"SPECTHINK_BACKEND": None, "SPECTHINK_SERVE_API_KEYS": None}
    served = runner.invoke(app, [*args, "--response-template", "gemma-4",
                                 "--template-kwargs", '{"enable_thinking": false}'], env=env)
    assert served.exit_code == 0, served.output
    assert [(s.response_template, s.template_kwargs) for s in built] == [
        ("gemma-4", {"enable_thinking": False})]
    refused = runner.invoke(app, [*args, "--response-template", "bogus"],
                            env={**env, "COLUMNS": "400"})
    assert refused.exit_code == 2 and "unknown response template 'bogus'" in refused.output
    assert len(built) == 1


def test_ask_refuses_bad_settings_before_asking_any_server() -> None:
    """Broken: ``specthink ask`` detects the protocol (``GET /info`` with ``--backend auto``)
    before its PairSettings are checked, so a bad ``--response-template`` is refused only after
    the servers were asked."""
    model = ScriptedModel.single("Hello.")
    with LoopbackServer(model) as small, LoopbackServer(model) as target:
        result = runner.invoke(app, [
            "ask", "Hi", "--small", small.url, "--target", target.url,
            "--response-template", "bogus"], env={"SPECTHINK_BACKEND": None, "COLUMNS": "400"})

        assert result.exit_code == 2, result.output
        assert "unknown response template 'bogus'" in result.output
        assert small.calls == [] and target.calls == []
