"""``specthink serve`` in front of a gpt-oss pair over vLLM-protocol servers that render the
real gpt-oss chat template (tests/core/formats/test_pair_formats.py sets it up), with
``response_template="gpt-oss"``: through the openai SDK, the content is exactly the answer and
the reasoning exactly the reasoning, whole and streamed, after a takeover."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.core.formats.test_pair_formats import ANSWER, REASONING, start
from tests.serve.conftest import client


def test_gpt_oss_through_serve(loopback_server: Callable[..., object],
                               serve: Callable[..., Any]) -> None:
    """If this fails, an OpenAI client of a gpt-oss pair gets harmony's reasoning as content
    (or loses it), or the answer is cut."""
    served = serve(start(loopback_server), backend="openai", small_model="openai/gpt-oss-20b",
                   target_model="openai/gpt-oss-120b", small_template="server",
                   target_template="server", response_template="gpt-oss")
    sdk = client(served)
    completion = sdk.chat.completions.create(
        model="specthink", messages=[{"role": "user", "content": "What is 12 * 13?"}])
    message = completion.choices[0].message
    assert message.content == ANSWER
    assert (message.model_extra or {})["reasoning_content"] == REASONING
    assert sum((completion.model_extra or {})["specthink"]["takeovers"].values()) >= 1
    content, reasoning = "", ""
    for chunk in sdk.chat.completions.create(
            model="specthink", messages=[{"role": "user", "content": "What is 12 * 13?"}],
            stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
    assert (content, reasoning) == (ANSWER, REASONING)
