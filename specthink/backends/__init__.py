"""Servers the engine can drive, one module per wire protocol, all behind one protocol."""

from specthink.backends.base import Backend, SamplingParams, ServerInfo, StreamToken

__all__ = ["Backend", "SamplingParams", "ServerInfo", "StreamToken"]
