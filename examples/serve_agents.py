"""An OpenAI Agents SDK agent on `specthink serve`, through the Responses API it defaults to.

    pip install openai-agents
    specthink serve --small http://small:8080 --target http://target:8080 --api-key sk-local &
    SPECTHINK_SERVE_KEY=sk-local python examples/serve_agents.py "What is the weather in Paris?"

The agent's model calls ``get_weather``, the SDK runs it and sends the result back, and the
model answers; tracing is off, so nothing leaves the machine. Then the plain ``openai`` SDK
continues a stored response with ``previous_response_id``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from agents import Agent, RunConfig, Runner, function_tool
from agents.models.openai_provider import OpenAIProvider
from openai import AsyncOpenAI


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny, 24 C in {city}"


async def run(base_url: str, question: str, api_key: str, **options: Any) -> dict[str, Any]:
    async with AsyncOpenAI(base_url=base_url, api_key=api_key, **options) as client:
        agent = Agent(name="weather", instructions="Answer with the tools.", model="specthink",
                      tools=[get_weather])
        result = await Runner.run(agent, question, run_config=RunConfig(
            model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True))
        print(f"agent: {result.final_output}")
        first = await client.responses.create(model="specthink", input="hello there")
        follow_up = await client.responses.create(model="specthink", input="thanks",
                                                  previous_response_id=first.id)
        reasoning = first.output[0]
        thought = reasoning.content[0].text if reasoning.type == "reasoning" \
            and reasoning.content else ""
        print(f"reasoning: {thought.strip()}\nanswer: {first.output_text}\n"
              f"follow-up: {follow_up.output_text}")
    return {"agent": result.final_output, "reasoning": thought, "answer": first.output_text,
            "follow_up": follow_up.output_text}


def main(base_url: str, question: str = "What is the weather in Paris?", *,
         api_key: str = "none", **options: Any) -> dict[str, Any]:
    return asyncio.run(run(base_url, question, api_key, **options))


if __name__ == "__main__":
    main(os.environ.get("SPECTHINK_SERVE_URL", "http://127.0.0.1:8000/v1"),
         *sys.argv[1:2], api_key=os.environ.get("SPECTHINK_SERVE_KEY", "none"))
