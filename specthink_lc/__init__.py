"""LangChain integration of specthink: ``ChatSpeculativeThinking``, a drop-in chat model."""

from specthink_lc.chat_models import ChatSpeculativeThinking

__all__ = ["ChatSpeculativeThinking"]
