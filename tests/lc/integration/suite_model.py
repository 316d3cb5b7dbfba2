"""A scripted "model" that answers the prompts of LangChain's standard integration suite.

Like greedy decoding, its answer is a pure function of the conversation: it reads the rendered
ChatML prompt (the last user turn, the offered tools, a ``tool_choice`` instruction, a JSON
schema instruction) and writes a DeepSeek-R1 style answer, ``<think>…</think>`` then the reply.
Both servers of a pair run it, so when the target takes over it continues the very same text:
the rules still fire (the reasoning says "Wait" and "check" after blank lines) but the answers
stay sensible.
"""

from __future__ import annotations

import json
import re
from typing import Any

from specthink.testing.models import last_user_message

from ..answers import AnswerModel

__all__ = ["SuiteModel", "reasoning_for"]

_TOOLS = re.compile(r"<tools>\n(.*?)\n</tools>", re.DOTALL)
_FORCED_TOOL = re.compile(r"You must call the tool (\S+)\.")
_SCHEMA = re.compile(r"conforms to this JSON schema, and nothing else:\n(.*?)<\|im_end\|>",
                     re.DOTALL)


def reasoning_for(topic: str) -> str:
    """Reasoning with a reflection and a verification after blank lines, so rules 1 and 2 fire."""
    return (f"<think>\nThe user asks about {topic}.\n\nWait, let me think about what they "
            f"need.\n\nI should check that the reply fits the request.\n</think>\n\n")


class SuiteModel(AnswerModel):
    """Answers the standard suite's questions; see the module docstring."""

    def __init__(self) -> None:
        super().__init__(self.answer_for)

    def answer_for(self, prompt: str) -> str:
        question = last_user_message(prompt)
        system = prompt.split("<|im_start|>user", 1)[0]
        tools = _offered_tools(system)
        if "<tool_response>" in question:
            return reasoning_for("a tool result") + _after_tool(question)
        if schema := _SCHEMA.search(system):
            return reasoning_for("a JSON answer") + json.dumps(
                _fill(json.loads(schema.group(1)), question), ensure_ascii=False)
        if "json" in question.lower() and not tools:
            return reasoning_for("a JSON answer") + json.dumps(_fill({}, question))
        if tools:
            name = self._chosen_tool(system, question, tools)
            if name is not None:
                arguments = _arguments(name, tools[name], question)
                return (reasoning_for(f"the tool {name}") + "<tool_call>\n"
                        + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
                        + "\n</tool_call>")
        return reasoning_for("a reply") + _reply(question)

    @staticmethod
    def _chosen_tool(system: str, question: str, tools: dict[str, dict[str, Any]],
                     ) -> str | None:
        if forced := _FORCED_TOOL.search(system):
            return forced.group(1)
        lowered = question.lower()
        mentioned = [name for name in tools if name.lower() in lowered]
        if mentioned:
            return max(mentioned, key=len)
        hints = {"weather": "weather", "customer": "customer", "joke": "joke",
                 "greeting": "greeting", "+": "adder", "color": "color"}
        for word, part in hints.items():
            if word in lowered:
                for name in tools:
                    if part in name.lower():
                        return name
        if "You must call one of the tools." in system:
            return next(iter(tools))
        return None


def _offered_tools(system: str) -> dict[str, dict[str, Any]]:
    found = _TOOLS.search(system)
    if not found:
        return {}
    tools = {}
    for line in found.group(1).splitlines():
        function = json.loads(line).get("function", {})
        tools[function["name"]] = function.get("parameters") or {}
    return tools


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"-?\d+", text)]


def _arguments(name: str, parameters: dict[str, Any], question: str) -> dict[str, Any]:
    """Arguments a helpful model would pass, read from the question where it holds them."""
    properties: dict[str, Any] = parameters.get("properties", {})
    if "joke" in name.lower():
        return _fill(parameters, question)
    numbers = _numbers(question) or [3]
    out: dict[str, Any] = {}
    quoted = re.search(r"'([^']+)'", question)
    for index, (prop, spec) in enumerate(properties.items()):
        kind = spec.get("type")
        if kind == "integer" or kind == "number":
            out[prop] = numbers[min(index, len(numbers) - 1)]
        elif prop == "location":
            place = re.search(r" in (.+?)\?", question)
            out[prop] = place.group(1) if place else "Paris"
        elif prop == "customer_name" and quoted:
            out[prop] = quoted.group(1)
        elif prop == "description":
            out[prop] = question.split(" - ", 1)[-1]
        elif prop == "answer_style":
            out[prop] = "pirate" if "pirate" in question.lower() else "friendly"
        elif prop == "fav_color":
            out[prop] = "purple"
        else:
            out[prop] = question
    return out


def _fill(schema: dict[str, Any], question: str) -> dict[str, Any]:
    """A joke object for any of the suite's joke schemas (pydantic, TypedDict, JSON schema)."""
    joke = {"setup": "Why did the cat sit on the computer?",
            "punchline": "To keep an eye on the mouse!"}
    properties = schema.get("properties", {"setup": {}, "punchline": {}})
    wanted = {key: value for key, value in joke.items() if key in properties}
    if "no punchline" in question.lower():
        wanted.pop("punchline", None)
    return wanted


def _after_tool(question: str) -> str:
    result = question.split("<tool_response>\n", 1)[-1].split("\n</tool_response>", 1)[0]
    if result.startswith("Error"):
        return f"The tool failed ({result}) Let me know the missing value and I will retry."
    if "sunny" in result.lower():
        return "It's sunny in San Francisco, CA."
    try:
        value = json.loads(result)
    except ValueError:
        return f"The tool answered: {result}"
    if isinstance(value, dict) and "result" in value:
        return f"The result is {value['result']}."
    return f"The tool answered: {result}"


def _reply(question: str) -> str:
    lowered = question.lower()
    if "haiku" in lowered:
        return ("Autumn moonlight falls\nA worm digs silently on\nInto the chestnut\n\n"
                "Morning dew glistens\nA frog leaps into the pond\nRipples reach the shore")
    if "how are you" in lowered:
        return "I am well, thank you for asking. How can I help you today?"
    if lowered.strip().startswith(("hi", "hello", "hey")):
        return "Hello! How are you doing today? How can I help you?"
    if "thanks" in lowered:
        return "You are welcome. Is there anything else I can help with?"
    if "2 + 2" in question or "2+2" in question:
        return "The answer is 4."
    return f"You asked: {question.strip()} Here is my answer: it depends on the details."
