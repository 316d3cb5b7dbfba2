"""``specthink._json``: nesting limits checked without recursion, used by the core's tool and
response-format checks, so every surface (serve, LangChain, LlamaIndex) refuses deep JSON with
a ``ConfigError`` naming the field instead of a ``RecursionError``."""

from __future__ import annotations

import pytest

from specthink import prompts
from specthink._json import MAX_JSON_DEPTH, depth_exceeds
from specthink.errors import ConfigError
from specthink.structured import json_instruction


def nested(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def test_depth_is_measured_without_recursion_at_any_depth() -> None:
    """Broken: measuring 100,000 levels itself overflows Python's stack."""
    assert depth_exceeds(nested(100_000))
    assert not depth_exceeds(nested(MAX_JSON_DEPTH))
    assert depth_exceeds(nested(MAX_JSON_DEPTH + 1))
    assert not depth_exceeds({"a": [1, 2, {"b": "c"}]}, limit=3)
    assert depth_exceeds({"a": [1, 2, {"b": []}]}, limit=3)


def test_deep_tool_parameters_and_schemas_are_config_errors_naming_the_field() -> None:
    """Broken: a tool or a json_schema nested 1,000 levels is a RecursionError from
    json.dumps or a template, far from the field that caused it."""
    tool = {"type": "function", "function": {"name": "f", "parameters": nested(1_000)}}
    with pytest.raises(ConfigError, match=r"tools\[1\]"):
        prompts.validate_tools([{"type": "function", "function": {"name": "ok"}}, tool])
    deep_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": nested(1_000)}}
    with pytest.raises(ConfigError, match="response_format"):
        json_instruction(deep_schema)
