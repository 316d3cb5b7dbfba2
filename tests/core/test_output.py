"""The one reasoning / answer / tool-call split every adapter uses (``specthink.output``)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specthink.output import OutputSplitter, split_result
from specthink.trace import FinishEvent, Result, StartEvent, Statistics, TextEvent

DECOY = '<tool_call>\n{"name": "multiply", "arguments": {"a": 11, "b": 13}}\n</tool_call>'
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def result_of(text: str, *, opened: bool) -> Result:
    return Result(text=text, events=(TextEvent("small", text),), stats=Statistics(),
                  starts_in_reasoning=opened)


def stream(text: str, pieces: list[str], *, opened: bool, tools: tuple[str, ...] | None,
           ) -> tuple[str, str, list[str]]:
    splitter = OutputSplitter(tools=tools)
    deltas = splitter.feed(StartEvent(starts_in_reasoning=opened))
    for piece in pieces:
        deltas += splitter.feed(TextEvent("small", piece))
    final = splitter.finish()
    deltas += final.deltas
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    answer = "".join(d.text for d in deltas if d.kind == "answer") + final.rest
    return reasoning, answer, [call.name for call in final.tool_calls]


def test_a_call_drafted_in_the_reasoning_is_never_a_tool_call() -> None:
    """The prompt opened <think> (R1 template): a <tool_call> before </think> is reasoning; if
    this fails, agents execute calls the model only considered."""
    text = f"I could call\n{DECOY}\nbut no.\n</think>\n\nThe answer is 143."
    whole = split_result(result_of(text, opened=True), tools=["multiply"])
    assert whole.tool_calls == []
    assert DECOY in whole.reasoning
    assert whole.answer == "The answer is 143."
    reasoning, answer, calls = stream(text, list(text), opened=True, tools=("multiply",))
    assert calls == [] and DECOY in reasoning and answer.strip() == "The answer is 143."


def test_the_engine_decision_is_what_splits_the_stream() -> None:
    """Without the StartEvent saying the prompt opened the reasoning, the same text would be all
    answer; with it, the text before </think> is reasoning."""
    text = "Thinking hard.\n</think>\n\nDone."
    assert stream(text, [text], opened=True, tools=None)[:2] == ("Thinking hard.\n", "Done.")
    assert stream(text, [text], opened=False, tools=None)[:2] == ("", text)


def test_a_stream_needs_the_start_event() -> None:
    """Feeding text before the engine's StartEvent is a programming error, said clearly."""
    with pytest.raises(RuntimeError, match="StartEvent"):
        OutputSplitter().feed(TextEvent("small", "x"))


def test_tgi_no_tool_answer_becomes_text() -> None:
    """TGI offers a `no_tool` pseudo-function; a call to it is the answer, not a tool call no
    agent could run."""
    text = '<tool_call>\n{"name": "no_tool", "arguments": {"content": "It is 4."}}\n</tool_call>'
    whole = split_result(result_of(text, opened=False), tools=["add"])
    assert whole.tool_calls == [] and whole.answer == "It is 4."
    assert stream(text, [text], opened=False, tools=("add",))[1:] == ("It is 4.", [])


def test_a_call_of_a_function_not_offered_is_the_answer_not_a_tool_call() -> None:
    """If this fails, a call naming a function nobody offered (a JSON schema's name, written as
    a call) is handed to the caller as a tool call no agent can run, and LangChain's
    ProviderStrategy + tools loops until GraphRecursionError."""
    text = ('<tool_call>\n{"name": "CityFacts", "arguments": {"name": "Bergen"}}\n</tool_call>'
            + CALL)
    whole = split_result(result_of(text, opened=False), tools=["add"])
    assert [call.name for call in whole.tool_calls] == ["add"]
    assert whole.answer == '{"name": "Bergen"}'
    assert stream(text, [text[:30], text[30:]], opened=False, tools=("add",)) == (
        "", '{"name": "Bergen"}', ["add"])


def test_parallel_calls_can_be_limited_to_the_first() -> None:
    """parallel_tool_calls=False keeps only the first call the model wrote."""
    splitter = OutputSplitter(tools=["add"], max_tool_calls=1)
    splitter.feed(StartEvent(starts_in_reasoning=False))
    splitter.feed(TextEvent("small", CALL + "\n" + CALL))
    assert [c.name for c in splitter.finish().tool_calls] == ["add"]


def test_the_result_and_finish_events_are_ignored_by_feed() -> None:
    splitter = OutputSplitter()
    splitter.feed(StartEvent(starts_in_reasoning=False))
    assert splitter.feed(FinishEvent(result_of("", opened=False))) == []


words = st.text(alphabet=st.sampled_from(list("ab <>/\n")), max_size=10)
maybe_calls = st.lists(st.sampled_from([CALL, DECOY]), max_size=2)


@given(opened=st.booleans(), reasoning=st.none() | words, before=words, calls=maybe_calls,
       after=words, cuts=st.lists(st.integers(0, 300), max_size=10),
       tools=st.sampled_from([None, ("add", "multiply")]))
def test_any_cut_of_a_stream_adds_up_to_the_whole_split(
        opened: bool, reasoning: str | None, before: str, calls: list[str], after: str,
        cuts: list[int], tools: tuple[str, ...] | None) -> None:
    """However the engine cuts the text into events, the deltas join to the whole result's
    reasoning, and the calls are the same; broken here means streamed and invoked answers
    differ."""
    text = "" if reasoning is None else (
        ("" if opened else "<think>") + reasoning + "</think>\n\n")
    text += before + "\n".join(calls) + after
    bounds = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    whole = split_result(result_of(text, opened=opened), tools=tools)
    streamed_reasoning, _, names = stream(text, pieces, opened=opened, tools=tools)
    assert streamed_reasoning == whole.reasoning
    assert names == [c.name for c in whole.tool_calls]
    splitter = OutputSplitter(tools=tools)
    splitter.feed(StartEvent(starts_in_reasoning=opened))
    for piece in pieces:
        for delta in splitter.feed(TextEvent("small", piece)):
            assert "<tool_call>" not in delta.text or delta.kind == "reasoning" or not tools
    assert splitter.finish().answer == whole.answer
