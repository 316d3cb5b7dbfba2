"""The loopback server serving a model's REAL chat template (tests/data/chat_templates) as vLLM
does: ``/tokenize`` renders messages, tools and ``chat_template_kwargs`` exactly as transformers'
renderer does; ``/v1/completions`` leaves special tokens out of the text unless
``skip_special_tokens`` is false, and never puts the stop token in it (vLLM's
``SamplingParams.skip_special_tokens`` defaults to true; its detokenizer,
``vllm/v1/engine/detokenizer.py`` ``BaseIncrementalDetokenizer.update``, drops the token that
stopped the request unless ``include_stop_str_in_output``).

If one of these fails, tests of the families' formats run against a double that renders or
detokenizes unlike the servers users deploy."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from specthink.formats.families import builtin_template
from specthink.formats.response_template import parse_response
from specthink.testing import JinjaChatTemplate, LoopbackServer, Script, ScriptedModel

chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")

Start = Callable[..., LoopbackServer]
TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
HARMONY_SPECIAL = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>",
                   "<|return|>", "<|call|>")
GPT_OSS = JinjaChatTemplate(
    "gpt-oss", (TEMPLATES / "openai-gpt-oss-120b.jinja").read_text(encoding="utf-8"),
    special_tokens=HARMONY_SPECIAL, stop_tokens=("<|return|>", "<|call|>"))
GEMMA_4 = JinjaChatTemplate(
    "gemma-4", (TEMPLATES / "google-gemma-4-31B-it.jinja").read_text(encoding="utf-8"),
    bos_token="<bos>")
GRANITE = JinjaChatTemplate(
    "granite", (TEMPLATES / "ibm-granite-granite-3.3-2B-Instruct.jinja").read_text(
        encoding="utf-8"))
QWEN3 = JinjaChatTemplate(
    "qwen3", (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8"))
HARMONY_TURN = ("<|channel|>analysis<|message|>The user asks for 2+2.<|end|>"
                "<|start|>assistant<|channel|>final<|message|>Four.<|return|>")
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}}}}}]
CONVERSATION = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": None, "reasoning_content": "Use the tool.",
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "4"},
]


def harmony_model(text: str) -> ScriptedModel:
    """A scripted gpt-oss: writes ``text`` after the prompt's last ``<|start|>assistant``."""
    return ScriptedModel([Script("", text)], markers=("<|start|>assistant",))


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def transformers_render(template: JinjaChatTemplate, messages: list[dict[str, Any]],
                        tools: list[dict[str, Any]] | None, **kwargs: Any) -> str:
    """The prompt as vLLM renders it with transformers (``apply_chat_template``): a null
    content as ``""`` (``chat_utils._parse_chat_message_content``), other keys set to null
    dropped, tool-call arguments decoded."""
    decoded = [{"content": "", **{k: v for k, v in m.items() if v is not None}}
               for m in json.loads(json.dumps(messages))]
    for message in decoded:
        for call in message.get("tool_calls") or ():
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    rendered, _ = chat_template_utils.render_jinja_template(
        [decoded], tools=tools, chat_template=template.source, add_generation_prompt=True,
        bos_token=template.bos_token, eos_token=template.eos_token, **kwargs)
    return str(rendered[0])


async def served_prompt(http: httpx.AsyncClient, server: LoopbackServer,
                        body: dict[str, Any]) -> str:
    tokens = (await http.post(f"{server.url}/tokenize", json=body)).json()["tokens"]
    answer = await http.post(f"{server.url}/detokenize", json={"tokens": tokens})
    return str(answer.json()["prompt"])


