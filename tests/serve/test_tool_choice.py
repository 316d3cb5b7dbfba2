"""``tool_choice`` "required" or a named function, honoured by a model that ignores the
instruction: the engine writes the call's opener after the reasoning (at once when the output
does not start in it) and the model fills in the arguments. TGI and OpenAI-compatible servers,
a template that opens the reasoning and one that does not."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from specthink.testing import LoopbackServer, ThinkingModel
from specthink.testing.models import Continuation

from .conftest import Pair, Served, client
from .test_tools import TIME, WEATHER

REASONING = "The user wants the weather in Paris.\n\nI know it already, no tool is needed."
ANSWER = "It is sunny in Paris."
R1 = ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")


class Defiant:
    """Reasons (unless ``reasons`` is false), then answers in words whatever the prompt asks
    for; a call someone else began it completes (greedy decoding continues any text)."""

    def __init__(self, reasons: bool = True) -> None:
        reasoning = REASONING if reasons else ""
        self.thinking = ThinkingModel(lambda conversation: (reasoning, ANSWER))

    def continuation(self, prompt: str) -> Continuation:
        if prompt.endswith('{"name": "get_weather", "arguments": '):
            return Continuation('{"city": "Paris"}}\n</tool_call>')
        if prompt.endswith('<tool_call>\n{"name": "'):
            return Continuation('get_time", "arguments": {"city": "Paris"}}\n</tool_call>')
        return self.thinking.continuation(prompt)


@contextmanager
def defiant_pair(flavor: str, reasons: bool = True) -> Iterator[Pair]:
    model = Defiant(reasons)
    with LoopbackServer(model, model_id=R1[0], flavor=flavor) as small, \
            LoopbackServer(model, model_id=R1[1], flavor=flavor) as target:  # type: ignore[arg-type]
        yield Pair(small, target)


CASES = {
    # R1's own template (the server renders it) opens the reasoning: the call follows it
    "tgi-reasoning": ("tgi", "auto", True),
    "openai-reasoning": ("vllm", "auto", True),
    # ChatML opens none; a model that writes <think> itself: the call follows the reasoning
    "tgi-chatml": ("tgi", "chatml", True),
    # an instruct model, no reasoning: the answer, so the call, begins at its first token
    "openai-instruct": ("vllm", "chatml", False),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("choice", "tools", "called"), [
    ({"type": "function", "function": {"name": "get_weather"}}, [WEATHER, TIME],
     ("get_weather", {"city": "Paris"})),
    ("required", [WEATHER, TIME], ("get_time", {"city": "Paris"})),
], ids=["named", "required"])
def test_a_required_call_is_made_though_the_model_ignores_the_instruction(
        serve: Callable[..., Served], case: str, choice: Any, tools: list[Any],
        called: tuple[str, dict[str, Any]]) -> None:
    """If this fails, ``tool_choice`` "required" or a named function is only a sentence in
    the prompt: a model that ignores it answers in words and the client gets
    ``finish_reason: "stop"`` where OpenAI's contract is a call."""
    flavor, template, reasons = CASES[case]
    with defiant_pair(flavor, reasons) as pair:
        served = serve(pair, backend="tgi" if flavor == "tgi" else "openai",
                       small_template=template, target_template=template)
        completion = client(served).chat.completions.create(
            model="specthink", messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=tools, tool_choice=choice)
        last = [*pair.small.records, *pair.target.records][-1]
        free = client(served).chat.completions.create(
            model="specthink", messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=tools)
    choice_ = completion.choices[0]
    assert choice_.finish_reason == "tool_calls", choice_.message
    calls = choice_.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [called]
    assert not choice_.message.content
    reasoning = (choice_.message.model_extra or {}).get("reasoning_content") or ""
    assert reasoning.strip() == (REASONING if reasons else "")
    # TGI's grammar keeps a named call's arguments what its parameters allow.
    grammar = last.parameters.get("grammar")
    named = isinstance(choice, dict)
    assert grammar == ({"type": "json", "value": WEATHER["function"]["parameters"]}
                       if named and flavor == "tgi" else None)
    # Left to itself (tool_choice auto) the same model answers in words.
    assert free.choices[0].finish_reason == "stop"
    assert free.choices[0].message.content == ANSWER
