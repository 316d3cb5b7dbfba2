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
    PromptTooLongError,
    SpecthinkError,
    StreamDroppedError,
    StreamErrorEvent,
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
    "PromptTooLongError",
    "Result",
    "Rule",
    "SpecthinkError",
    "SpeculativeThinker",
    "Statistics",
    "StreamDroppedError",
    "StreamErrorEvent",
    "TakeoverEvent",
    "TakeoverPolicy",
    "TakeoverRules",
    "TargetFallbackWarning",
    "TextEvent",
]

__version__ = _constants.VERSION
