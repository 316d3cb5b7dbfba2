"""Servers the engine can drive, one module per wire protocol, all behind one protocol."""

from specthink.backends.base import Backend, SamplingParams, ServerInfo, StreamToken
from specthink.backends.openai import OpenAICompletionsBackend
from specthink.backends.tgi import TGIBackend

__all__ = [
    "Backend",
    "OpenAICompletionsBackend",
    "SamplingParams",
    "ServerInfo",
    "StreamToken",
    "TGIBackend",
]
