"""What a closed region of a response template becomes: the content parsers, the ``transform``
and the tool-schema casts of the response-template format (version 1).

The format is transformers' (``transformers.utils.chat_parsing``, >= 5.13); these functions
follow its content parsers' documented behaviour so a template means the same here and there
(``tests/formats/test_against_transformers.py`` holds both to the same output). Only the
``python-call-list`` parser is not carried: no family specthink knows writes calls that way, and a
template asking for it is refused when loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import regex

__all__ = ["CONTENT_PARSERS", "STREAMABLE", "TYPED", "apply_transform", "coerce_tool_calls",
           "parse_content", "transform_problem"]

Parser = Callable[[str, Mapping[str, Any]], Any]


def _text(text: str, args: Mapping[str, Any]) -> str:
    return text.strip() if args.get("strip", True) else text


def _int(text: str, args: Mapping[str, Any]) -> int:
    return int(_text(text, args))


def _float(text: str, args: Mapping[str, Any]) -> float:
    return float(_text(text, args))


def _bool(text: str, args: Mapping[str, Any]) -> bool:
    return _text(text, args).lower() in ("true", "1")


# Control characters no model writes mark the strings lifted out before the JSON is read.
_LIFT_OPEN, _LIFT_CLOSE = "\x01", "\x02"
_BARE_KEYS = regex.compile(r'"(?:\\.|[^"\\])*"|(?<=[{,])(\s*)(\w+)(\s*):')


def _json(text: str, args: Mapping[str, Any]) -> Any:
    """JSON, with the dialect knobs models need: ``unquoted_keys`` (Gemma 4 writes ``{city:...}``),
    ``string_delims`` (strings between custom markers, e.g. ``<|"|>``) and ``allow_non_json``."""
    delims = args.get("string_delims", [])
    if delims and (_LIFT_OPEN in text or _LIFT_CLOSE in text):
        raise ValueError("json: the text holds the reserved characters \\x01/\\x02")
    working = text
    lifted: list[str] = []
    for open_, close in delims:
        def _lift(m: Any) -> str:
            lifted.append(m.group(1))
            return f"{_LIFT_OPEN}{len(lifted) - 1}{_LIFT_CLOSE}"
        working = regex.sub(regex.escape(open_) + r"(.*?)" + regex.escape(close), _lift, working,
                            flags=regex.DOTALL)
    if args.get("unquoted_keys", False):
        # Whole quoted strings are matched first and put back as they were, so key-like text
        # inside a value is never rewritten.
        working = _BARE_KEYS.sub(
            lambda m: m.group(0) if m.group(2) is None
            else f'{m.group(1)}"{m.group(2)}"{m.group(3)}:', working)
    for i, s in enumerate(lifted):
        working = working.replace(f"{_LIFT_OPEN}{i}{_LIFT_CLOSE}", json.dumps(s))
    try:
        return json.loads(working)
    except json.JSONDecodeError as exc:
        if args.get("allow_non_json"):
            return _text(text, args)
        raise ValueError(f"json: the region is not JSON: {text!r} ({exc})") from exc


def _sub_parse(raw: str, value_parser: Mapping[str, Any] | None) -> Any:
    if value_parser is None:
        return raw
    return parse_content(raw, value_parser.get("name", "text"), value_parser.get("args", {}))


def _xml_inline(text: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Shallow XML-ish tags (``<parameter=K>V</parameter>``) into a dict; ``tag_pattern`` names
    the groups ``key`` and ``value``."""
    tag_pattern = args.get("tag_pattern")
    if tag_pattern is None:
        raise ValueError("xml-inline: 'tag_pattern' is required")
    value_parser = args.get("value_parser")
    merge = args.get("merge_duplicates", False)
    by_group: str | None = None
    by_capture: Mapping[str, Any] = {}
    if (by := args.get("value_parser_by")) is not None:
        by_group, by_capture = by.get("group"), by.get("parsers")
        if not isinstance(by_group, str) or not isinstance(by_capture, Mapping):
            raise ValueError("xml-inline: 'value_parser_by' needs 'group' and 'parsers'")
    out: dict[str, Any] = {}
    merged: set[str] = set()
    for m in regex.finditer(tag_pattern, text, flags=regex.DOTALL):
        groups = m.groupdict()
        key = groups.get("key")
        if key is None:
            raise ValueError(f"xml-inline: tag_pattern has no group 'key': {tag_pattern}")
        parser = value_parser
        if by_group is not None:
            if by_group not in groups:
                raise ValueError(f"xml-inline: tag_pattern has no group {by_group!r}")
            parser = by_capture.get(groups[by_group], value_parser)
        value = _sub_parse(groups.get("value") or "", parser)
        if key in out and merge:
            if key not in merged:
                out[key] = [out[key]]
                merged.add(key)
            out[key].append(value)
        else:
            out[key] = value
    return out


def _kv_lines(text: str, args: Mapping[str, Any]) -> dict[str, Any]:
    line_sep = args.get("line_sep", "\n")
    kv_sep = args.get("kv_sep", ":")
    out: dict[str, Any] = {}
    for line in text.split(line_sep):
        line = _text(line, args)
        if not line or kv_sep not in line:
            continue
        k, v = line.split(kv_sep, 1)
        out[_text(k, args)] = _sub_parse(_text(v, args), args.get("value_parser"))
    return out


CONTENT_PARSERS: dict[str, Parser] = {
    "text": _text, "int": _int, "float": _float, "bool": _bool, "json": _json,
    "xml-inline": _xml_inline, "kv-lines": _kv_lines,
}
STREAMABLE = frozenset({"text", "int", "float", "bool"})
"""Parsers whose chunks are pieces of the final value; the others' chunks are raw markup."""
TYPED = frozenset({"json"})
"""Parsers whose syntax already tells strings from numbers: schema casts leave their strings be."""


def parse_content(text: str, name: str, args: Mapping[str, Any]) -> Any:
    return CONTENT_PARSERS[name](text, args)


_PLACEHOLDER = regex.compile(r"\{(\w+(?:\.\w+)*)\}")


def transform_problem(transform: Any) -> str | None:
    """Why a ``transform`` cannot be used (a placeholder mixed with literal text), or ``None``."""
    if isinstance(transform, Mapping):
        return next((p for v in transform.values() if (p := transform_problem(v))), None)
    if isinstance(transform, list):
        return next((p for v in transform if (p := transform_problem(v))), None)
    if isinstance(transform, str) and _PLACEHOLDER.search(transform) \
            and not _PLACEHOLDER.fullmatch(transform):
        return f"transform string {transform!r} mixes a {{placeholder}} with literal text"
    return None


def apply_transform(transform: Any, scope: Mapping[str, Any]) -> Any:
    """Fill a transform's whole-string ``{name}`` / ``{name.key}`` placeholders from ``scope``."""
    if isinstance(transform, Mapping):
        return {k: apply_transform(v, scope) for k, v in transform.items()}
    if isinstance(transform, list):
        return [apply_transform(v, scope) for v in transform]
    if not isinstance(transform, str) or not (whole := _PLACEHOLDER.fullmatch(transform)):
        return transform
    root, *keys = whole.group(1).split(".")
    if root not in scope:
        raise ValueError(f"transform placeholder {transform!r} is not defined; "
                         f"there are {sorted(scope)}")
    value = scope[root]
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            raise ValueError(f"transform placeholder {transform!r} has no key {key!r}")
        value = value[key]
    return value


def _schema_types(schema: Any) -> tuple[str, ...]:
    if not isinstance(schema, Mapping):
        return ()
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else []
    if isinstance(declared, list):
        types.extend(t for t in declared if isinstance(t, str))
    for union in ("anyOf", "oneOf"):
        for choice in schema.get(union) or []:
            types.extend(_schema_types(choice))
    if schema.get("nullable") and "null" not in types:
        types.append("null")
    return tuple(types)


def _cast(raw: str, types: tuple[str, ...]) -> Any:
    for name in types:
        try:
            if name == "integer":
                try:
                    return int(raw)
                except ValueError:
                    number = float(raw)  # JSON Schema integers include "3.0"
                    if number.is_integer():
                        return int(number)
                    continue
            if name == "number":
                number = float(raw)
                if number != number or number in (float("inf"), float("-inf")):
                    continue
                return int(number) if number.is_integer() and "." not in raw else number
            if name == "boolean" and raw.strip().lower() in ("true", "1", "false", "0"):
                return raw.strip().lower() in ("true", "1")
            if name == "null" and raw.strip() in ("null", "None"):
                return None
            if name in ("object", "array"):
                decoded = json.loads(raw)
                if isinstance(decoded, dict if name == "object" else list):
                    return decoded
        except ValueError:
            continue
    return raw


def coerce_tool_calls(value: Any, params: Mapping[str, Mapping[str, Any]], *,
                      typed: bool) -> Any:
    """Cast the string arguments of parsed calls to the types the offered tool's schema names
    (an XML-call ``2`` for an ``integer`` parameter becomes ``2``)."""
    if isinstance(value, list):
        return [coerce_tool_calls(item, params, typed=typed) for item in value]
    fn = value.get("function") if isinstance(value, dict) else None
    if not isinstance(fn, dict):
        return value
    name, arguments = fn.get("name"), fn.get("arguments")
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return value
    if properties := params.get(name):
        for key, argument in arguments.items():
            if key not in properties or not (types := _schema_types(properties[key])):
                continue
            if typed and "string" in types:
                continue
            if isinstance(argument, str):
                arguments[key] = _cast(argument, types)
            elif isinstance(argument, list) and "array" not in types:
                arguments[key] = [_cast(a, types) if isinstance(a, str) else a for a in argument]
    return value
