"""Limits on JSON a caller sends, checked without recursion.

JSON parsers admit deep nesting (orjson up to 1,024 levels) but much that reads the result
recurses: pydantic, ``json.dumps``, Jinja's ``tojson`` in a chat template, a grammar compiler.
A tool's parameters or a response schema nested a thousand levels deep would end in a
``RecursionError`` there; :func:`check_depth` refuses it first, walking with a stack of its own.
"""

from __future__ import annotations

from typing import Any

from specthink.errors import ConfigError

__all__ = ["MAX_JSON_DEPTH", "check_depth", "depth_exceeds"]

MAX_JSON_DEPTH = 64
"""Levels of objects and arrays a field may nest; real tool schemas and response formats use a
handful, and every surface stays far from Python's recursion limit (1,000 frames)."""


def depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` levels deep (a scalar is
    level 0, ``{"a": 1}`` level 1). Iterative: it never recurses, whatever the depth."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list | tuple))
    return False


def check_depth(value: Any, field: str, limit: int = MAX_JSON_DEPTH) -> None:
    """A ``ConfigError`` naming ``field`` when ``value`` nests deeper than ``limit``."""
    if depth_exceeds(value, limit):
        raise ConfigError(f"{field}: JSON nested more than {limit} levels deep")
