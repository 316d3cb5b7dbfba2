"""Token counts read from a tokenizer's answer as it streams in, never parsed whole.

A tokenizer endpoint answers a 4 MB prompt with every token: TGI's ``/tokenize`` with an
object per token (~80 MB of JSON for a million tokens), vLLM's with the whole id list after its
``count``. Parsed at once, that answer costs a gigabyte of Python objects and seconds of the
event loop, during which every other stream of the process stands still. These readers look
at one network read at a time (tens of KB), so memory stays flat and other streams run between
reads.
"""

from __future__ import annotations

import re

from specthink.backends._connection import ResponseBody

__all__ = ["count_occurrences", "int_field"]


async def count_occurrences(body: ResponseBody, needle: bytes) -> int:
    """How many times ``needle`` occurs in the body (read to its end, then closed).

    For TGI's ``/tokenize`` answer, ``[{"id":..,"text":..,..}, ...]``, ``b'"id":'`` counts the
    tokens: JSON escapes every quote inside a string, so a key followed by a colon cannot occur
    inside one.
    """
    count = 0
    tail = b""
    keep = len(needle) - 1
    try:
        while (chunk := await body.next_chunk(None)) is not None:
            data = tail + chunk
            count += data.count(needle)
            # An occurrence split across two reads is found in the joined bytes; the kept tail
            # is too short to hold a whole one, so none is counted twice.
            tail = data[-keep:] if keep else b""
    finally:
        await body.aclose()
    return count


_MAX_PREFIX = 4096
"""How far into an answer a field the server writes first is looked for."""


async def int_field(body: ResponseBody, name: str) -> int | None:
    """The integer value of the top-level field ``name`` when the server writes it within the
    answer's first bytes (vLLM's ``/tokenize``: ``{"count": N, ..., "tokens": [...]}``);
    ``None`` if it is not there. The rest is never read: closing the body closes the
    connection."""
    pattern = re.compile(rb'^\s*\{\s*"' + re.escape(name.encode()) + rb'"\s*:\s*(-?\d+)\s*[,}]')
    seen = b""
    try:
        while (chunk := await body.next_chunk(None)) is not None:
            seen += chunk
            found = pattern.match(seen)
            if found:
                return int(found.group(1))
            if len(seen) > _MAX_PREFIX:
                return None
        return None
    finally:
        await body.aclose()
