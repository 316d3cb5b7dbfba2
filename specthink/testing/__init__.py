"""Offline doubles for tests, benchmarks and examples: deterministic "models" and a server on
loopback that speaks TGI's protocol, or vLLM's, llama.cpp's or llama-cpp-python's.

The server needs the ``testing`` extra (starlette, uvicorn); it is imported on first use, so the
models work without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from specthink.testing._templates import JinjaChatTemplate
from specthink.testing.models import (
    ASSISTANT_MARKERS,
    Continuation,
    EchoModel,
    RoutedModel,
    Script,
    ScriptedModel,
    TextModel,
    ThinkingModel,
    Tokenizer,
    assistant_text,
    last_user_message,
)

if TYPE_CHECKING:
    from specthink.testing.server import (
        CallRecord,
        Fault,
        LatencyModel,
        LoopbackServer,
        PrefixCache,
        RequestRecord,
        render_chatml,
    )

_SERVER_NAMES = frozenset({"CallRecord", "Fault", "LatencyModel", "LoopbackServer", "PrefixCache",
                           "RequestRecord", "render_chatml"})

__all__ = [
    "ASSISTANT_MARKERS",
    "CallRecord",
    "Continuation",
    "EchoModel",
    "Fault",
    "JinjaChatTemplate",
    "LatencyModel",
    "LoopbackServer",
    "PrefixCache",
    "RequestRecord",
    "RoutedModel",
    "Script",
    "ScriptedModel",
    "TextModel",
    "ThinkingModel",
    "Tokenizer",
    "assistant_text",
    "last_user_message",
    "render_chatml",
]


def __getattr__(name: str) -> Any:
    if name not in _SERVER_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        server = importlib.import_module("specthink.testing.server")
    except ImportError as exc:
        raise ImportError(f"specthink.testing.{name} needs the testing extra: "
                          "pip install 'specthink[testing]'") from exc
    return getattr(server, name)
