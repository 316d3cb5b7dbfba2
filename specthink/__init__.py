"""specthink: Speculative Thinking (arXiv 2504.12329) over two inference servers.

A small reasoning model writes; at paragraph breaks followed by reflection a larger model takes
over for a few tokens, then hands back.
"""

from .engine import SpeculativeThinker
from .errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    ConfigError,
    PromptTooLongError,
    SpecthinkError,
    StreamDroppedError,
    StreamErrorEvent,
    TargetFallbackWarning,
)
from .rules import TakeoverRules
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
    "ConfigError",
    "Event",
    "FallbackEvent",
    "FinishEvent",
    "PromptTooLongError",
    "Result",
    "Rule",
    "SpecthinkError",
    "SpeculativeThinker",
    "Statistics",
    "StreamDroppedError",
    "StreamErrorEvent",
    "TakeoverEvent",
    "TakeoverRules",
    "TargetFallbackWarning",
    "TextEvent",
]

__version__ = "0.1.0"

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("specthink."):
        try:
            _obj.__module__ = "specthink"
        except (AttributeError, TypeError):  # pragma: no cover - some objects refuse it
            pass
