"""A tool-calling agent loop: the model asks for tools, we run them, it answers.

    python examples/lc_agent.py "What is the weather in Paris, and what is 6 times 7?"

Tool calls are read from the answer only, never from the reasoning, so a call the model merely
considered while thinking is not run.
"""

from __future__ import annotations

import sys
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool

from specthink_lc import ChatSpeculativeThinking


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 21 degrees in {city}."


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


TOOLS: dict[str, BaseTool] = {t.name: t for t in (get_weather, multiply)}


def main(small_url: str, target_url: str,
         question: str = "What is the weather in Paris, and what is 6 times 7?",
         *, max_steps: int = 5, **options: Any) -> list[BaseMessage]:
    model = ChatSpeculativeThinking(small_url=small_url, target_url=target_url,
                                    temperature=0, max_tokens=512, **options)
    agent = model.bind_tools(list(TOOLS.values()))
    messages: list[BaseMessage] = [HumanMessage(question)]
    for _ in range(max_steps):
        reply = agent.invoke(messages)
        assert isinstance(reply, AIMessage)
        messages.append(reply)
        if not reply.tool_calls:
            print(f"answer: {reply.text}")
            break
        for call in reply.tool_calls:
            result = TOOLS[call["name"]].invoke(call)
            assert isinstance(result, ToolMessage)
            print(f"tool {call['name']}({call['args']}) -> {result.content}")
            messages.append(result)
    model.close()
    return messages


if __name__ == "__main__":
    from server_settings import server_settings

    small, target, settings = server_settings()
    main(small, target, *sys.argv[1:2], **settings)
