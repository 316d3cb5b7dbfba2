"""A LlamaIndex ReActAgent: the model writes Thought / Action / Action Input as text, the agent
runs the Python tool and feeds back an Observation, until the model writes an Answer.

    python examples/li_react_agent.py "What is 12 times 13?"

ReAct needs no tool-calling support from the model, only the text format; with a reasoning
model, the reasoning stays out of the text the agent parses (it arrives as a ThinkingBlock).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from llama_index.core.agent.workflow import ReActAgent, ToolCallResult
from llama_index.core.tools import FunctionTool

from specthink_li import SpeculativeThinkingLLM


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


async def ask(llm: SpeculativeThinkingLLM, question: str) -> str:
    agent = ReActAgent(tools=[FunctionTool.from_defaults(multiply)], llm=llm)
    handler = agent.run(user_msg=question)
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            print(f"tool {event.tool_name}({event.tool_kwargs}) -> {event.tool_output}")
    answer = str(await handler)
    await llm.aclose()
    return answer


def main(small_url: str, target_url: str, question: str = "What is 12 times 13?",
         **options: Any) -> str:
    llm = SpeculativeThinkingLLM(small_url=small_url, target_url=target_url,
                                 temperature=0, max_tokens=512, **options)
    answer = asyncio.run(ask(llm, question))
    print(f"answer: {answer}")
    return answer


if __name__ == "__main__":
    from server_settings import server_settings

    small, target, settings = server_settings()
    main(small, target, *sys.argv[1:2], **settings)
