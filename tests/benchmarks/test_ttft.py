"""The TTFT bench (``specthink bench --ttft``): a tiny run end to end, and its figures.

Only what does not depend on time is asserted: every conversation got its first text, and what
each client asked the servers before its first generation request; the times live in
``docs/benchmarks/ttft.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.ttft import CLIENTS, TTFTConfig, percentile, run_ttft, targets, write_ttft

CLIENT_SUBSET = ("langchain", "engine", "engine-chatml", "httpx", "socket", "socket-preopen")


@pytest.fixture(scope="module")
def result() -> object:
    config = TTFTConfig(levels=(1, 3), clients=CLIENT_SUBSET, rounds=1, solo_repeats=2,
                        per_request=0.0, per_token=0.02, isolate=False)
    return run_ttft(config)


def test_every_client_gets_every_first_text(result: object) -> None:
    """Each client at each level answered all its conversations up to their first text
    (broken: a client's request or stream reader is wrong, or a level lost conversations)."""
    from benchmarks.ttft import TTFTResult

    assert isinstance(result, TTFTResult)
    assert result.errors == []
    for name in CLIENT_SUBSET:
        assert len(result.pooled(name, 1)) == 2
        assert len(result.pooled(name, 3)) == 3
        assert all(value > 0 for value in result.pooled(name, 3))
        assert result.ratio(FLOOR := "httpx", 3, 0.95, floor=FLOOR) == 1.0


def test_requests_before_the_first_generation_come_from_the_servers_records(
        result: object) -> None:
    """The first conversation of a thinker with the server's template renders (its own
    conversation and the two probes that teach it the template) and fetches /info on both
    servers; later ones ask nothing, since the servers' ChatML is learnt; with the template
    known client-side, only the /info; the bare clients send only the generation (broken: the
    call records are attributed to the wrong conversation, or the engine regressed)."""
    from benchmarks.ttft import TTFTResult

    assert isinstance(result, TTFTResult)
    engine = result.cells_of("engine", 1)[0]
    assert engine.first is not None and engine.later is not None
    assert sorted(engine.first.paths_before) == [
        *["small:/chat_tokenize"] * 3, "small:/info", *["target:/chat_tokenize"] * 3,
        "target:/info"]
    assert (engine.later.small_total, engine.later.target_total) == (0, 0)
    through_langchain = result.cells_of("langchain", 1)[0].later
    assert through_langchain is not None
    assert (through_langchain.small_total, through_langchain.target_total) == (0, 0)
    chatml = result.cells_of("engine-chatml", 1)[0]
    assert chatml.later is not None and chatml.first is not None
    assert (chatml.later.small_total, chatml.later.target_total) == (0, 0)
    assert sorted(chatml.first.paths_before) == ["small:/info", "target:/info"]
    for bare in ("httpx", "socket", "socket-preopen"):
        cell = result.cells_of(bare, 3)[0]
        assert cell.later is not None and cell.later.small_total == 0
        assert len(cell.arrival_ms) == 3  # one generation request per conversation
    burst = result.cells_of("engine", 3)[0]
    assert burst.later is not None
    assert (burst.later.small_total, burst.later.target_total) == (0, 0)


def test_the_report_states_the_targets(result: object, tmp_path: Path) -> None:
    """ttft.md names each target of the issue with a verdict and ttft.json holds every cell
    (broken: a target silently missing from the report)."""
    from benchmarks.ttft import TTFTResult

    assert isinstance(result, TTFTResult)
    markdown, data = write_ttft(result, tmp_path)
    text = markdown.read_text(encoding="utf-8")
    names = [target.name for target in targets(result)]
    assert len(names) == 6 and all(name in text for name in names)
    figures = json.loads(data.read_text(encoding="utf-8"))
    assert len(figures["cells"]) == 2 * len(CLIENT_SUBSET)
    assert set(figures["summary"]) == set(CLIENT_SUBSET)


def test_bad_settings_fail_before_any_server_starts() -> None:
    """An unknown client or an empty level is a ValueError naming the choices."""
    with pytest.raises(ValueError, match="unknown clients"):
        TTFTConfig(clients=("engine", "curl"))
    with pytest.raises(ValueError, match="no clients"):
        TTFTConfig(clients=())
    with pytest.raises(ValueError, match="levels"):
        TTFTConfig(levels=())
    assert set(TTFTConfig().clients) == set(CLIENTS)


def test_percentile_interpolates_between_ranks() -> None:
    """numpy's default percentile (linear between closest ranks)."""
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0], 0.95) == 5.0
    assert percentile(list(map(float, range(101))), 0.95) == 95.0


def test_a_frozen_heap_run_writes_its_own_files_and_thaws(tmp_path: Path) -> None:
    """``gc_freeze`` freezes the client's heap only while it measures and writes
    ttft-gc-freeze.* beside the default run's files (broken: the test process stays frozen,
    or the frozen run overwrites ttft.md)."""
    import gc

    config = TTFTConfig(levels=(2,), clients=("socket",), rounds=1, solo_repeats=1,
                        per_request=0.0, per_token=0.001, gc_freeze=True, isolate=False)
    result = run_ttft(config)
    assert gc.get_freeze_count() == 0
    assert result.errors == [] and len(result.pooled("socket", 2)) == 2
    files = write_ttft(result, tmp_path)
    assert [path.name for path in files] == ["ttft-gc-freeze.md", "ttft-gc-freeze.json"]
    assert "gc.freeze()" in files[0].read_text(encoding="utf-8")


def test_the_command_runs_the_clients_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--ttft-clients`` picks the clients in the order given, and an unknown one is refused
    before anything runs (broken: the option is ignored, or a typo starts a full run)."""
    from typer.testing import CliRunner

    from benchmarks import ttft
    from specthink.cli import app

    asked: list[TTFTConfig] = []

    def run(config: TTFTConfig, progress: object = None) -> None:
        asked.append(config)
        raise RuntimeError("stopped before starting servers")

    monkeypatch.setattr(ttft, "run_ttft", run)
    picked = CliRunner().invoke(app, ["bench", "--ttft", "--ttft-clients",
                                      "engine-chatml, httpx", "--ttft-rounds", "2"])
    assert isinstance(picked.exception, RuntimeError)
    assert [(c.clients, c.rounds) for c in asked] == [(("engine-chatml", "httpx"), 2)]
    refused = CliRunner().invoke(app, ["bench", "--ttft", "--ttft-clients", "engine,curl"])
    assert refused.exit_code == 2 and "unknown clients" in refused.output
    assert len(asked) == 1
