"""specthink's executor of the response-template format: the same regions, hold-back and
message as transformers' streaming ResponseParser on any text and any split of it, and templates
checked when loaded."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specthink.errors import ConfigError
from specthink.formats.families import builtin_template, template_names
from specthink.formats.response_template import (
    ResponseParser,
    load_template,
    parse_response,
)

transformers_chat = pytest.importorskip("transformers.utils.chat_parsing")


def _fragments(name: str) -> list[str]:
    """Pieces texts are made of: each delimiter literal of the template, cut in two as well,
    and words, spaces, newlines and JSON / XML bits."""
    spec = builtin_template(name).spec
    marks: list[str] = []
    for field in spec["fields"].values():
        for key in ("open", "close"):
            raw = field.get(key)
            marks.extend([raw] if isinstance(raw, str) else raw or [])
    marks += ["<tool_call>", "</tool_call>", "<function=f>", "<parameter=x>\n1\n</parameter>",
              "</function>", "<|im_end|>", "<|start|>assistant", " to=functions.f",
              "<|channel|>commentary", " json", "<|message|>", "[TOOL_CALLS]f[ARGS]",
              "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n", "\n```<｜tool▁call▁end｜>",
              "<|tool_call>call:f", "<｜end▁of▁sentence｜>", "<response>", "</response>",
              "<|tool_call|>", "<|end_of_text|>", "<|endoftext|>"]
    halves = [m[:len(m) // 2] for m in marks if len(m) > 1] + \
             [m[len(m) // 2:] for m in marks if len(m) > 1]
    return marks + halves + ["word", " so", "\n", "\n\n", " ", '{"name": "f", "arguments": {}}',
                             '[{"name": "f", "arguments": {"x": 1}}]', '{"x": 1}', "{x:1}", "é",
                             "中"]


def _theirs(spec: dict[str, Any], prefix: str, chunks: list[str]) -> tuple[Any, dict[str, str]]:
    parser = transformers_chat.ResponseParser(spec, prefix=prefix)
    shown: dict[str, str] = {}
    try:
        for event in parser.initial_events:
            if event["type"] == "region_chunk":
                shown[event["field"]] = shown.get(event["field"], "") + event["text"]
        for chunk in chunks:
            for event in parser.feed(chunk):
                if event["type"] == "region_chunk":
                    shown[event["field"]] = shown.get(event["field"], "") + event["text"]
        return parser.finalize()[0], shown
    except ValueError:
        return "error", shown


def _ours(name: str, prefix: str, chunks: list[str]) -> tuple[Any, dict[str, str]]:
    parser = ResponseParser(builtin_template(name), prefix)
    shown: dict[str, str] = {}
    try:
        for kind, field, text in parser.initial_events:
            if kind == "chunk":
                shown[field] = shown.get(field, "") + text
        for chunk in chunks:
            for kind, field, text in parser.feed(chunk):
                if kind == "chunk":
                    shown[field] = shown.get(field, "") + text
        return parser.finalize()[0], shown
    except ValueError:
        return "error", shown


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(sorted(template_names())))
def test_any_text_any_split_as_transformers_streams_it(data: st.DataObject, name: str) -> None:
    """If this fails, the executor departs from the format's reference on some text or some
    split of it: a region, a held-back delimiter, or the message differs from transformers'
    (e.g. the fast path let through text that could start a delimiter)."""
    fragments = _fragments(name)
    text = "".join(data.draw(st.lists(st.sampled_from(fragments), max_size=14)))
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    prefix = data.draw(st.sampled_from(["", "<|im_start|>assistant\n<think>\n",
                                        "<｜Assistant｜><think>\n", "[/INST]", "<|turn>model\n",
                                        "<|start_of_role|>assistant<|end_of_role|>",
                                        "<|im_start|>assistant<|im_sep|>"]))
    spec = dict(builtin_template(name).spec)
    assert _ours(name, prefix, chunks) == _theirs(spec, prefix, chunks)


def test_the_prompt_tail_tells_where_the_output_starts() -> None:
    """If this fails, the parser does not read the part of the assistant turn the prompt
    already wrote, so output after an opening <think> is taken for the answer."""
    xml = builtin_template("qwen3-xml")
    assert ResponseParser(xml, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                               "<think>\n").current == "reasoning_content"
    assert ResponseParser(xml, "<|im_start|>assistant\n<think>\n\n</think>\n\n").current \
        == "content"
    # Only the last assistant turn counts: an earlier turn's <think> is history.
    assert ResponseParser(xml, "<|im_start|>assistant\n<think>\nx</think>y<|im_end|>\n"
                               "<|im_start|>assistant\n").current == "content"


def test_a_partial_delimiter_is_held_until_it_is_settled() -> None:
    """If this fails, a piece of `</think>` split across tokens leaks into the reasoning, or
    text that only looked like a delimiter is lost."""
    parser = ResponseParser(builtin_template("qwen3"), "<|im_start|>assistant\n<think>\n")
    assert parser.feed("So 4.</th") == [("chunk", "reasoning_content", "So 4.")]
    assert parser.feed("ere") == [("chunk", "reasoning_content", "</there")]
    events = parser.feed("</think>\n\nFour")
    assert ("close", "reasoning_content", "So 4.</there") in events
    assert events[-1] == ("chunk", "content", "\n\nFour")  # stripped when it closes


def test_tool_arguments_cast_to_the_offered_schema() -> None:
    """If this fails, an XML call's `2` for an integer parameter stays the string "2"."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}}}]
    text = "<tool_call>\n<function=f>\n<parameter=n>\n2\n</parameter>\n<parameter=s>\n2\n" \
           "</parameter>\n</function>\n</tool_call>"
    message = parse_response(text, builtin_template("qwen3-xml"), tools=tools)
    assert message["tool_calls"][0]["function"]["arguments"] == {"n": 2, "s": "2"}


