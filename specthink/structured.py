"""OpenAI's ``response_format`` for a text model: the system sentence that shows the schema, and
the TGI grammar that enforces its form. ``ChatRequest.build`` is its one caller, whatever the
surface (LangChain's ``json_schema`` method, ``specthink serve``'s ``response_format``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from specthink._json import check_depth
from specthink.errors import ConfigError

__all__ = ["grammar_for", "json_instruction", "with_system_text"]

_TYPES = ("json_schema", "json_object", "text")


def _kind(response_format: Mapping[str, Any]) -> str:
    kind = response_format.get("type")
    if kind not in _TYPES:
        raise ConfigError(f"response_format type must be 'json_schema', 'json_object' or "
                          f"'text', got {kind!r}")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise ConfigError("response_format json_schema needs {'name': ..., 'schema': {...}}")
    return str(kind)


def _schema(response_format: Mapping[str, Any]) -> dict[str, Any]:
    # OpenAI makes "schema" optional (no schema: any JSON object).
    check_depth(response_format, "response_format")  # json.dumps below recurses
    return dict(response_format["json_schema"].get("schema") or {"type": "object"})


def json_instruction(response_format: Mapping[str, Any]) -> str | None:
    """The system sentence that shows the model the schema it must answer in.

    A text model sees only its prompt, so the schema has to be in it; a grammar (where the
    servers take one) then only guarantees the form.
    """
    if _kind(response_format) != "json_schema":
        return None
    return ("Answer with a JSON object that conforms to this JSON schema, and nothing else:\n"
            + json.dumps(_schema(response_format), ensure_ascii=False))


def grammar_for(response_format: Mapping[str, Any]) -> dict[str, Any] | None:
    """The TGI grammar for a ``response_format`` (``None`` for ``text``)."""
    kind = _kind(response_format)
    if kind == "json_schema":
        return {"type": "json", "value": _schema(response_format)}
    if kind == "json_object":
        return {"type": "json", "value": {"type": "object"}}
    return None


def with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``text`` appended to the leading system message, or as a new one."""
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{text}" if first["content"] else text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
