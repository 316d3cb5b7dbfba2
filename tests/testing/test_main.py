"""``python -m specthink.testing``: a loopback server started from a shell."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from specthink.testing.__main__ import build_server, load_model, main, parser

PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_script_file_as_a_list(tmp_path: Path) -> None:
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(["Hello.", {"after": "Later:", "text": " Bye.", "eos": False}]))
    model = load_model(path)
    assert model.continuation(PROMPT).text == "Hello."
    assert model.continuation(PROMPT + "Later:").text == " Bye."
    assert model.continuation(PROMPT + "Later:").eos is False


def test_script_file_with_a_default(tmp_path: Path) -> None:
    path = tmp_path / "answers.json"
    path.write_text(json.dumps({"scripts": [{"after": "Q", "text": "A"}], "default": "?"}))
    assert load_model(path).continuation(PROMPT + "elsewhere").text == "?"


def test_options_reach_the_server(tmp_path: Path) -> None:
    args = parser().parse_args(["--echo", "--port", "0", "--model-id", "m", "--per-token",
                                "0.01", "--max-input-tokens", "10", "--split-newlines"])
    server = build_server(args)
    assert (server.model_id, server.port, server.max_input_tokens) == ("m", 0, 10)
    assert server.latency.per_token == 0.01
    assert server.tokenizer.tokenize("a\n\nb") == ["a", "\n", "\n", "b"]


def test_flavor_and_template_options_reach_the_server() -> None:
    """If this fails, ``python -m specthink.testing`` can only pose as TGI."""
    args = parser().parse_args(["--echo", "--flavor", "vllm", "--model-id",
                                "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"])
    server = build_server(args)
    assert (server.flavor, server.template.name) == ("vllm", "deepseek-r1")
    args = parser().parse_args(["--echo", "--flavor", "llamacpp", "--chat-template", "qwen3"])
    server = build_server(args)
    assert (server.flavor, server.template.name) == ("llamacpp", "qwen3")


def test_a_bad_script_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"text": "no list"}))
    assert main(["--script", str(path)]) == 2
    assert "expected a list of scripts" in capsys.readouterr().err


def test_model_choice_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--port", "0"])
    assert "--script" in capsys.readouterr().err


def test_runs_from_a_shell_until_interrupted() -> None:
    with subprocess.Popen(
            [sys.executable, "-m", "specthink.testing", "--port", "0", "--echo"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            url = line.split(" on ")[1].split()[0]
            assert httpx.get(f"{url}/health").status_code == 200
            answer = httpx.post(f"{url}/generate", json={"inputs": PROMPT}).json()
            assert answer["generated_text"] == "hi"
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
    assert process.returncode == 0
