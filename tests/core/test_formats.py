"""``OutputFormat``: the one description of the output's markup, read by the engine, the
policy and the splitter alike; ``held_back``: the one hold-back rule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from specthink import SpeculativeThinker, TakeoverRules
from specthink.formats import THINK_HERMES, OutputFormat, Span, held_back
from specthink.output import OutputSplitter, split_result
from specthink.rules import TakeoverPolicy
from specthink.testing.inprocess import ScriptedBackend
from specthink.testing.models import ScriptedModel
from specthink.trace import FinishEvent, Result, StartEvent

BRACKETS = OutputFormat(name="brackets", reasoning=Span("[THINK]", "[/THINK]"),
                        tool_call=Span("[CALL]", "[/CALL]"))
ANSWER = ('[THINK]Two and two.[/THINK]Four. '
          '[CALL]{"name": "add", "arguments": {"a": 2, "b": 2}}[/CALL]')
TOOL = {"type": "function", "function": {"name": "add", "parameters": {}}}


def _brute(text: str, markers: list[str]) -> int:
    return max((size for marker in markers for size in range(1, len(marker))
                if size <= len(text) and text.endswith(marker[:size])), default=0)


@given(st.text(alphabet="<th/k>ab", max_size=12),
       st.lists(st.text(alphabet="<th/k>ab", min_size=1, max_size=6), max_size=4))
def test_held_back_is_the_longest_end_that_may_still_become_a_marker(
        text: str, markers: list[str]) -> None:
    """Broken: the hold-back shows the start of a tag or stop sequence too early, or holds
    back more than can still become one."""
    assert held_back(text, markers) == _brute(text, markers)


def test_the_default_format_is_think_and_hermes_calls() -> None:
    """Broken: the default markup is not ``<think>`` and ``<tool_call>``."""
    assert THINK_HERMES.reasoning == Span("<think>", "</think>")
    assert THINK_HERMES.tool_call == Span("<tool_call>", "</tool_call>")
    assert THINK_HERMES.opened_by("<|im_start|>assistant\n<think>\n")
    assert not THINK_HERMES.opened_by("<|im_start|>assistant\n")


def test_the_rules_thinking_end_moves_the_end_of_the_reasoning() -> None:
    """Broken: ``TakeoverRules.thinking_end`` no longer says where the policy's reasoning
    ends, or the format's close is not the default."""
    assert TakeoverPolicy(TakeoverRules.paper()).output_format is THINK_HERMES
    moved = TakeoverPolicy(TakeoverRules.paper(thinking_end="</reasoning>"))
    assert moved.output_format.reasoning == Span("<think>", "</reasoning>")


async def test_another_format_flows_through_engine_policy_and_splitter() -> None:
    """Broken: some part still assumes ``<think>``/``<tool_call>`` (the engine's reasoning
    statistics, the stream's StartEvent, the splitter's reasoning or tool-call reading)."""
    model = ScriptedModel.single(ANSWER)
    thinker = SpeculativeThinker(
        small=ScriptedBackend(model, url="inprocess://small"),
        target=ScriptedBackend(model, url="inprocess://target"),
        small_template="chatml", target_template="chatml", output_format=BRACKETS)
    splitter = OutputSplitter()
    shown: list[tuple[str, str]] = []
    result: Result | None = None
    async for event in thinker.astream([{"role": "user", "content": "2 + 2?"}], tools=[TOOL]):
        if isinstance(event, StartEvent):
            assert event.output_format is BRACKETS
        if isinstance(event, FinishEvent):
            result = event.result
        shown.extend((delta.kind, delta.text) for delta in splitter.feed(event))
    final = splitter.finish()
    assert result is not None
    assert "".join(text for kind, text in shown if kind == "reasoning") == "Two and two."
    assert final.answer == "Four."
    assert [(call.name, call.arguments) for call in final.tool_calls] == [
        ("add", {"a": 2, "b": 2})]
    whole = split_result(result)
    assert (whole.reasoning, whole.answer) == ("Two and two.", "Four.")
    assert [call.name for call in whole.tool_calls] == ["add"]
    assert 0 < result.stats.reasoning_tokens < result.stats.output_tokens
