"""The docker compose files of infra/: they parse, and each keeps the settings the pair needs.

Docker itself is not needed: the files are read with PyYAML. Where ``docker compose`` exists,
it also checks them against the Compose specification.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML reads the compose files")

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE_FILES = sorted(INFRA.glob("*/compose.*.yml"))
FLAG_BY_ENGINE = {"tgi": "--cuda-memory-fraction", "vllm": "--gpu-memory-utilization"}


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def option(command: list[str], flag: str) -> str:
    values = [part.split("=", 1)[1] for part in command if part.startswith(flag + "=")]
    assert len(values) == 1, f"{flag} appears {len(values)} times in {command}"
    return values[0]


def test_every_variant_is_there() -> None:
    names = {f"{p.parent.name}/{p.name}" for p in COMPOSE_FILES}
    assert names == {"tgi/compose.one-gpu.yml", "tgi/compose.two-gpus.yml",
                     "vllm/compose.one-gpu.yml", "vllm/compose.two-gpus.yml"}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_compose_file_starts_the_target_after_a_healthy_small_server(path: Path) -> None:
    services = load(path)["services"]
    assert set(services) == {"small", "target"}
    assert services["target"]["depends_on"] == {"small": {"condition": "service_healthy"}}
    for role in ("small", "target"):
        assert services[role]["healthcheck"]["test"], f"{role} has no health check"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_compose_file_serves_the_papers_pair_with_caching_on_and_telemetry_off(
        path: Path) -> None:
    engine = path.parent.name
    services = load(path)["services"]
    small, target = services["small"], services["target"]
    assert "DeepSeek-R1-Distill-Qwen-1.5B" in " ".join(small["command"])
    assert "DeepSeek-R1-Distill-Qwen-32B" in " ".join(target["command"])
    assert small["ports"] != target["ports"]
    for service in (small, target):
        environment = service["environment"]
        assert environment["HF_HUB_DISABLE_TELEMETRY"] == "1"
        if engine == "tgi":
            assert environment["PREFIX_CACHING"] == "1"
            assert "--usage-stats=off" in service["command"]
        else:
            assert environment["VLLM_NO_USAGE_STATS"] == "1"
            assert "--enable-prefix-caching" in service["command"]


@pytest.mark.parametrize("path", [p for p in COMPOSE_FILES if "one-gpu" in p.name],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_one_gpu_memory_shares_leave_room_for_each_other(path: Path) -> None:
    """If this fails, the second server would find no memory left on the shared GPU."""
    flag = FLAG_BY_ENGINE[path.parent.name]
    services = load(path)["services"]
    shares = []
    for role in ("small", "target"):
        default = option(services[role]["command"], flag).rsplit(":-", 1)[1].rstrip("}")
        shares.append(float(default))
    assert shares[0] < shares[1]
    assert sum(shares) < 1.0


@pytest.mark.parametrize("path", [p for p in COMPOSE_FILES if "two-gpus" in p.name],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_two_gpus_give_each_role_its_own_device(path: Path) -> None:
    services = load(path)["services"]
    devices = [services[role]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
               for role in ("small", "target")]
    assert devices == [["${SMALL_GPU:-0}"], ["${TARGET_GPU:-1}"]]


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _docker_compose_available(),
                    reason="needs the docker compose plugin to validate against the spec")
def test_docker_compose_accepts_every_file() -> None:
    for path in COMPOSE_FILES:
        done = subprocess.run(["docker", "compose", "-f", str(path), "config", "--quiet"],
                              capture_output=True, text=True, check=False, timeout=60)
        assert done.returncode == 0, f"{path}: {done.stderr}"
