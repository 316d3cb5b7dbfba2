"""A LlamaIndex chat engine: the history of the conversation goes with every turn, and the last
answer streams in as speculative thinking writes it.

    python examples/li_chat_engine.py
"""

from __future__ import annotations

from typing import Any

from llama_index.core.chat_engine import SimpleChatEngine

from specthink_li import SpeculativeThinkingLLM


def main(small_url: str, target_url: str, **options: Any) -> list[str]:
    llm = SpeculativeThinkingLLM(small_url=small_url, target_url=target_url,
                                 temperature=0, max_tokens=512, **options)
    engine = SimpleChatEngine.from_defaults(
        llm=llm, system_prompt="You are a friendly assistant. Answer in one sentence.")
    replies = []
    for turn in ("My name is Ada and I like prime numbers.", "Is 221 a prime number?"):
        print(f"you: {turn}")
        reply = str(engine.chat(turn))
        print(f"assistant: {reply}")
        replies.append(reply)

    turn = "What is my name?"
    print(f"you: {turn}\nassistant: ", end="")
    streaming = engine.stream_chat(turn)
    pieces = []
    for piece in streaming.response_gen:  # only the answer: the reasoning is not streamed here
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    replies.append("".join(pieces))
    print(f"({len(engine.chat_history)} messages in the history)")
    llm.close()
    return replies


if __name__ == "__main__":
    from server_settings import server_settings

    small, target, settings = server_settings()
    main(small, target, **settings)
