"""A saved trace rendered as text pieces and as a self-contained HTML page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from specthink.errors import ConfigError
from specthink.trace import Result
from specthink.tracehtml import Marker, Span, annotate, load_trace, render_html, stats_rows


def test_annotate_places_each_marker_where_its_takeover_was_decided(sample_result: Result,
                                                                     ) -> None:
    """If this fails, markers drift away from the text the target wrote."""
    pieces = annotate(sample_result.to_dict())
    assert [type(p).__name__ for p in pieces] == [
        "Span", "Marker", "Span", "Marker", "Span", "Span", "Marker", "Span", "Span"]
    assert pieces[1] == Marker("rule1", 12, 3)
    assert pieces[2] == Span("target", "Wait, check: ", "rule1")
    assert pieces[6] == Marker("rule3", 54, 0)
    joined = "".join(p.text for p in pieces if isinstance(p, Span))
    assert joined == sample_result.text


def test_annotate_splits_a_segment_at_a_marker_inside_it() -> None:
    trace = {"segments": [{"source": "small", "rule": None, "text": "abcdef"}],
             "takeovers": [{"rule": "rule1", "offset": 2, "discarded_tokens": 0}],
             "stats": {}}
    assert annotate(trace) == [Span("small", "ab"), Marker("rule1", 2), Span("small", "cdef")]


def test_annotate_keeps_a_takeover_at_the_very_end() -> None:
    """The budget may run out right after a takeover was decided: the marker still shows."""
    trace = {"segments": [{"source": "small", "rule": None, "text": "abc"}],
             "takeovers": [{"rule": "rule1", "offset": 3, "discarded_tokens": 2}], "stats": {}}
    assert annotate(trace) == [Span("small", "abc"), Marker("rule1", 3, 2)]


def test_stats_rows_name_tokens_share_and_takeovers(sample_result: Result) -> None:
    rows = dict(stats_rows(sample_result.stats.to_dict()))
    assert rows["output tokens"] == "small 12 · target 9 · intervention 8 · total 29"
    assert rows["target share"] == "31.0%"
    assert rows["takeovers"] == "rule1 1 · rule2 1 · rule3 1 (total 3)"
    assert rows["discarded probe tokens"] == "3"
    assert rows["requests"] == "small 3 · target 3"
    assert rows["wait seconds"] == "small 0.250 · target 0.500"
    assert "target fallback" not in rows


def test_html_page_colours_segments_escapes_text_and_has_no_external_resources(
        sample_result: Result) -> None:
    trace = {**sample_result.to_dict(),
             "messages": [{"role": "user", "content": "Is <x> & y < 3?"}]}
    page = render_html(trace, title="t <1>")
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>t &lt;1&gt;</title>" in page
    assert "Is &lt;x&gt; &amp; y &lt; 3?" in page
    assert "So &lt;b&gt;x&lt;/b&gt; &amp; y." in page
    assert "<b>x</b>" not in page
    assert page.count('class="seg-target"') == 3 + 1  # three target spans and the legend
    assert page.count('class="seg-intervention"') == 1 + 1
    assert "⟨rule1⟩" in page and "⟨rule2⟩" in page and "⟨rule3⟩" in page
    assert "3 small-model probe tokens discarded" in page
    assert not re.search(r"<(script|link|img)\b", page)
    assert "http://" not in page and "https://" not in page


def test_html_marks_a_target_fallback(sample_result: Result) -> None:
    trace = sample_result.to_dict()
    trace["stats"]["fallback"] = True
    trace["stats"]["fallback_error"] = "target <down>"
    page = render_html(trace)
    assert "⟨target fallback⟩" in page
    assert 'title="target &lt;down&gt;"' in page


def test_load_trace_rejects_files_that_are_not_traces(tmp_path: Path) -> None:
    not_json = tmp_path / "a.json"
    not_json.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_trace(not_json)
    wrong_shape = tmp_path / "b.json"
    wrong_shape.write_text(json.dumps({"text": "hi"}))
    with pytest.raises(ConfigError, match="not a specthink trace"):
        load_trace(wrong_shape)
    with pytest.raises(ConfigError, match="cannot read trace"):
        load_trace(tmp_path / "missing.json")
