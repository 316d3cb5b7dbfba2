"""LlamaIndex integration (in progress)."""
