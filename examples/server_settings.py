"""Where the examples (LangChain and LlamaIndex alike) find their two servers.

``SPECTHINK_SMALL_URL`` / ``SPECTHINK_TARGET_URL`` (and ``SPECTHINK_BACKEND``, default ``tgi``)
name your servers. Without them the examples use the local CPU pair that ``specthink local up``
starts: llama.cpp's OpenAI-compatible server on ports 8031 and 8032, serving SmolLM2-135M in
both roles. That pair only demonstrates the mechanics; expect weak answers from a 135M model.
"""

from __future__ import annotations

import os
from typing import Any

from specthink.local import DEFAULT_PORTS, LOCAL_PAIR_NOTE


def server_settings() -> tuple[str, str, dict[str, Any]]:
    """``(small_url, target_url, options)`` for ``ChatSpeculativeThinking`` or
    ``SpeculativeThinkingLLM`` (both take the same arguments)."""
    small = os.environ.get("SPECTHINK_SMALL_URL")
    target = os.environ.get("SPECTHINK_TARGET_URL")
    if small and target:
        return small, target, {"backend": os.environ.get("SPECTHINK_BACKEND", "tgi")}
    print(f"(no SPECTHINK_SMALL_URL/SPECTHINK_TARGET_URL: using the local pair. {LOCAL_PAIR_NOTE})")
    # SmolLM2-Instruct does not reason, hence the instruct preset (the target writes the
    # opening and takes over at every paragraph), and its template is ChatML.
    return (f"http://127.0.0.1:{DEFAULT_PORTS['small']}",
            f"http://127.0.0.1:{DEFAULT_PORTS['target']}",
            {"backend": "openai", "rules": "paper_instruct", "small_template": "chatml",
             "target_template": "chatml"})