@pytest.mark.parametrize(("spec", "named"), [
    ([], "is an object"),
    ({"fields": {"content": {}}}, "start_anchor"),
    ({"start_anchor": "x", "fields": {}}, "non-empty"),
    ({"start_anchor": "x", "version": 2, "fields": {"content": {}}}, "version"),
    ({"start_anchor": "x", "fields": {"content": {}}, "extra": 1}, "unknown keys"),
    ({"start_anchor": "x", "fields": {"a": {}, "b": {}}}, "at most one field"),
    ({"start_anchor": "x", "fields": {"a": {"open": "<", "bogus": 1}}}, "unknown keys"),
    ({"start_anchor": "x", "fields": {"a": {"open": "<", "open_pattern": "<"}}}, "not both"),
    ({"start_anchor": "x", "fields": {"a": {"open_pattern": "("}}}, "not a valid regex"),
    ({"start_anchor": "x", "fields": {"a": {"open": ""}}}, "non-empty string"),
    ({"start_anchor": "x", "fields": {"a": {"open": "<", "content": "python-call-list"}}},
     "python-call-list"),
    ({"start_anchor": "x", "fields": {"a": {"open_pattern": "<(?P<n>x)"}}}, "'transform'"),
    ({"start_anchor": "x", "fields": {"a": {"open": "<", "transform": "a {content}"}}},
     "mixes"),
    ({"start_anchor": "x", "fields": {"a": {"open": "<", "join": ","}}}, "repeats"),
])
def test_a_bad_template_is_a_config_error_naming_the_problem(spec: Any, named: str) -> None:
    """If this fails, a broken response template is accepted (and fails mid-stream) or its
    error does not say what is wrong."""
    with pytest.raises(ConfigError, match=named):
        load_template(spec)


def test_a_malformed_region_can_be_kept_as_text() -> None:
    """If this fails, malformed="text" raises on a call with broken JSON (closed or cut off by
    the end of the output) or loses its text, or the default stops raising as the format's
    reference does."""
    template = builtin_template("qwen3")
    assert parse_response("Hi <tool_call>{bad</tool_call> there", template,
                          malformed="text")["content"] == "<tool_call>{bad</tool_call> there"
    assert parse_response("<tool_call>{bad", template, malformed="text") == {
        "role": "assistant", "content": "<tool_call>{bad"}
    with pytest.raises(ValueError, match="json"):
        parse_response("<tool_call>{bad", template)


@pytest.mark.parametrize(("template", "prompt", "inside"), [
    ("deepseek-r1", "<｜User｜>2+2?<｜Assistant｜><think>\n", True),
    ("qwen3-xml", "<|im_start|>assistant\n<think>\n", True),
    ("qwen3-xml", "<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
    ("qwen3", "<|im_start|>assistant\n", False),
    ("gpt-oss", "<|start|>assistant", False),
    ("mistral-reasoning", "[INST]2+2?[/INST]", False),
    # DeepSeek-V3.1: thinking={"thinking": True} opens it, off closes it at once.
    ("deepseek-v3.1", "<｜User｜>2+2?<｜Assistant｜><think>", True),
    ("deepseek-v3.1", "<｜User｜>2+2?<｜Assistant｜><think></think>", False),
    # Granite 3.3 writes its own <think>, whether its system text asked for it or not.
    ("granite", "<|start_of_role|>user<|end_of_role|>2+2?<|end_of_text|>\n"
                "<|start_of_role|>assistant<|end_of_role|>", False),
])
def test_starts_in_reasoning_from_the_prompt_tail(template: str, prompt: str,
                                                  inside: bool) -> None:
    """If this fails, the engine would take a thinking model's reasoning for its answer (or
    the reverse) because the prompt's opening (or closed) reasoning tag was misread."""
    assert builtin_template(template).starts_in_reasoning(prompt) is inside


def test_reasoning_closers() -> None:
    """If this fails, the policy cannot learn where a family's reasoning ends."""
    assert builtin_template("deepseek-r1").reasoning_closers == ("</think>",)
    assert builtin_template("gpt-oss").reasoning_closers == ("<|end|>",)
    assert builtin_template("gemma-4").reasoning_closers == ("<channel|>",)
    assert builtin_template("mistral-reasoning").reasoning_closers == ("[/THINK]",)
    assert builtin_template("granite").reasoning_closers == ("</think>",)
