"""Every family's scripted pair (tests/core/formats/family_pairs.py) through the engine, named
by its model ids alone: the reasoning is exactly the reasoning, the answer exactly the answer,
the call exactly the call (never the decoy drafted in the reasoning), after a takeover; and a
tool's result is answered, the earlier turn's reasoning shown where the template shows it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from specthink.output import split_result
from specthink.settings import PairSettings
from tests.core.formats.family_pairs import (
    ARGUMENTS,
    FAMILIES,
    FINAL_ANSWER,
    FINAL_REASONING,
    PLAIN_ANSWER,
    PLAIN_REASONING,
    QUESTION,
    TOOL_RESULT,
    WEATHER,
    start_family_pair,
)

EARLIER = "The user wants the weather in Paris; the tool knows it."


@pytest.mark.parametrize("name", sorted(FAMILIES))
async def test_each_family_answers_calls_and_reads_a_tools_result(
        loopback_server: Callable[..., object], name: str) -> None:
    """If this fails, a pair of this family named by its model ids splits its own output
    wrongly (reasoning in the answer, a call left as text or read from the reasoning), has no
    takeover, or cannot go on after a tool's result."""
    pair = start_family_pair(loopback_server, name)
    family = pair.family
    engine = PairSettings(**pair.settings).build()
    try:
        plain = await engine.agenerate([{"role": "user", "content": "What is 12 * 13?"}])
        call = await engine.agenerate([{"role": "user", "content": QUESTION}], tools=WEATHER)
        history = family.history(EARLIER)
        final = await engine.agenerate(history, tools=WEATHER)
    finally:
        await engine.aclose()
    whole = split_result(plain)
    assert (whole.reasoning, whole.answer, whole.tool_calls) == (PLAIN_REASONING, PLAIN_ANSWER,
                                                                 [])
    whole = split_result(call)
    assert (whole.reasoning, whole.answer) == (family.call_reasoning, family.call_answer)
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [("get_weather", ARGUMENTS)]
    whole = split_result(final)
    assert (whole.reasoning, whole.answer, whole.tool_calls) == (FINAL_REASONING, FINAL_ANSWER,
                                                                 [])
    assert all(result.stats.total_takeovers >= 1 for result in (plain, call, final))
    if family.shows_earlier_reasoning(EARLIER):
        answering = [prompt for prompt in pair.prompts if TOOL_RESULT in prompt]
        assert answering and all(EARLIER in prompt for prompt in answering)


@pytest.mark.parametrize("name", sorted(FAMILIES))
async def test_each_family_splits_over_llama_cpp_as_over_vllm(
        loopback_server: Callable[..., object], name: str) -> None:
    """If this fails, a family's pair behind llama.cpp's servers splits otherwise than behind
    vLLM: llama.cpp writes a special token's text only when the request names it in
    ``preserved_tokens`` (the format's ``marker_tokens``), and writes a named stop token's text
    too, which must stay out of the answer as vLLM leaves it out."""
    outputs = []
    for flavor in ("vllm", "llamacpp"):
        pair = start_family_pair(loopback_server, name, flavor)
        engine = PairSettings(**pair.settings).build()
        try:
            results = [
                await engine.agenerate([{"role": "user", "content": "What is 12 * 13?"}]),
                await engine.agenerate([{"role": "user", "content": QUESTION}], tools=WEATHER),
                await engine.agenerate(pair.family.history(EARLIER), tools=WEATHER)]
        finally:
            await engine.aclose()
        outputs.append([(whole.reasoning, whole.answer,
                         [(c.name, c.arguments) for c in whole.tool_calls])
                        for whole in map(split_result, results)])
        stops = pair.family.template.stop_tokens
        assert not [s for r in results for s in stops if r.text.endswith(s)]
    assert outputs[1] == outputs[0]


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
async def test_each_family_honours_a_required_call(
        loopback_server: Callable[..., object], name: str, choice: object) -> None:
    """If this fails, a required or named ``tool_choice`` on this family opens the call
    otherwise than its model writes one (the model, continuing the opener, breaks off), or the
    call is not read after the opener."""
    pair = start_family_pair(loopback_server, name)
    engine = PairSettings(**pair.settings).build()
    try:
        result = await engine.agenerate([{"role": "user", "content": QUESTION}], tools=WEATHER,
                                        tool_choice=choice)
    finally:
        await engine.aclose()
    whole = split_result(result)
    assert whole.reasoning == pair.family.call_reasoning
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [("get_weather", ARGUMENTS)]
