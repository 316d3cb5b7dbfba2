"""A saved trace (``Result.to_dict()`` JSON) as a self-contained HTML page, and the pure pieces
the terminal view shares with it: text interleaved with takeover markers, and statistics rows.

The page has no scripts and no external resources: inline CSS, every text escaped.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specthink.errors import ConfigError
from specthink.trace import Rule

__all__ = [
    "RULE_LABELS",
    "Marker",
    "Span",
    "annotate",
    "load_trace",
    "render_html",
    "stats_rows",
    "write_html",
]

RULE_LABELS: dict[str, str] = {rule.value: rule.label for rule in Rule}

SOURCE_LABELS: dict[str, str] = {
    "small": "small model",
    "target": "target model",
    "intervention": "intervention text",
}


@dataclass(frozen=True, slots=True)
class Span:
    """A run of accepted text written by one source (``rule`` is ``None`` for the small model)."""

    source: str
    text: str
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class Marker:
    """A takeover decided at ``offset`` characters of the accepted text."""

    rule: str
    offset: int
    discarded_tokens: int = 0


def load_trace(path: str | Path) -> dict[str, Any]:
    """Read a trace written by ``specthink ask --save-trace`` (or ``json.dump(result.to_dict())``).

    Raises ``ConfigError`` naming the file when it is not such a trace.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"trace {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("segments"), list) \
            or not isinstance(data.get("stats"), dict):
        raise ConfigError(
            f"{path} is not a specthink trace: expected a JSON object with 'segments' and "
            f"'stats' (the Result.to_dict() format)")
    return data


def annotate(trace: Mapping[str, Any]) -> list[Span | Marker]:
    """The trace's segments in order, with each takeover's marker placed at its offset.

    A marker whose offset falls inside a segment splits it, so the marker sits exactly where the
    takeover was decided; a marker at a segment boundary comes before the segment it starts.
    """
    markers = sorted(
        (Marker(str(t.get("rule")), int(t.get("offset", 0)), int(t.get("discarded_tokens", 0)))
         for t in trace.get("takeovers") or ()),
        key=lambda m: m.offset)
    out: list[Span | Marker] = []
    position = 0
    pending = iter(markers)
    marker = next(pending, None)
    for segment in trace.get("segments") or ():
        source = str(segment.get("source", "small"))
        rule = segment.get("rule")
        text = str(segment.get("text", ""))
        end = position + len(text)
        cut = 0
        while marker is not None and marker.offset < end:
            split = max(marker.offset - position, cut)
            if split > cut:
                out.append(Span(source, text[cut:split], rule))
                cut = split
            out.append(marker)
            marker = next(pending, None)
        if cut < len(text):
            out.append(Span(source, text[cut:], rule))
        position = end
    while marker is not None:
        out.append(marker)
        marker = next(pending, None)
    return out


def _tokens_by_role(stats: Mapping[str, Any]) -> str:
    small = int(stats.get("small_tokens", 0))
    target = int(stats.get("target_tokens", 0))
    intervention = int(stats.get("intervention_tokens", 0))
    total = int(stats.get("output_tokens", small + target + intervention))
    return f"small {small} · target {target} · intervention {intervention} · total {total}"


def _per_role(value: object, fmt: str = "{}") -> str:
    if not isinstance(value, Mapping):
        return "—"
    return " · ".join(f"{role} {fmt.format(v)}" for role, v in value.items())


