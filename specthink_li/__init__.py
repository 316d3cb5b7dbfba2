"""specthink for LlamaIndex: ``SpeculativeThinkingLLM``, a drop-in ``FunctionCallingLLM``.

>>> from llama_index.core import Settings
>>> from specthink_li import SpeculativeThinkingLLM
>>> Settings.llm = SpeculativeThinkingLLM(small_url=..., target_url=...)
"""

from ._tools import NoToolCallError
from .llm import SpeculativeThinkingLLM

__all__ = ["NoToolCallError", "SpeculativeThinkingLLM"]
