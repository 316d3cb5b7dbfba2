"""The loopback server's answers and the backends' requests, validated against TGI's own OpenAPI
file (a copy of TGI 3.3's ``openapi.json`` lives in ``tests/data`` so the suite needs nothing
outside the repository).

If one of these fails, the test double has drifted from the real server's wire format, and a
client bug could hide behind it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from specthink.backends import OpenAICompletionsBackend, SamplingParams, TGIBackend
from specthink.backends.openai import completion_body
from specthink.testing import Fault, LoopbackServer, ScriptedModel

SPEC = Path(__file__).parents[1] / "data" / "tgi-openapi.json"
PROMPT = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
ANSWER = "Two plus two is four."


def _openapi_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 marks optional nulls with ``nullable: true``; JSON Schema says
    ``{"type": "null"}``. Everything else in TGI's file is already JSON Schema 2020-12."""
    if isinstance(node, list):
        return [_openapi_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _openapi_to_json_schema(value) for key, value in node.items()}
    if converted.pop("nullable", False) is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@cache
def _components() -> dict[str, Any]:
    spec = json.loads(SPEC.read_text(encoding="utf-8"))
    assert spec["info"]["title"] == "Text Generation Inference"
    return _openapi_to_json_schema(spec["components"])  # type: ignore[no-any-return]


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": _components()}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def conforms(instance: Any, name: str) -> None:
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{name}: " + "; ".join(
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:5])


def events(body: str) -> list[Any]:
    return [json.loads(line[len("data:"):]) for line in body.splitlines()
            if line.startswith("data:") and line.strip() != "data:[DONE]"]


@pytest.fixture
def server(loopback_server: Callable[..., LoopbackServer]) -> LoopbackServer:
    return loopback_server(ScriptedModel.single(ANSWER), model_id="test/conformance")


@pytest.fixture
async def http(server: LoopbackServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url) as client:
        yield client


# --------------------------------------------------------------------------- the validator


def test_the_validator_rejects_what_tgi_would_not_send() -> None:
    assert not validator("StreamResponse").is_valid({"index": 1})
    assert not validator("GenerateRequest").is_valid(
        {"inputs": "x", "parameters": {"temperature": 0.0}})
    assert not validator("GenerateRequest").is_valid(
        {"inputs": "x", "parameters": {"top_p": 1.5}})
    assert validator("StreamResponse").is_valid(
        {"index": 1, "token": {"id": 1, "text": "a", "logprob": None, "special": False},
         "generated_text": None, "details": None})


# --------------------------------------------------------------------------- server answers


async def test_info(http: httpx.AsyncClient) -> None:
    conforms((await http.get("/info")).json(), "Info")


@pytest.mark.parametrize("parameters", [
    {"max_new_tokens": 32, "details": True, "do_sample": False},
    {"max_new_tokens": 3, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 5},
    {"max_new_tokens": 32, "details": False, "stop": ["four"]},
])
async def test_generate_stream_events(http: httpx.AsyncClient,
                                      parameters: dict[str, Any]) -> None:
    answer = await http.post("/generate_stream", json={"inputs": PROMPT,
                                                       "parameters": parameters})
    assert answer.headers["content-type"].startswith("text/event-stream")
    stream = events(answer.text)
    assert len(stream) >= 2
    for event in stream:
        conforms(event, "StreamResponse")
    assert stream[-1]["generated_text"] is not None
    assert (stream[-1]["details"] is not None) == parameters.get("details", True)


async def test_error_event_inside_a_stream(http: httpx.AsyncClient,
                                           server: LoopbackServer) -> None:
    server.inject(Fault.error_event(after_tokens=1))
    stream = events((await http.post("/generate_stream", json={"inputs": PROMPT})).text)
    conforms(stream[0], "StreamResponse")
    conforms(stream[-1], "ErrorResponse")


@pytest.mark.parametrize("decoder_input_details", [False, True])
async def test_generate(http: httpx.AsyncClient, decoder_input_details: bool) -> None:
    answer = await http.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 8, "decoder_input_details": decoder_input_details}})
    conforms(answer.json(), "GenerateResponse")


async def test_tokenize(http: httpx.AsyncClient) -> None:
    conforms((await http.post("/tokenize", json={"inputs": PROMPT})).json(), "TokenizeResponse")


async def test_chat_tokenize(http: httpx.AsyncClient) -> None:
    tool = {"type": "function", "function": {"name": "add", "description": "Add numbers",
                                             "parameters": {"type": "object"}}}
    answer = await http.post("/chat_tokenize", json={
        "model": "tgi", "messages": [{"role": "user", "content": "2+2?"}], "tools": [tool]})
    conforms(answer.json(), "ChatTokenizeResponse")


TOOL = {"type": "function", "function": {"name": "add", "description": "Add numbers",
                                         "arguments": {"type": "object"}}}


@pytest.mark.parametrize("tool_choice", [
    "auto", "none", "required", {"type": "function", "function": {"name": "add"}}])
async def test_chat_tokenize_with_tool_choice(http: httpx.AsyncClient, tool_choice: Any) -> None:
    body = {"model": "tgi", "messages": [{"role": "user", "content": "2+2?"}], "tools": [TOOL],
            "tool_choice": tool_choice}
    conforms(body, "ChatRequest")
    answer = await http.post("/chat_tokenize", json=body)
    conforms(answer.json(), "ChatTokenizeResponse")