@pytest.mark.parametrize(("template", "kwargs"), [
    (GPT_OSS, {}), (GPT_OSS, {"reasoning_effort": "high"}),
    (GEMMA_4, {}), (GEMMA_4, {"enable_thinking": True}),
    (GRANITE, {}), (GRANITE, {"thinking": True}), (QWEN3, {}),
])
async def test_tokenize_renders_the_real_template_as_transformers_does(
        loopback_server: Start, http: httpx.AsyncClient, template: JinjaChatTemplate,
        kwargs: dict[str, Any]) -> None:
    """If this fails, ``/tokenize`` with messages renders a real template unlike vLLM:
    tools, an assistant's tool calls and reasoning, a tool result or ``chat_template_kwargs``
    (Gemma 4's thinking switch, gpt-oss's reasoning effort) are lost or rendered otherwise, or
    a call-only turn's null content breaks templates that concatenate it (Granite, Qwen3)."""
    server = loopback_server(ScriptedModel.single("x"), flavor="vllm", chat_template=template,
                             model_id=f"test/{template.name}")
    body: dict[str, Any] = {"messages": CONVERSATION, "tools": TOOLS}
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    expected = transformers_render(template, CONVERSATION, TOOLS, **kwargs)
    assert await served_prompt(http, server, body) == expected


async def test_the_thinking_switch_reaches_the_template(loopback_server: Start,
                                                        http: httpx.AsyncClient) -> None:
    """If this fails, ``chat_template_kwargs`` do not reach the template, and Gemma 4 (thinking
    off by default) cannot be switched to reasoning."""
    server = loopback_server(ScriptedModel.single("x"), flavor="vllm", chat_template=GEMMA_4,
                             model_id="test/gemma-4")
    body = {"messages": [{"role": "user", "content": "2+2?"}]}
    off = await served_prompt(http, server, body)
    on = await served_prompt(http, server, {**body, "chat_template_kwargs":
                                            {"enable_thinking": True}})
    assert "<|think|>" in on and "<|think|>" not in off
    bad = await http.post(f"{server.url}/tokenize", json={**body, "chat_template_kwargs": [1]})
    assert bad.status_code == 400


async def _completion(http: httpx.AsyncClient, server: LoopbackServer,
                      **extra: Any) -> tuple[str, str, str]:
    """``(text, streamed text, finish reason)`` of one completion."""
    body = {"prompt": "<|start|>user<|message|>2+2?<|end|><|start|>assistant",
            "max_tokens": 200, **extra}
    whole = (await http.post(f"{server.url}/v1/completions", json=body)).json()
    pieces = []
    async with http.stream("POST", f"{server.url}/v1/completions",
                           json={**body, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                pieces.extend(c["text"] for c in json.loads(line[6:])["choices"])
    choice = whole["choices"][0]
    return choice["text"], "".join(pieces), choice["finish_reason"]


async def test_special_tokens_are_dropped_unless_asked_for(loopback_server: Start,
                                                           http: httpx.AsyncClient) -> None:
    """If this fails, the double detokenizes harmony output unlike vLLM: by default the markers
    must vanish (reasoning and answer fused, the failure issue 21 reports), with
    ``skip_special_tokens: false`` they must stay, and the stop token must never show."""
    server = loopback_server(harmony_model(HARMONY_TURN), flavor="vllm",
                             chat_template=GPT_OSS, model_id="openai/gpt-oss-20b")
    text, streamed, finish = await _completion(http, server)
    assert text == streamed == "analysisThe user asks for 2+2.assistantfinalFour."
    assert finish == "stop"
    text, streamed, finish = await _completion(http, server, skip_special_tokens=False)
    kept = HARMONY_TURN.removesuffix("<|return|>")
    assert text == streamed == kept
    assert finish == "stop"
    # What the kept markers are for: the family's response template reads the turn.
    assert parse_response(kept, builtin_template("gpt-oss"), prefix="<|start|>assistant") == {
        "role": "assistant", "reasoning_content": "The user asks for 2+2.", "content": "Four."}


async def test_a_stop_token_ends_the_generation(loopback_server: Start,
                                                http: httpx.AsyncClient) -> None:
    """If this fails, a model's text after its stop token (``<|call|>`` ends a harmony tool
    call) is still generated, or the stop token shows in the text."""
    call = ('<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 2}'
            "<|call|>")
    server = loopback_server(harmony_model(call + "more text"), flavor="vllm",
                             chat_template=GPT_OSS, model_id="openai/gpt-oss-20b")
    text, streamed, finish = await _completion(http, server, skip_special_tokens=False)
    assert text == streamed == call.removesuffix("<|call|>")
    assert finish == "stop"
