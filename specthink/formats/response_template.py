"""Response templates: a model's raw output back into reasoning, content and tool calls.

A response template is the declarative inverse of a chat template, as checkpoints ship it under
``response_template`` in tokenizer_config.json (format version 1 of transformers >= 5.13,
``transformers.utils.chat_parsing``): ``start_anchor`` (where the assistant turn starts in the
prompt) and ``fields``, each a region of the output between an ``open``/``open_pattern`` and a
``close``/``close_pattern``, read by a content parser (``text``, ``json``, ``xml-inline``, ...)
and reshaped by a ``transform``. At most one field has no opener: the text outside every other
region goes there (usually ``content``).

:class:`ResponseParser` executes a template on a stream the way transformers' streaming parser
does (same region rules, same hold-back of a delimiter that may still be completing, same final
message), and is measured to cost a fraction of it per token (docs/architecture.md, "Response
templates: which executor, measured"): text that cannot start a delimiter skips the
partial-match scan, and the buffer keeps only what is still undecided.

>>> template = load_template({"start_anchor": "<|im_start|>assistant\\n", "fields": {
...     "reasoning_content": {"open": "<think>", "close": "</think>"},
...     "content": {"close": "<|im_end|>"}}})
>>> parser = ResponseParser(template, prefix="<|im_start|>assistant\\n<think>\\n")
>>> parser.current
'reasoning_content'
>>> _ = parser.feed("Two plus two.</th")
>>> _ = parser.feed("ink>\\n\\nFour.")
>>> parser.finalize()[0]
{'reasoning_content': 'Two plus two.', 'content': 'Four.'}
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import regex

from ..errors import ConfigError
from . import CallOpener
from ._content import (
    CONTENT_PARSERS,
    STREAMABLE,
    TYPED,
    apply_transform,
    coerce_tool_calls,
    parse_content,
    transform_problem,
)

__all__ = [
    "REASONING_FIELDS",
    "SPECTHINK_KEY",
    "Delimiter",
    "EventKind",
    "ParseEvent",
    "ResponseParser",
    "ResponseTemplate",
    "TemplateField",
    "load_template",
    "marker_tokens",
    "parse_response",
]

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
"""Field names that hold the reasoning, in the order a template is searched for one."""

EventKind = Literal["open", "chunk", "close"]


ParseEvent = tuple[EventKind, str, Any]
"""``(kind, field, payload)``: a region opened (payload ``None``), a piece of text written into
it (the text), or the region closed (its parsed value). Plain tuples: one is made per token."""


# ---- the template, compiled ------------------------------------------------------------------

# Every Unicode White_Space character, so the probes below see any space a pattern could start on.
_SPACES = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
           "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_ASCII = "".join(map(chr, range(128)))
# Pattern constructs that can match characters the probes do not try.
_OPEN_ENDED = ("\\u", "\\U", "\\x", "\\N", "\\p", "\\P", "\\S", "\\W", "\\w", "\\D", "\\d", "[^",
               ".", "(?i", "(?u", "\\X")


def _char_class(chars: Iterable[str]) -> str:
    return "[" + "".join(re.escape(c) for c in sorted(chars)) + "]"


def _pattern_trigger(pattern: Any, source: str) -> str | None:
    """A regex over single characters that finds every place where ``pattern`` could start a
    match or a still-growing partial match, or ``None`` when that cannot be worked out (then
    the parser scans every piece in full). Found by probing the pattern with the characters it
    could start on: its own literal characters, ASCII and the Unicode spaces."""
    if pattern.match("") is not None or any(c in source for c in _OPEN_ENDED):
        return None
    literal = set(source)
    probes = set(_ASCII) | literal | set(_SPACES)
    starts = {c for c in probes if pattern.match(c, partial=True) is not None}
    solid = {c for c in starts if not c.isspace()}
    if not solid <= literal:
        return None
    spaces = starts - solid
    parts = [_char_class(solid)] if solid else []
    if spaces:
        # A run of spaces matters only when what follows it could continue a match (or the
        # piece ends, and the next one might).
        after = {c for c in probes if not c.isspace() for w in spaces for n in (1, 2, 3)
                 if pattern.match(w * n + c, partial=True) is not None}
        if not after <= literal:
            return None
        follow = after | {c for c in literal if not c.isspace()}
        parts.append(_char_class(spaces) + "+(?:" + _char_class(follow) + r"|\Z)")
    return "|".join(parts) if parts else None


@dataclass(frozen=True, slots=True)
class Delimiter:
    """One ``open``/``close`` of a region (or the ``start_anchor``), compiled."""

    pattern: Any
    """A compiled ``regex`` pattern (the ``regex`` module matches partially; ``re`` cannot)."""
    literals: tuple[str, ...] | None
    """The literal strings, when the delimiter is literal: a complete one cannot grow."""
    can_extend: bool
    """One literal is a strict prefix of another, so a match at the end may still grow."""
    trigger: str | None
    """Where a match could start (see :func:`_pattern_trigger`); ``None``: anywhere."""

    @classmethod
    def build(cls, scope: str, spec: Mapping[str, Any], literal_key: str,
              pattern_key: str) -> Delimiter | None:
        if literal_key in spec and pattern_key in spec:
            raise ConfigError(f"{scope}: give {literal_key!r} or {pattern_key!r}, not both")
        if literal_key in spec:
            raw = spec[literal_key]
            literals = [raw] if isinstance(raw, str) else raw
            if not isinstance(literals, list) or not literals \
                    or not all(isinstance(s, str) and s for s in literals):
                raise ConfigError(f"{scope}: {literal_key!r} must be a non-empty string or a "
                                  "non-empty list of them")
            unique = tuple(dict.fromkeys(literals))
            ordered = sorted(unique, key=len, reverse=True)  # the longer alternative wins
            return cls(pattern=regex.compile("|".join(regex.escape(s) for s in ordered),
                                             regex.DOTALL),
                       literals=unique,
                       can_extend=any(a != b and a.startswith(b) for a in unique for b in unique),
                       trigger=_char_class({s[0] for s in unique}))
        if pattern_key in spec:
            source = spec[pattern_key]
            if not isinstance(source, str):
                raise ConfigError(f"{scope}: {pattern_key!r} must be a string")
            try:
                compiled = regex.compile(source, regex.DOTALL)
            except regex.error as exc:
                raise ConfigError(f"{scope}: {pattern_key!r} is not a valid regex: {exc}") from exc
            return cls(pattern=compiled, literals=None, can_extend=False,
                       trigger=_pattern_trigger(compiled, source))
        return None


@dataclass(frozen=True, slots=True)
class TemplateField:
    """One region of the output and what its text becomes."""

    name: str
    open: Delimiter | None
    close: Delimiter | None
    content: str
    content_args: Mapping[str, Any]
    repeats: bool
    join: str | None
    optional: bool
    transform: Any
    transform_each: bool

    @property
    def streamable(self) -> bool:
        """Its chunks are pieces of its value (text), not markup parsed when it closes."""
        return self.content in STREAMABLE

    def value(self, body: str, captures: Mapping[str, str]) -> Any:
        parsed = parse_content(body, self.content, self.content_args)
        if self.transform is None:
            return parsed
        if not self.transform_each:
            return apply_transform(self.transform, {**captures, "content": parsed})
        if not isinstance(parsed, list) or not all(isinstance(i, dict) for i in parsed):
            raise ValueError(f"field {self.name!r}: transform_each needs a list of objects")
        return [apply_transform(self.transform, {**captures, **item}) for item in parsed]


_FIELD_KEYS = frozenset({"open", "open_pattern", "close", "close_pattern", "content",
                         "content_args", "repeats", "join", "optional", "transform",
                         "transform_each"})
_TEMPLATE_KEYS = frozenset({"version", "defaults", "fields", "start_anchor",
                            "start_anchor_pattern"})
SPECTHINK_KEY = "specthink"
"""The key of what specthink adds to a response template (the built-ins' ``call_opener``):
read here, kept out of ``ResponseTemplate.spec``, which stays the template other executors
(transformers' ``parse_response``) read."""


def _build_field(name: str, spec: Any) -> TemplateField:
    scope = f"response_template field {name!r}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{scope} must be an object")
    if unknown := set(spec) - _FIELD_KEYS:
        raise ConfigError(f"{scope}: unknown keys {sorted(unknown)}")
    content = spec.get("content", "text")
    if content not in CONTENT_PARSERS:
        raise ConfigError(f"{scope}: content parser {content!r} is not supported here; "
                          f"use one of {sorted(CONTENT_PARSERS)}")
    opener = Delimiter.build(scope, spec, "open", "open_pattern")
    closer = Delimiter.build(scope, spec, "close", "close_pattern")
    join = spec.get("join")
    if join is not None and (not isinstance(join, str) or not spec.get("repeats", False)):
        raise ConfigError(f"{scope}: 'join' must be a string, on a field that 'repeats'")
    transform = spec.get("transform")
    transform_each = spec.get("transform_each", False)
    if not isinstance(transform_each, bool) or (transform_each and transform is None):
        raise ConfigError(f"{scope}: 'transform_each' is a bool and needs a 'transform'")
    if transform is not None and (problem := transform_problem(transform)):
        raise ConfigError(f"{scope}: {problem}")
    if transform is None:
        named = {g for d in (opener, closer) if d is not None for g in d.pattern.groupindex}
        if named:
            raise ConfigError(f"{scope}: the named groups {sorted(named)} reach the output only "
                              "through a 'transform'")
    return TemplateField(name=name, open=opener, close=closer, content=content,
                         content_args=spec.get("content_args", {}),
                         repeats=bool(spec.get("repeats", False)), join=join,
                         optional=bool(spec.get("optional", True)), transform=transform,
                         transform_each=transform_each)


@dataclass(frozen=True, slots=True)
class ResponseTemplate:
    """A response template, validated and compiled once; ``spec`` is the dict it came from."""

    spec: Mapping[str, Any]
    defaults: Mapping[str, Any]
    fields: Mapping[str, TemplateField]
    implicit: str | None
    """The field without an opener: text outside every other region goes there."""
    start_anchor: Delimiter
    triggers: Mapping[str | None, re.Pattern[str] | None]
    """Per current region (``None``: none open), where a delimiter it watches could start."""
    call_opener: CallOpener | None = None
    """How the engine begins a required call in this format (the template's
    ``specthink.call_opener``); ``None``: it cannot, and ``tool_choice`` "required" or a named
    function is refused."""
    marker_tokens: tuple[str, ...] = ()
    """The texts shaped like special tokens that the output is split on (harmony's
    ``<|channel|>`` and ``<|end|>``, Mistral's ``[THINK]``, Gemma 4's ``<|channel>`` and
    ``<|"|>``; :func:`marker_tokens`): what a server that keeps only the special tokens a
    request names is sent (llama.cpp's ``preserved_tokens``)."""
    required_markers: tuple[str, ...] = ()
    """Those of :attr:`marker_tokens` whose loss changes the split (every opener and the
    reasoning's closers, not a call's or the answer's closer, which may be the stop token): a
    server that drops special tokens' text (llama-cpp-python's) must keep these as text."""

    @property
    def reasoning_field(self) -> str | None:
        return next((n for n in REASONING_FIELDS if n in self.fields), None)

    @property
    def tool_calls_field(self) -> TemplateField | None:
        return self.fields.get("tool_calls")

    def starts_in_reasoning(self, prompt: str) -> bool:
        """Whether the output after ``prompt`` begins inside the reasoning: the prompt's tail
        (after the last start anchor) opens it and does not close it (DeepSeek-R1 and Qwen3.5
        generation prompts end with an opening ``<think>``; Qwen3.5's with thinking off closes
        it again)."""
        reasoning = self.reasoning_field
        return reasoning is not None and ResponseParser(self, prompt).current == reasoning

    def closes_reasoning(self, prompt: str) -> bool:
        """Whether the prompt's assistant turn (after the last start anchor) already holds a
        whole reasoning, opened and closed: the template's thinking switch is off (Qwen3's
        ``<think>\n\n</think>``, Gemma 4's empty ``<|channel>thought\n<channel|>``), so the
        model answers at once."""
        reasoning = self.reasoning_field
        if reasoning is None:
            return False
        events = ResponseParser(self, prompt, malformed="text").initial_events
        return any(kind == "close" and name == reasoning for kind, name, _ in events)

    @property
    def reasoning_closers(self) -> tuple[str, ...]:
        """The literal texts that end the reasoning (where ``scope="thinking"`` and reasoning
        budgets stop), or ``()`` when the template gives a pattern or has no reasoning."""
        name = self.reasoning_field
        close = self.fields[name].close if name is not None else None
        return close.literals or () if close is not None else ()

    def assistant_tail(self, prompt: str) -> str:
        """What the prompt already wrote of the assistant turn: the text after the last start
        anchor (all of it when the anchor does not occur)."""
        end = None
        for m in self.start_anchor.pattern.finditer(prompt):
            end = m.end()
        return prompt if end is None else prompt[end:]

    def watched(self, current: str | None) -> list[tuple[bool, TemplateField, Delimiter]]:
        """``(is_open, field, delimiter)`` that can end or start a region while ``current`` is
        the region being written: its close, or (outside any explicit region) every opener and
        the implicit field's close."""
        if current is not None and current != self.implicit:
            field = self.fields[current]
            return [] if field.close is None else [(False, field, field.close)]
        watch = [(True, f, f.open) for f in self.fields.values() if f.open is not None]
        if self.implicit is not None and (impl := self.fields[self.implicit]).close is not None:
            watch.append((False, impl, impl.close))
        return watch


def load_template(spec: Mapping[str, Any] | ResponseTemplate) -> ResponseTemplate:
    """Validate and compile a response template; a bad one is a :class:`ConfigError` naming
    what is wrong."""
    if isinstance(spec, ResponseTemplate):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a response_template is an object, not {type(spec).__name__}")
    if spec.get("version", 1) != 1:
        raise ConfigError(f"response_template version {spec.get('version')!r} is not supported "
                          "(only version 1)")
    if unknown := set(spec) - _TEMPLATE_KEYS - {SPECTHINK_KEY}:
        raise ConfigError(f"response_template: unknown keys {sorted(unknown)}")
    opener = _call_opener(spec.get(SPECTHINK_KEY))
    spec = {key: value for key, value in spec.items() if key != SPECTHINK_KEY}
    defaults = spec.get("defaults", {})
    raw_fields = spec.get("fields")
    if not isinstance(defaults, Mapping):
        raise ConfigError("response_template 'defaults' must be an object")
    if not isinstance(raw_fields, Mapping) or not raw_fields:
        raise ConfigError("response_template 'fields' must be a non-empty object")
    fields = {name: _build_field(name, raw) for name, raw in raw_fields.items()}
    implicit = [name for name, f in fields.items() if f.open is None]
    if len(implicit) > 1:
        raise ConfigError("response_template: at most one field may have no 'open'/'open_pattern'"
                          f"; found {implicit}")
    anchor = Delimiter.build("response_template", spec, "start_anchor", "start_anchor_pattern")
    if anchor is None:
        raise ConfigError("response_template needs a 'start_anchor' or 'start_anchor_pattern'")
    template = ResponseTemplate(spec=copy.deepcopy(dict(spec)), defaults=copy.deepcopy(defaults),
                                fields=fields, implicit=implicit[0] if implicit else None,
                                start_anchor=anchor, triggers={}, call_opener=opener,
                                marker_tokens=marker_tokens(spec),
                                required_markers=marker_tokens(spec, required=True))
    triggers: dict[str | None, re.Pattern[str] | None] = {}
    for current in (None, *fields):
        parts = [d.trigger for _, _, d in template.watched(current)]
        triggers[current] = (None if any(p is None for p in parts)
                             else re.compile("|".join(f"(?:{p})" for p in parts) or r"(?!)"))
    object.__setattr__(template, "triggers", triggers)
    return template


_MARKER_SHAPES = re.compile(
    r"<\|[^<>\s|]*\|>"        # harmony, ChatML: <|channel|>, <|im_end|>; Gemma 4's <|"|>
    r"|<\|[^<>\s|]+>"          # Gemma 4 openers: <|channel>, <|tool_call>
    r"|<[^<>\s|]+\|>"          # Gemma 4 closers: <channel|>, <tool_call|>
    r"|<\uff5c[^<>\uff5c]+\uff5c>"  # DeepSeek: <｜end▁of▁sentence｜>
    r"|\[/?[A-Z][A-Z_]*\]"     # Mistral: [THINK], [/THINK], [TOOL_CALLS], [ARGS]
    r"|</?[A-Za-z_][\w.]*>")   # <think>, </think>, <tool_call>, </s>, <eos>
"""The shapes the families' special tokens take. Over-matching costs nothing: llama.cpp keeps a
``preserved_tokens`` string only when it is one token, and an ordinary token's text is never
dropped anyway."""


def marker_tokens(spec: Mapping[str, Any], *, required: bool = False) -> tuple[str, ...]:
    """The texts shaped like special tokens (:data:`_MARKER_SHAPES`) that a response template
    splits a model's output on, in order of appearance, each once: every field's opener, the
    closers of the fields with one, and content arguments (Gemma 4's ``<|"|>`` strings). Left
    out: the start anchor (the prompt's) and what only closes the field without an opener
    (the end of the output). ``required``: only those whose loss changes the split, so
    not the closers of fields other than the reasoning, which may be the stop token (gpt-oss's
    ``<|call|>`` and ``<|return|>``, Granite's ``<|end_of_text|>``; a missing one ends the
    field at the end of the output). A pattern is read with its escapes undone
    (``<\\|channel\\|>`` is ``<|channel|>``) and its named groups left out."""
    texts: list[str] = []

    def walk(value: object, key: str = "") -> None:
        if isinstance(value, str):
            if key.endswith("pattern"):
                value = re.sub(r"\\([^\w\s])", r"\1", re.sub(r"\(\?P<\w+>", "(", value))
            texts.append(value)
        elif isinstance(value, Mapping):
            for name, inner in value.items():
                walk(inner, str(name))
        elif isinstance(value, list | tuple):
            for inner in value:
                walk(inner, key)

    fields = spec.get("fields")
    for name, field in fields.items() if isinstance(fields, Mapping) else ():
        if not isinstance(field, Mapping):
            continue
        implicit = "open" not in field and "open_pattern" not in field
        closes = not implicit and (not required or name in REASONING_FIELDS)
        for key in ("open", "open_pattern", "content_args",
                    *(("close", "close_pattern") if closes else ())):
            walk(field.get(key), key)
    found = (m.group() for text in texts for m in _MARKER_SHAPES.finditer(text))
    return tuple(dict.fromkeys(found))


def _call_opener(extra: Any) -> CallOpener | None:
    if extra is None:
        return None
    if not isinstance(extra, Mapping) or set(extra) - {"call_opener"}:
        raise ConfigError(f"response_template {SPECTHINK_KEY!r}: an object whose only key is "
                          "'call_opener'")
    if "call_opener" not in extra:
        return None
    try:
        return CallOpener.from_spec(dict(extra["call_opener"])
                                    if isinstance(extra["call_opener"], Mapping)
                                    else extra["call_opener"])
    except ValueError as exc:
        raise ConfigError(f"response_template '{SPECTHINK_KEY}.call_opener': {exc}") from exc


# ---- the executor ----------------------------------------------------------------------------

def _tool_params(tools: Iterable[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for tool in tools or ():
        fn = tool.get("function", tool)
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, Mapping) else None
            out[fn["name"]] = props if isinstance(props, Mapping) else {}
    return out


class ResponseParser:
    """Execute a response template on a stream of text pieces.

    ``prefix`` is the prompt sent to the model: the part of the assistant turn it already wrote
    (after the template's last ``start_anchor``, e.g. an opening ``<think>``) is read first, so
    :attr:`current` tells whether the output starts inside the reasoning. ``tools`` (OpenAI tool
    objects) cast call arguments to the types their schemas name.

    :meth:`feed` returns :data:`ParseEvent` s; text that may still turn into a delimiter is
    held until the next piece settles it (or :meth:`finalize`).

    ``malformed="text"`` keeps a region whose content cannot be parsed (a call with broken
    JSON) as text of the field outside the regions, delimiters included, instead of raising as
    the format's reference does: a model's malformed call is shown, not lost.
    """

    __slots__ = ("_body", "_buf", "_captures", "_current", "_done", "_lenient", "_opened",
                 "_opening", "_output", "_params", "_template", "_trigger", "initial_events")

    def __init__(self, template: Mapping[str, Any] | ResponseTemplate, prefix: str = "", *,
                 tools: Iterable[Mapping[str, Any]] | None = None,
                 malformed: Literal["raise", "text"] = "raise") -> None:
        self._template = load_template(template)
        self._lenient = malformed == "text"
        self._opening = ""
        self._params = _tool_params(tools)
        self._buf = ""
        self._output: dict[str, Any] = copy.deepcopy(dict(self._template.defaults))
        self._current: str | None = self._template.implicit
        self._trigger = self._template.triggers[self._current]
        self._captures: dict[str, str] = {}
        self._body: list[str] = []
        self._opened = False
        self._done = False
        self.initial_events: list[ParseEvent] = []
        if tail := self._template.assistant_tail(prefix):
            self._buf = tail
            self._process(self.initial_events, eos=False)

    @property
    def template(self) -> ResponseTemplate:
        return self._template

    @property
    def current(self) -> str | None:
        """The region being written now (the implicit field, or ``None``, outside the others)."""
        return self._current

    def feed(self, text: str) -> list[ParseEvent]:
        # The common case, a piece that cannot start a delimiter with nothing held before it,
        # goes straight to the region being written (one piece per token: kept lean).
        if self._opened and not self._buf and (trigger := self._trigger) is not None \
                and trigger.search(text) is None and not self._done and text:
            self._body.append(text)
            return [("chunk", self._current, text)]  # type: ignore[list-item]
        if self._done:
            raise RuntimeError("ResponseParser already finalized")
        events: list[ParseEvent] = []
        self._buf += text
        self._process(events, eos=False)
        return events

    def finalize(self) -> tuple[dict[str, Any], list[ParseEvent]]:
        """End of the output: close what is open; the parsed message and the last events."""
        if self._done:
            raise RuntimeError("ResponseParser already finalized")
        events: list[ParseEvent] = []
        self._process(events, eos=True)
        self._done = True
        missing = [n for n, f in self._template.fields.items()
                   if not f.optional and n not in self._output]
        if missing:
            raise ValueError(f"the response lacks the required fields {missing}")
        defaults = self._template.defaults
        self._output = {k: v for k, v in self._output.items()
                        if k in defaults or not (v is None or (isinstance(v, (list, dict, str))
                                                               and not v))}
        return self._output, events

    # The scan below is the format's region algorithm (transformers' ``ResponseParser``):
    # commit the earliest complete delimiter that nothing pending precedes, hold text from the
    # first delimiter that may still be completing.
    def _process(self, events: list[ParseEvent], eos: bool) -> None:
        pos = 0
        while True:
            best, hold = self._scan(pos, eos)
            if best is not None:
                is_open, field, m = best
                if m.start() > pos:
                    self._accumulate(events, self._buf[pos:m.start()])
                pos = m.end()
                if is_open:
                    self._close(events)
                    self._open(events, field, m)
                else:
                    had_content = self._opened
                    self._captures.update({k: v for k, v in m.groupdict().items()
                                           if v is not None})
                    self._close(events, m.group(0))
                    if not had_content and m.start() == m.end():
                        break  # a zero-width close of an empty region would fire forever
                continue
            if eos:
                if pos < len(self._buf):
                    self._accumulate(events, self._buf[pos:])
                    pos = len(self._buf)
                self._close(events)
                if self._opened:  # a malformed region just turned into text of the implicit one
                    self._close(events)
                break
            if hold > pos:
                self._accumulate(events, self._buf[pos:hold])
                pos = hold
            break
        self._buf = self._buf[pos:]

    def _scan(self, pos: int, eos: bool) -> tuple[tuple[bool, TemplateField, Any] | None, int]:
        buf = self._buf
        best_key: tuple[int, int, int, str] | None = None
        best: tuple[bool, TemplateField, Any] | None = None
        hold = len(buf)
        for is_open, field, delim in self._template.watched(self._current):
            m = delim.pattern.search(buf, pos, partial=not eos)
            if m is None:
                continue
            if not eos and (m.partial or self._can_grow(delim, m)):
                hold = min(hold, m.start())
                continue
            key = (m.start(), m.start() - m.end(), 0 if is_open else 1, field.name)
            if best_key is None or key < best_key:
                best_key, best = key, (is_open, field, m)
        if best is not None and best[2].start() >= hold:
            best = None
        return best, hold

    def _can_grow(self, delim: Delimiter, m: Any) -> bool:
        """Whether a complete match could still change as more text arrives."""
        if m.end() != len(self._buf):
            if delim.literals is not None:
                return False
            # A regex may lean on the end of the text ($, \Z in a lookahead): it is final only
            # if it survives the text going on.
            extended = delim.pattern.match(self._buf + "\x00", m.start())
            return (extended is None or extended.span() != m.span()
                    or extended.groupdict() != m.groupdict())
        if m.start() == m.end():
            return True
        return delim.literals is None or delim.can_extend

    def _accumulate(self, events: list[ParseEvent], text: str) -> None:
        if not text or self._current is None:
            return  # outside every region with no implicit field: dropped, as the format says
        if not self._opened:
            events.append(("open", self._current, None))
            self._opened = True
        self._body.append(text)
        events.append(("chunk", self._current, text))

    def _open(self, events: list[ParseEvent], field: TemplateField, m: Any) -> None:
        self._current = field.name
        self._trigger = self._template.triggers[field.name]
        self._captures = {k: v for k, v in m.groupdict().items() if v is not None}
        self._body = []
        self._opened = True
        self._opening = m.group(0)
        events.append(("open", field.name, None))

    def _close(self, events: list[ParseEvent], closing: str = "") -> None:
        name = self._current
        if name is not None and self._opened:
            field = self._template.fields[name]
            try:
                value = field.value("".join(self._body), self._captures)
            except ValueError:
                if not self._lenient or name == self._template.implicit:
                    raise
                raw = self._opening + "".join(self._body) + closing
                self._reset()
                self._accumulate(events, raw)
                return
            if self._params and "value_parser_by" not in field.content_args:
                value = coerce_tool_calls(value, self._params, typed=field.content in TYPED)
            if field.join is not None:
                if not isinstance(value, str):
                    raise ValueError(f"field {name!r}: 'join' needs string values")
                previous = self._output.get(name)
                self._output[name] = value if previous is None else previous + field.join + value
            elif field.repeats:
                self._output.setdefault(name, []).append(value)
            else:
                self._output[name] = value
            events.append(("close", name, value))
        self._reset()

    def _reset(self) -> None:
        self._current = self._template.implicit
        self._trigger = self._template.triggers[self._current]
        self._captures = {}
        self._body = []
        self._opened = False
        self._opening = ""


def parse_response(text: str, template: Mapping[str, Any] | ResponseTemplate, *,
                   prefix: str = "",
                   tools: Iterable[Mapping[str, Any]] | None = None,
                   malformed: Literal["raise", "text"] = "raise") -> dict[str, Any]:
    """A whole output parsed at once: the assistant message the template describes."""
    parser = ResponseParser(template, prefix, tools=tools, malformed=malformed)
    parser.feed(text)
    return parser.finalize()[0]
