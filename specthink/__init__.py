"""specthink: Speculative Thinking (arXiv 2504.12329) over two inference servers.

A small reasoning model writes; at paragraph breaks followed by reflection a larger model takes
over for a few tokens, then hands back.
"""

from . import _constants
from .engine import SpeculativeThinker
from .errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    ConfigError,
    InStreamError,
    PromptTooLongError,
    SpecthinkError,
    StreamDroppedError,
    TargetFallbackWarning,
)
from .request import ChatRequest
from .rules import TakeoverPolicy, TakeoverRules
from .trace import (
    Event,
    FallbackEvent,
    FinishEvent,
    Result,
    Rule,
    Statistics,
    TakeoverEvent,
    TextEvent,
)

__all__ = [
    "BackendConnectionError",
    "BackendError",
    "BackendStatusError",
    "BackendTimeoutError",
    "ChatRequest",
    "ConfigError",
    "Event",
    "FallbackEvent",
    "FinishEvent",
    "InStreamError",
    "PromptTooLongError",
    "Result",
    "Rule",
    "SpecthinkError",
    "SpeculativeThinker",
    "Statistics",
    "StreamDroppedError",
    "TakeoverEvent",
    "TakeoverPolicy",
    "TakeoverRules",
    "TargetFallbackWarning",
    "TextEvent",
]

__version__ = _constants.VERSION


def __getattr__(name: str) -> object:
    # The old names of InStreamError (StreamErrorEvent), with errors' DeprecationWarning.
    if name == "StreamErrorEvent":
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
