"""``specthink serve`` freezes its start-up heap out of the cyclic collector's sight
(``gc.freeze()``) once the application has started, and gives it back at shutdown; an
application embedding ``create_app`` keeps the collector as it was."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from typer.testing import CliRunner

from specthink.cli import app as cli
from specthink.serve import ServeSettings, create_app
from specthink.serve.app import app_from_environment

# Never contacted: starting and stopping the application sends no request.
SETTINGS = ServeSettings(small_url="http://127.0.0.1:9", target_url="http://127.0.0.1:9",
                         small_template="chatml", target_template="chatml")


def frozen_while_running(application: Starlette) -> tuple[int, int]:
    """Objects frozen while the application runs, and after it has shut down."""
    async def run() -> tuple[int, int]:
        async with application.router.lifespan_context(application):
            running = gc.get_freeze_count()
        return running, gc.get_freeze_count()

    return asyncio.run(run())


@pytest.fixture(autouse=True)
def _unfrozen() -> Any:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_served_app_freezes_its_heap_once_started_and_unfreezes_at_shutdown() -> None:
    """Broken: a full collection under load walks the whole start-up heap, or the frozen heap
    outlives the application."""
    running, after = frozen_while_running(create_app(SETTINGS, freeze_heap=True))
    assert running > 0
    assert after == 0


def test_an_embedded_app_leaves_the_collector_alone() -> None:
    """Broken: library code froze the heap of the application that embeds it."""
    assert frozen_while_running(create_app(SETTINGS)) == (0, 0)


def test_the_serve_command_and_its_workers_ask_for_the_frozen_heap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways ``specthink serve`` builds its app (one process, and each ``--workers``
    process's factory) freeze the heap (broken: the option is never switched on)."""
    seen: list[int] = []

    def run(application: Starlette, **options: object) -> None:
        seen.append(frozen_while_running(application)[0])

    monkeypatch.setattr(uvicorn, "run", run)
    result = CliRunner().invoke(cli, ["serve", "--small", SETTINGS.small_url, "--target",
                                      SETTINGS.target_url, "--small-template", "chatml",
                                      "--target-template", "chatml"])
    assert result.exit_code == 0, result.output
    for name, value in SETTINGS.to_environment().items():
        monkeypatch.setenv(name, value)
    seen.append(frozen_while_running(app_from_environment())[0])
    assert len(seen) == 2 and all(count > 0 for count in seen)
