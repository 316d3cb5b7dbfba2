"""LangChain integration (in progress)."""
