"""Reading answers: Hermes ``<tool_call>`` blocks and the ``<think>`` reasoning split."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from specthink.formats import THINK_HERMES
from specthink.output import ReasoningSplitter, split_reasoning
from specthink.prompts import CHATML, DEEPSEEK_R1
from specthink.tools import ToolCall, parse_tool_calls

CALL_ID = re.compile(r"call_[0-9a-f]{12}")


# --- tool calls ------------------------------------------------------------------------------

def test_one_call_is_taken_out_of_the_content() -> None:
    text = ('Let me look that up.\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}\n</tool_call>')

    content, calls = parse_tool_calls(text)

    assert content == "Let me look that up."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert CALL_ID.fullmatch(calls[0].id)


def test_several_calls_keep_their_order_and_get_distinct_ids() -> None:
    text = ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "mul", "arguments": {"a": 3, "b": 4}}\n</tool_call>')

    content, calls = parse_tool_calls(text)

    assert content == ""
    assert [c.name for c in calls] == ["add", "mul"]
    assert calls[1].arguments == {"a": 3, "b": 4}
    assert len({c.id for c in calls}) == 2


def test_arguments_given_as_a_json_string_are_decoded() -> None:
    """TGI 3.2+ writes ``arguments`` as a JSON string; callers always get a dict."""
    text = '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"tgi\\"}"}</tool_call>'

    _, calls = parse_tool_calls(text)

    assert calls[0].arguments == {"query": "tgi"}


def test_missing_arguments_mean_no_arguments() -> None:
    _, calls = parse_tool_calls('<tool_call>{"name": "now"}</tool_call>')

    assert calls[0].arguments == {}


def test_a_block_cut_off_at_the_end_still_counts() -> None:
    """A stop sequence or EOS right after the JSON leaves the closing tag unwritten."""
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'

    content, calls = parse_tool_calls(text)

    assert content == "Checking."
    assert calls[0].arguments == {"city": "Rome"}


def test_malformed_json_stays_in_the_content_and_makes_no_call() -> None:
    bad = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    good = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'

    content, calls = parse_tool_calls(f"{bad}\n{good}")

    assert content == bad
    assert [c.name for c in calls] == ["now"]


def test_json_without_a_name_is_not_a_call() -> None:
    text = '<tool_call>{"arguments": {"x": 1}}</tool_call>'

    assert parse_tool_calls(text) == (text, [])


def test_text_without_calls_is_returned_stripped() -> None:
    assert parse_tool_calls("  The answer is 4.\n") == ("The answer is 4.", [])


def test_a_call_converts_to_the_openai_form() -> None:
    call = ToolCall(id="call_000000000001", name="get_weather", arguments={"city": "Zürich"})

    assert call.to_openai() == {
        "id": "call_000000000001",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
    }


# --- reasoning split -------------------------------------------------------------------------

def test_a_closed_block_splits_into_reasoning_and_answer() -> None:
    text = "<think>\n2 + 2 is 4.\n</think>\n\nThe answer is 4."

    assert split_reasoning(text) == ("\n2 + 2 is 4.\n", "The answer is 4.")


def test_an_unclosed_block_is_all_reasoning() -> None:
    assert split_reasoning("<think>\nStill thinking") == ("\nStill thinking", "")


def test_text_without_tags_is_all_answer() -> None:
    assert split_reasoning("Just an answer.") == ("", "Just an answer.")


def test_an_end_tag_alone_means_the_prompt_opened_the_block() -> None:
    """DeepSeek-R1's generation prompt ends in ``<think>\\n``, so the output has only the end."""
    assert split_reasoning("Hmm, 4.\n</think>\n\n4") == ("Hmm, 4.\n", "4")


def test_the_caller_can_say_whether_the_prompt_opened_the_block() -> None:
    assert split_reasoning("unfinished", starts_in_reasoning=True) == ("unfinished", "")
    assert split_reasoning("a</think>b", starts_in_reasoning=False) == ("", "a</think>b")


def test_whitespace_before_the_start_tag_is_dropped() -> None:
    assert split_reasoning("\n <think>x</think>y") == ("x", "y")


def test_custom_tags() -> None:
    text = "<reasoning>plan</reasoning> done"

    assert split_reasoning(text, start="<reasoning>", end="</reasoning>") == ("plan", "done")


def test_streaming_holds_back_a_partial_end_tag() -> None:
    splitter = ReasoningSplitter()

    assert splitter.feed("<think>Two plus two</") == [("reasoning", "Two plus two")]
    assert splitter.feed("thi") == []
    assert splitter.feed("nk>\n\n") == []
    assert splitter.feed("Four.") == [("answer", "Four.")]
    assert splitter.flush() == []


def test_streaming_releases_a_false_alarm() -> None:
    splitter = ReasoningSplitter(starts_in_reasoning=True)

    assert splitter.feed("a </th") == [("reasoning", "a ")]
    assert splitter.feed("ese") == [("reasoning", "</these")]


def test_flush_releases_what_was_held_back() -> None:
    splitter = ReasoningSplitter()

    assert splitter.feed("<think>cut off at </thi") == [("reasoning", "cut off at ")]
    assert splitter.flush() == [("reasoning", "</thi")]


def test_the_format_reads_whether_the_template_opened_the_block() -> None:
    messages = [{"role": "user", "content": "What is 2 + 2?"}]

    r1 = ReasoningSplitter(
        starts_in_reasoning=THINK_HERMES.opened_by(DEEPSEEK_R1.render_text(messages)))
    chatml = ReasoningSplitter(
        starts_in_reasoning=THINK_HERMES.opened_by(CHATML.render_text(messages)))

    assert r1.starts_in_reasoning
    assert not chatml.starts_in_reasoning
    assert r1.feed("Easy.</think>4") == [("reasoning", "Easy."), ("answer", "4")]


_PIECES = ["<think>", "</think>", "<", "</", "</th", "ink>", "<thi", "think>", " ", "\n",
           "a", "b", "é"]


@given(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join), st.booleans(), st.data())
def test_any_chunking_gives_the_same_split(text: str, starts_in_reasoning: bool,
                                           data: st.DataObject) -> None:
    """If this fails, streamed reasoning/answer deltas differ from the final message's split."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    splitter = ReasoningSplitter(starts_in_reasoning=starts_in_reasoning)

    pieces = [piece for chunk in chunks for piece in splitter.feed(chunk)] + splitter.flush()

    reasoning = "".join(text for kind, text in pieces if kind == "reasoning")
    answer = "".join(text for kind, text in pieces if kind == "answer")
    assert (reasoning, answer) == split_reasoning(text, starts_in_reasoning=starts_in_reasoning)
    assert all(piece for _, piece in pieces)
