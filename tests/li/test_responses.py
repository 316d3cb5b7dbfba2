"""Engine events to LlamaIndex responses: however the text is cut into events, the stream adds up
to the same message as the whole result."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st
from llama_index.core.base.llms.types import ThinkingBlock, ToolCallBlock

from specthink.trace import FinishEvent, Result, StartEvent, Statistics, TextEvent
from specthink_li._responses import ChatStreamAssembler, response_from_result

words = st.text(alphabet=st.sampled_from(list("ab <>/\n")), max_size=12)
calls = st.lists(st.builds(
    lambda name, value: "<tool_call>\n" + json.dumps({"name": name, "arguments": {"x": value}})
    + "\n</tool_call>",
    st.sampled_from(["add", "multiply"]), st.integers(0, 99)), max_size=2)


@st.composite
def outputs(draw: st.DrawFn) -> tuple[str, bool]:
    """A model output (optional reasoning, an answer, maybe tool calls) and whether the prompt
    opened the reasoning block."""
    opened = draw(st.booleans())
    reasoning = draw(st.none() | words)
    text = ""
    if reasoning is not None:
        text = ("" if opened else draw(st.sampled_from(["<think>", "\n<think>\n"])))
        text += reasoning + "</think>" + draw(st.sampled_from(["", "\n\n"]))
    text += draw(words) + "\n".join(draw(calls)) + draw(words)
    return text, opened


def cut(text: str, points: list[int]) -> list[str]:
    bounds = sorted({p % (len(text) + 1) for p in points} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@given(outputs(), st.lists(st.integers(0, 200), max_size=12), st.booleans())
def test_a_stream_adds_up_to_the_whole_result(output: tuple[str, bool], points: list[int],
                                              parse_tools: bool) -> None:
    text, opened = output
    pieces = cut(text, points)
    result = Result(text=text, events=tuple(TextEvent("small", p) for p in pieces),
                    stats=Statistics(), starts_in_reasoning=opened)
    tools = ("add", "multiply") if parse_tools else None
    whole = response_from_result(result, tools=tools)

    assembler = ChatStreamAssembler(tools=tools)
    assert assembler.feed(StartEvent(starts_in_reasoning=opened)) is None
    chunks = [assembler.feed(event) for event in (*result.events, FinishEvent(result))]
    assert all(chunk is not None for chunk in chunks)

    final = chunks[-1]
    assert final is not None
    assert "".join(c.delta or "" for c in chunks) == final.message.content
    thinking = "".join(c.additional_kwargs.get("thinking_delta", "") for c in chunks)
    assert [b.content for b in final.message.blocks if isinstance(b, ThinkingBlock)] == (
        [thinking] if thinking else [])
    assert final.message.content == whole.message.content

    def shape(blocks: Sequence[object]) -> list[tuple[object, ...]]:
        return [(type(b).__name__, getattr(b, "content", None), getattr(b, "tool_name", None),
                 getattr(b, "tool_kwargs", None)) for b in blocks]
    assert shape(final.message.blocks) == shape(whole.message.blocks)  # tool ids are random
    if not parse_tools:
        assert not any(isinstance(b, ToolCallBlock) for b in final.message.blocks)
