"""Offline doubles for tests, benchmarks and examples: deterministic "models" and a
TGI-protocol server on loopback (the server needs the ``testing`` extra: starlette, uvicorn)."""

from specthink.testing.models import (
    ASSISTANT_MARKERS,
    Continuation,
    EchoModel,
    RoutedModel,
    Script,
    ScriptedModel,
    TextModel,
    Tokenizer,
    assistant_text,
    last_user_message,
)
from specthink.testing.server import (
    Fault,
    LatencyModel,
    LoopbackServer,
    PrefixCache,
    RequestRecord,
    render_chatml,
)

__all__ = [
    "ASSISTANT_MARKERS",
    "Continuation",
    "EchoModel",
    "Fault",
    "LatencyModel",
    "LoopbackServer",
    "PrefixCache",
    "RequestRecord",
    "RoutedModel",
    "Script",
    "ScriptedModel",
    "TextModel",
    "Tokenizer",
    "assistant_text",
    "last_user_message",
    "render_chatml",
]