def stats_rows(stats: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The statistics of a trace as (label, value) rows, for the terminal and the HTML table."""
    takeovers = stats.get("takeovers") or {}
    fired = {rule: n for rule, n in takeovers.items() if n}
    takeover_text = (" · ".join(f"{rule} {n}" for rule, n in fired.items())
                     + f" (total {sum(fired.values())})") if fired else "none"
    rows = [
        ("output tokens", _tokens_by_role(stats)),
        ("target share", f"{float(stats.get('target_share', 0.0)):.1%}"),
        ("takeovers", takeover_text),
        ("discarded probe tokens", str(stats.get("discarded_tokens", 0))),
        ("requests", _per_role(stats.get("requests"))),
        ("retries", _per_role(stats.get("retries"))),
        ("resumed streams", _per_role(stats.get("resumed_streams"))),
        ("wait seconds", _per_role(stats.get("wait_seconds"), "{:.3f}")),
        ("prompt tokens", str(stats.get("input_tokens", 0))),
        ("finish reason", str(stats.get("finish_reason") or "—")),
    ]
    if stats.get("fallback"):
        rows.append(("target fallback", f"yes: {stats.get('fallback_error') or 'target failed'}"))
    return rows


_CSS = """
:root { --small: #1d2733; --target: #7a1487; --target-bg: #f6e3fa; --interv: #7a5200;
        --interv-bg: #fff1c2; --muted: #6b7280; }
* { box-sizing: border-box; }
body { font: 15px/1.55 system-ui, -apple-system, "Segoe UI", sans-serif; color: #111;
       background: #fafafa; margin: 0; padding: 2rem; }
main { max-width: 60rem; margin: 0 auto; }
h1 { font-size: 1.35rem; margin: 0 0 .25rem; }
h2 { font-size: 1.05rem; margin: 1.75rem 0 .5rem; }
.note, .legend { color: var(--muted); font-size: .9rem; }
.legend span { margin-right: 1rem; }
.question { background: #fff; border-left: 4px solid #9ca3af; padding: .5rem .9rem;
            white-space: pre-wrap; }
.trace { background: #fff; border: 1px solid #e5e7eb; border-radius: 6px; padding: 1rem 1.2rem;
         white-space: pre-wrap; overflow-wrap: anywhere;
         font: 14px/1.6 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
.seg-small { color: var(--small); }
.seg-target { color: var(--target); background: var(--target-bg); border-radius: 2px; }
.seg-intervention { color: var(--interv); background: var(--interv-bg); font-style: italic; }
.marker { color: var(--muted); font-size: .75em; vertical-align: super; margin: 0 .1em;
          white-space: nowrap; }
.marker-fallback { color: #b91c1c; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { text-align: left; padding: .35rem .7rem; border-bottom: 1px solid #e5e7eb;
         vertical-align: top; }
th { width: 14rem; color: #374151; font-weight: 600; }
"""


def _question(trace: Mapping[str, Any]) -> str | None:
    messages = trace.get("messages")
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return None
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return str(message.get("content") or "")
    return None


def _span_html(span: Span) -> str:
    source = span.source if span.source in SOURCE_LABELS else "small"
    title = SOURCE_LABELS[source]
    if span.rule:
        title += f" — {RULE_LABELS.get(span.rule, span.rule)}"
    return (f'<span class="seg-{source}" title="{html.escape(title)}">'
            f"{html.escape(span.text)}</span>")


def _marker_html(marker: Marker) -> str:
    title = f"takeover: {RULE_LABELS.get(marker.rule, marker.rule)} at character {marker.offset}"
    if marker.discarded_tokens:
        title += f"; {marker.discarded_tokens} small-model probe tokens discarded"
    return (f'<span class="marker" title="{html.escape(title)}">'
            f"⟨{html.escape(marker.rule)}⟩</span>")


def render_html(trace: Mapping[str, Any], *, title: str = "specthink trace") -> str:
    """The whole page as one string: header, legend, annotated text, takeovers and statistics."""
    stats = trace.get("stats") or {}
    parts: list[str] = []
    for piece in annotate(trace):
        parts.append(_span_html(piece) if isinstance(piece, Span) else _marker_html(piece))
    if stats.get("fallback"):
        error = html.escape(str(stats.get("fallback_error") or "target failed"))
        parts.append(f'<span class="marker marker-fallback" title="{error}">'
                     "⟨target fallback⟩</span>")
    question = _question(trace)
    note = trace.get("note")
    takeovers = trace.get("takeovers") or []
    takeover_rows = "".join(
        f"<tr><td>{html.escape(RULE_LABELS.get(str(t.get('rule')), str(t.get('rule'))))}</td>"
        f"<td>{int(t.get('offset', 0))}</td><td>{int(t.get('discarded_tokens', 0))}</td></tr>"
        for t in takeovers)
    stat_rows = "".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
                        for label, value in stats_rows(stats))
    legend = "".join(f'<span class="seg-{source}">{html.escape(label)}</span>'
                     for source, label in SOURCE_LABELS.items())
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n",
        f"<h1>{html.escape(title)}</h1>\n",
        f'<p class="note">{html.escape(str(note))}</p>\n' if note else "",
        (f'<h2>Question</h2>\n<div class="question">{html.escape(question)}</div>\n'
         if question is not None else ""),
        f'<h2>Answer</h2>\n<p class="legend">{legend}'
        '<span class="marker">⟨rule⟩ = takeover point</span></p>\n',
        f'<div class="trace">{"".join(parts)}</div>\n',
        "<h2>Takeovers</h2>\n",
        ("<table><thead><tr><th>rule</th><th>offset (characters)</th>"
         f"<th>discarded probe tokens</th></tr></thead><tbody>{takeover_rows}</tbody></table>\n"
         if takeovers else '<p class="note">No takeover happened.</p>\n'),
        f"<h2>Statistics</h2>\n<table><tbody>{stat_rows}</tbody></table>\n",
        "</main>\n</body>\n</html>\n",
    ])


def write_html(trace_path: str | Path, out_path: str | Path) -> Path:
    """Render the trace at ``trace_path`` into ``out_path``; return the output path."""
    trace = load_trace(trace_path)
    out = Path(out_path)
    out.write_text(render_html(trace, title=f"specthink trace — {Path(trace_path).name}"),
                   encoding="utf-8")
    return out
