"""A LlamaIndex FunctionAgent: the model calls Python tools through tool calling (Hermes
``<tool_call>`` blocks, read back as ToolCallBlocks), and the agent streams what happens.

    python examples/li_function_agent.py "What is the weather in Paris, and what is 6 times 7?"
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from llama_index.core.agent.workflow import AgentStream, FunctionAgent, ToolCallResult
from llama_index.core.tools import FunctionTool

from specthink_li import SpeculativeThinkingLLM


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 21 degrees in {city}."


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


async def ask(llm: SpeculativeThinkingLLM, question: str) -> str:
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(get_weather),
                                 FunctionTool.from_defaults(multiply)],
                          llm=llm, system_prompt="Use the tools to answer.")
    handler = agent.run(user_msg=question)
    thinking = False
    async for event in handler.stream_events():
        if isinstance(event, AgentStream) and event.thinking_delta:
            if not thinking:
                print("(thinking) ", end="")
                thinking = True
            print(event.thinking_delta, end="", flush=True)
        elif isinstance(event, ToolCallResult):
            thinking = False
            print(f"\ntool {event.tool_name}({event.tool_kwargs}) -> {event.tool_output}")
    answer = str(await handler)
    await llm.aclose()
    return answer


def main(small_url: str, target_url: str,
         question: str = "What is the weather in Paris, and what is 6 times 7?",
         **options: Any) -> str:
    llm = SpeculativeThinkingLLM(small_url=small_url, target_url=target_url,
                                 temperature=0, max_tokens=512, **options)
    answer = asyncio.run(ask(llm, question))
    print(f"\nanswer: {answer}")
    return answer


if __name__ == "__main__":
    from server_settings import server_settings

    small, target, settings = server_settings()
    main(small, target, *sys.argv[1:2], **settings)