async def test_chat_tokenize_tool_error_body(http: httpx.AsyncClient) -> None:
    answer = await http.post("/chat_tokenize", json={
        "model": "tgi", "messages": [{"role": "user", "content": "x"}], "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "divide"}}})
    assert (answer.status_code, answer.json()["error_type"]) == (422, "tool_error")
    conforms(answer.json(), "ErrorResponse")


@pytest.mark.parametrize("status", [424, 429, 500, 503])
async def test_error_bodies(http: httpx.AsyncClient, server: LoopbackServer,
                            status: int) -> None:
    server.inject(Fault.status(status))
    answer = await http.post("/generate_stream", json={"inputs": PROMPT})
    assert answer.status_code == status
    conforms(answer.json(), "ErrorResponse")


async def test_validation_error_body(http: httpx.AsyncClient) -> None:
    answer = await http.post("/generate", json={"inputs": PROMPT,
                                                "parameters": {"top_p": 1.0}})
    assert answer.status_code == 422
    conforms(answer.json(), "ErrorResponse")


async def test_completions_stream_chunks(http: httpx.AsyncClient) -> None:
    answer = await http.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 32, "stream": True, "temperature": 0})
    assert answer.text.rstrip().endswith("data:[DONE]")
    stream = events(answer.text)
    for chunk in stream:
        conforms(chunk, "Chunk")
    conforms(stream[-1], "CompletionFinal")
    assert stream[-1]["choices"][0]["finish_reason"] == "eos_token"


async def test_completions_without_stream(http: httpx.AsyncClient) -> None:
    answer = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    conforms(answer.json(), "CompletionFinal")
    assert answer.json()["choices"][0]["finish_reason"] == "length"


async def test_models(http: httpx.AsyncClient) -> None:
    listing = (await http.get("/v1/models")).json()
    assert listing["object"] == "list"
    conforms(listing["data"][0], "ModelInfo")


# --------------------------------------------------------------------------- client requests


class Capture:
    def __init__(self, answer: httpx.Response) -> None:
        self.answer = answer
        self.bodies: list[Any] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        return self.answer


@pytest.mark.parametrize("sampling", [
    SamplingParams(),
    SamplingParams(temperature=0.0, top_p=1.0),
    SamplingParams(temperature=0.6, top_p=0.95, top_k=50, seed=7, repetition_penalty=1.1),
    SamplingParams(temperature=1.0, top_p=1.0, grammar={
        "type": "json", "value": {"properties": {"x": {"type": "integer"}}}}),
])
async def test_tgi_backend_requests(sampling: SamplingParams) -> None:
    final = {"index": 1, "token": {"id": 2, "text": "</s>", "logprob": 0.0, "special": True},
             "generated_text": "", "details": {"finish_reason": "eos_token",
                                               "generated_tokens": 1, "input_length": 3}}
    capture = Capture(httpx.Response(200, content=f"data:{json.dumps(final)}\n\n".encode()))
    async with httpx.AsyncClient(transport=httpx.MockTransport(capture)) as client:
        backend = TGIBackend("http://tgi.test", client=client)
        async with backend.stream(PROMPT, max_new_tokens=16, sampling=sampling) as tokens:
            assert [t.finish_reason async for t in tokens] == ["eos"]
    conforms(capture.bodies[0], "GenerateRequest")


async def test_render_chat_request() -> None:
    capture = Capture(httpx.Response(200, json={"templated_text": "x", "tokenize_response": []}))
    async with httpx.AsyncClient(transport=httpx.MockTransport(capture)) as client:
        backend = TGIBackend("http://tgi.test", client=client)
        await backend.render_chat([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "2+2?"}])
    conforms(capture.bodies[0], "ChatRequest")


@pytest.mark.parametrize("tool_choice", ["auto", "none", "required", "any", "add",
                                         {"type": "function", "function": {"name": "add"}}])
async def test_render_chat_request_with_tool_choice(tool_choice: Any) -> None:
    capture = Capture(httpx.Response(200, json={"templated_text": "x", "tokenize_response": []}))
    async with httpx.AsyncClient(transport=httpx.MockTransport(capture)) as client:
        backend = TGIBackend("http://tgi.test", client=client)
        await backend.render_chat([{"role": "user", "content": "2+2?"}], [TOOL],
                                  tool_choice=tool_choice)
    conforms(capture.bodies[0], "ChatRequest")


@pytest.mark.parametrize("sampling", [SamplingParams(),
                                      SamplingParams(temperature=0.6, top_p=0.95, seed=7)])
def test_completion_requests(sampling: SamplingParams) -> None:
    body = completion_body(PROMPT, model="tgi", max_new_tokens=16, sampling=sampling)
    # TGI's Prompt deserializer takes a string or a list; its schema only shows the list.
    conforms({**body, "prompt": [body["prompt"]]}, "CompletionRequest")


async def test_openai_backend_against_the_loopback_completions(server: LoopbackServer) -> None:
    backend = OpenAICompletionsBackend(server.url, model="tgi")
    async with backend.stream(PROMPT, max_new_tokens=32, sampling=SamplingParams()) as tokens:
        text = "".join([t.text async for t in tokens])
    await backend.aclose()
    assert text == ANSWER
