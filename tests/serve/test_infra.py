"""infra/serve: the Dockerfile and the compose file (two vLLM servers plus specthink serve).

Docker cannot run here: the compose file is read with PyYAML and the Dockerfile as text, and
every option they pass to ``specthink serve`` is checked against the real command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main

from specthink.cli import app

yaml = pytest.importorskip("yaml", reason="PyYAML reads the compose file")

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "infra" / "serve"


def compose() -> dict[str, Any]:
    data = yaml.safe_load((SERVE / "compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def serve_options() -> set[str]:
    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return {name for param in command.params for name in param.opts}


def test_compose_runs_serve_after_two_healthy_vllm_servers() -> None:
    """Failing: serve starts before its model servers can answer, or talks to the wrong ones."""
    services = compose()["services"]
    assert set(services) == {"small", "target", "serve"}
    serve = services["serve"]
    assert serve["depends_on"] == {"small": {"condition": "service_healthy"},
                                   "target": {"condition": "service_healthy"}}
    for role in ("small", "target"):
        assert "vllm/vllm-openai" in services[role]["image"]
        assert "--enable-prefix-caching" in services[role]["command"]
        assert services[role]["healthcheck"]["test"]
        assert "ports" not in services[role], "model servers need not be published"
        assert serve["environment"][f"SPECTHINK_{role.upper()}_URL"] == f"http://{role}:8000"
    assert "--backend=openai" in serve["command"]


def test_compose_passes_only_real_serve_options_and_publishes_on_loopback() -> None:
    serve = compose()["services"]["serve"]
    options = serve_options()
    for argument in serve["command"]:
        assert argument.split("=", 1)[0] in options, f"{argument} is no option of serve"
    assert serve["ports"] == ["${SERVE_BIND:-127.0.0.1}:${SERVE_PORT:-8000}:8000"]
    grace = int(serve["stop_grace_period"].removesuffix("s"))
    assert grace > int(serve["environment"]["SPECTHINK_SERVE_DRAIN_TIMEOUT"])
    assert serve["build"]["dockerfile"] == "infra/serve/Dockerfile"
    assert (SERVE / serve["build"]["context"] / serve["build"]["dockerfile"]).resolve() == \
        (SERVE / "Dockerfile").resolve()


def test_dockerfile_is_slim_non_root_and_checks_health() -> None:
    """Failing: the image runs as root, has no health check on /health, or installs an extra
    that does not exist."""
    text = (SERVE / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[1-9]-slim$", text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (.*)$", text, re.MULTILINE | re.DOTALL)
    assert healthcheck and "/health" in healthcheck.group(1)
    assert re.search(r'^ENTRYPOINT \["specthink", "serve"\]$', text, re.MULTILINE)
    extras = re.findall(r'pip install "\.\[(\w+)\]"', text)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras == ["server"] and "server" in declared
    copied = re.findall(r"^COPY (\S+)", text, re.MULTILINE)
    for path in copied:
        assert (ROOT / path).exists(), f"COPY {path}: no such file in the repository"
