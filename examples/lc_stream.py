"""Streaming, and who wrote what: the small model's text, the target's takeovers.

    python examples/lc_stream.py "Is 221 a prime number?"

Chunks arrive as the engine accepts text (a probe the target replaced is never streamed). The
reasoning comes as ``additional_kwargs["reasoning_content"]``, the answer as content; the last
chunk carries the usage and ``response_metadata["speculative_trace"]``, which shows each
takeover: the rule that fired and the text the target wrote.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from langchain_core.messages import AIMessageChunk

from specthink_lc import ChatSpeculativeThinking

DIM, BOLD, RESET = "\033[2m", "\033[1m", "\033[0m"


async def stream(small_url: str, target_url: str, question: str,
                 **options: Any) -> AIMessageChunk:
    model = ChatSpeculativeThinking(small_url=small_url, target_url=target_url,
                                    temperature=0, max_tokens=512, **options)
    full: AIMessageChunk | None = None
    try:
        async for chunk in model.astream(question):
            reasoning = chunk.additional_kwargs.get("reasoning_content", "")
            print(f"{DIM}{reasoning}{RESET}" if reasoning else chunk.text, end="", flush=True)
            full = chunk if full is None else full + chunk
    finally:
        await model.aclose()
    assert full is not None
    print()
    return full


def show_takeovers(message: AIMessageChunk) -> None:
    trace = message.response_metadata["speculative_trace"]
    stats = message.response_metadata["speculative_thinking"]
    print(f"\n{BOLD}who wrote what{RESET}")
    for segment in trace["segments"]:
        who = segment["source"] if segment["rule"] is None else \
            f"{segment['source']} ({segment['rule']})"
        print(f"  {who:>22}: {segment['text']!r}")
    print(f"\ntakeovers: {sum(stats['takeovers'].values())} {stats['takeovers']}; "
          f"target share {stats['target_share']:.0%}; "
          f"discarded probe tokens {stats['discarded_tokens']}; usage {message.usage_metadata}")


def main(small_url: str, target_url: str, question: str = "Is 221 a prime number?",
         **options: Any) -> AIMessageChunk:
    message = asyncio.run(stream(small_url, target_url, question, **options))
    show_takeovers(message)
    return message


if __name__ == "__main__":
    from server_settings import server_settings

    small, target, settings = server_settings()
    main(small, target, *sys.argv[1:2], **settings)
