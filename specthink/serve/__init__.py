"""``specthink serve``: speculative thinking behind an OpenAI-compatible HTTP API (extra
``server``), the third thin adapter over the core after LangChain and LlamaIndex.

Modules as vLLM's entrypoints: :mod:`~specthink.serve.protocol` (the wire: request model,
response and chunk bodies), :mod:`~specthink.serve.serving` (request to engine and back),
:mod:`~specthink.serve.app` (routes, auth, limits, disconnects), ``_http`` (uvicorn's protocols
with request-head limits), :mod:`~specthink.serve.errors`
(every error answer), :mod:`~specthink.serve.metrics`, :mod:`~specthink.serve.settings` and
:mod:`~specthink.serve.cli` (the command).

>>> from specthink.serve import ServeSettings, create_app
>>> app = create_app(ServeSettings(small_url="http://small:8080", target_url="http://t:8080"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from specthink.serve.settings import ServeSettings

if TYPE_CHECKING:
    from specthink.serve.app import create_app

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # The app needs the `server` extra (starlette, prometheus-client); the settings do not.
    if name == "create_app":
        from specthink.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
