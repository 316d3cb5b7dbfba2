"""Servers the engine can drive, one module per wire protocol, all behind one protocol.

Build them with :func:`create` (or :func:`discover`), which validates :class:`BackendOptions`.
"""

from specthink.backends._factory import (
    BackendKind,
    BackendOptions,
    create,
    discover,
    kind_of,
    kinds,
    known_kind,
    takes_option,
)
from specthink.backends.base import Backend, SamplingParams, ServerInfo, StreamToken
from specthink.backends.openai import OpenAICompletionsBackend
from specthink.backends.tgi import TGIBackend

__all__ = [
    "Backend",
    "BackendKind",
    "BackendOptions",
    "OpenAICompletionsBackend",
    "SamplingParams",
    "ServerInfo",
    "StreamToken",
    "TGIBackend",
    "create",
    "discover",
    "kind_of",
    "kinds",
    "known_kind",
    "takes_option",
]
