"""The trace page as a browser renders it (headless Chromium).

The screenshot is kept under ``test-artifacts/`` for a human to look at.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from specthink.trace import Result
from specthink.tracehtml import write_html

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs /usr/bin/chromium (apt-get install -y chromium) to render the page")


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    # Everything that would reach the network or a desktop session is switched off.
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


@pytest.fixture
def page(tmp_path: Path, sample_result: Result) -> Path:
    trace = {**sample_result.to_dict(),
             "messages": [{"role": "user", "content": "What is x?"}]}
    trace_file = tmp_path / "trace.json"
    trace_file.write_text(json.dumps(trace))
    return write_html(trace_file, tmp_path / "trace.html")


def test_browser_parses_every_segment_and_marker(page: Path, tmp_path: Path) -> None:
    """If this fails, the page's markup is broken (a browser would drop or nest spans)."""
    dom = chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile").stdout
    assert dom.count('class="seg-target"') == 4
    assert dom.count('class="marker"') == 4  # three takeovers and the legend's example
    assert "So &lt;b&gt;x&lt;/b&gt; &amp; y." in dom


def test_screenshot_shows_the_target_colour(page: Path, tmp_path: Path) -> None:
    """If this fails, the inline CSS did not apply: target text would not stand out."""
    image_module = pytest.importorskip("PIL.Image", reason="Pillow decodes the screenshot")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "trace-page.png"
    shot.unlink(missing_ok=True)
    chromium(f"--screenshot={shot}", "--window-size=1000,1400", "--hide-scrollbars",
             page.as_uri(), profile=tmp_path / "profile")
    with image_module.open(shot) as image:
        assert image.size == (1000, 1400)
        colours = {colour for _, colour in image.convert("RGB").getcolors(1_000_000) or []}
    target_background = (0xF6, 0xE3, 0xFA)
    intervention_background = (0xFF, 0xF1, 0xC2)
    assert target_background in colours
    assert intervention_background in colours
