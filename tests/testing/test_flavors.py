"""The loopback server as vLLM, llama.cpp's server and llama-cpp-python's server: their tokenizer
and template endpoints with the served model's own template, the BOS a tokenizer adds to raw
prompts, each server's ``/v1/models``, TGI's ``tool_choice``, and the record of every request.

If one of these fails, tests of server-side rendering would pass against a double that no real
server resembles."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from specthink.backends import OpenAICompletionsBackend
from specthink.errors import InStreamError
from specthink.testing import Fault, LoopbackServer, ScriptedModel
from specthink.testing._templates import (
    CHAT_TEMPLATES,
    Vocabulary,
    template_for_model,
    token_strings,
)
from specthink.testing.models import Tokenizer
from tests.support import stream_tokens

Start = Callable[..., LoopbackServer]
R1 = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
R1_BOS = "<｜begin▁of▁sentence｜>"
USER = [{"role": "user", "content": "2+2?"}]
TOOL = {"type": "function", "function": {"name": "add", "description": "Add",
                                         "parameters": {"type": "object"}}}
OTHER = {"type": "function", "function": {"name": "mul", "parameters": {"type": "object"}}}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def serve(start: Start, flavor: str, model_id: str = R1, **options: Any) -> LoopbackServer:
    return start(ScriptedModel.single("Fine.</think>Four."), model_id=model_id, flavor=flavor,
                 **options)


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize(("model_id", "name"), [
    (R1, "deepseek-r1"), ("Qwen/Qwen3-8B", "qwen3"), ("Qwen/QwQ-32B", "qwen3"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama3"), ("Qwen/Qwen2.5-7B-Instruct", "chatml"),
    ("specthink/scripted", "chatml"),
])
def test_the_model_id_picks_its_familys_template(model_id: str, name: str) -> None:
    """A server renders with the model's own template; if this fails, a loopback server named
    after a model family renders another family's prompt."""
    assert template_for_model(model_id).name == name


def test_each_template_has_its_familys_markers() -> None:
    """If this fails, tests of BOS handling and of reasoning opened by the prompt have no
    template that starts with BOS or ends inside ``<think>``."""
    r1 = CHAT_TEMPLATES["deepseek-r1"].render([{"role": "system", "content": "S"}, *USER])
    assert r1 == f"{R1_BOS}S<｜User｜>2+2?<｜Assistant｜><think>\n"
    qwen3 = CHAT_TEMPLATES["qwen3"].render(USER)
    assert qwen3 == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    llama3 = CHAT_TEMPLATES["llama3"].render(USER)
    assert llama3 == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?"
                      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert CHAT_TEMPLATES["chatml"].bos_token == CHAT_TEMPLATES["qwen3"].bos_token == ""
    with_tools = CHAT_TEMPLATES["deepseek-r1"].render(USER, [TOOL])
    assert with_tools.startswith(f"{R1_BOS}# Tools\n") and json.dumps(TOOL) in with_tools


ROUND_TRIP = [
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]},
    {"role": "tool", "content": "5"},
    {"role": "tool", "content": "6"},
]


def test_tool_turns_in_each_familys_layout() -> None:
    """vLLM and llama.cpp hand tool calls to the template (TGI keeps only role and content);
    tool results go where each family puts them. If this fails, tests of tool round trips on
    the vLLM path see TGI's flattening."""
    chatml = CHAT_TEMPLATES["chatml"].render(ROUND_TRIP, tool_calls=True)
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n'
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n"
            "<tool_response>\n6\n</tool_response><|im_end|>\n") in chatml
    flattened = CHAT_TEMPLATES["chatml"].render(ROUND_TRIP)
    assert "<tool_call>" not in flattened and "<tool_response>\n5" in flattened
    r1 = CHAT_TEMPLATES["deepseek-r1"].render(ROUND_TRIP, tool_calls=True)
    assert "<｜Assistant｜><tool_call>" in r1 and "<｜User｜><tool_response>\n5" in r1
    llama3 = CHAT_TEMPLATES["llama3"].render(ROUND_TRIP, tool_calls=True)
    assert '{"name": "add", "parameters": {"a": 2}}<|eot_id|>' in llama3
    assert llama3.count("<|start_header_id|>ipython<|end_header_id|>") == 2


async def test_vllm_renders_tool_calls_and_tgi_drops_them(
        loopback_server: Start, http: httpx.AsyncClient) -> None:
    """The servers differ exactly where TGI 3.3 flattens: assistant ``tool_calls``."""
    vllm = serve(loopback_server, "vllm")
    ids = (await http.post(f"{vllm.url}/tokenize", json={"messages": ROUND_TRIP})).json()
    text = (await http.post(f"{vllm.url}/detokenize", json=ids)).json()["prompt"]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2}}' in text
    tgi = serve(loopback_server, "tgi")
    rendered = (await http.post(f"{tgi.url}/chat_tokenize",
                                json={"messages": ROUND_TRIP})).json()["templated_text"]
    assert "<tool_call>" not in rendered and "<tool_response>\n5" in rendered


def test_byte_level_and_sentencepiece_token_strings() -> None:
    """vLLM's ``token_strs`` are the vocabulary's spelling; if this fails, the client's
    byte-level decoder is tested against the wrong alphabet."""
    pieces = ["<｜User｜>", "Hi", " é", "\n"]
    assert token_strings(pieces, "byte-level") == ["<｜User｜>", "Hi", "ĠÃ©", "Ċ"]
    assert token_strings(pieces, "sentencepiece") == ["<｜User｜>", "Hi", "▁<0xC3><0xA9>",
                                                      "<0x0A>"]


def test_vocabulary_ids_stay_unique_when_two_pieces_collide() -> None:
    """Token ids are hashes; if this fails, ``/detokenize`` can answer another piece's text."""
    class Colliding(Tokenizer):
        @staticmethod
        def token_id(token: str) -> int:
            return 7

    vocabulary = Vocabulary(Colliding())
    ids = vocabulary.ids(["a", "b", "a"])
    assert ids[0] == ids[2] != ids[1]
    assert vocabulary.pieces(ids) == ["a", "b", "a"]
    assert vocabulary.pieces([123]) is None


def test_bad_options_are_refused() -> None:
    """If this fails, a typo in ``flavor`` silently serves TGI."""
    with pytest.raises(ValueError, match="flavor"):
        LoopbackServer(ScriptedModel.single("x"), flavor="vllm2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chat_template"):
        LoopbackServer(ScriptedModel.single("x"), chat_template="gemma")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- vLLM


async def test_vllm_tokenize_a_prompt_adds_bos_unless_asked_not_to(
        loopback_server: Start, http: httpx.AsyncClient) -> None:
    """vLLM's TokenizeCompletionRequest: ``add_special_tokens`` defaults to true."""
    server = serve(loopback_server, "vllm", max_total_tokens=4096)
    answer = (await http.post(f"{server.url}/tokenize",
                              json={"model": R1, "prompt": "Hi there"})).json()
    assert set(answer) == {"count", "max_model_len", "tokens", "token_strs"}
    assert (answer["count"], answer["max_model_len"], answer["token_strs"]) == (3, 4096, None)
    bare = (await http.post(f"{server.url}/tokenize", json={
        "prompt": "Hi there", "add_special_tokens": False, "return_token_strs": True})).json()
    assert bare["tokens"] == answer["tokens"][1:]
    assert bare["token_strs"] == ["Hi", "Ġthere"]


async def test_vllm_tokenize_messages_renders_the_template_and_detokenize_reverses_it(
        loopback_server: Start, http: httpx.AsyncClient) -> None:
    """TokenizeChatRequest: the template writes BOS itself, so none is added on top by
    default; ``tools`` reach the template; ``/detokenize`` keeps special tokens."""
    server = serve(loopback_server, "vllm")
    answer = (await http.post(f"{server.url}/tokenize", json={
        "messages": USER, "add_generation_prompt": True, "tools": [TOOL],
        "return_token_strs": True})).json()
    assert answer["token_strs"][0] == R1_BOS and answer["token_strs"].count(R1_BOS) == 1
    text = (await http.post(f"{server.url}/detokenize",
                            json={"tokens": answer["tokens"]})).json()
    assert text == {"prompt": server.template.render(USER, [TOOL])}
    doubled = (await http.post(f"{server.url}/tokenize", json={
        "messages": USER, "add_special_tokens": True})).json()
    assert doubled["tokens"][:2] == [answer["tokens"][0]] * 2


@pytest.mark.parametrize(("body", "status"), [
    ({"text": "x"}, 400),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "add", "arguments": {}}}]}]},
     400),
    ({"prompt": "x", "model": "other/model"}, 404),
    ({"messages": USER, "add_generation_prompt": True, "continue_final_message": True}, 400),
])
async def test_vllm_tokenize_errors(loopback_server: Start, http: httpx.AsyncClient,
                                    body: dict[str, Any], status: int) -> None:
    """vLLM answers validation errors with 400 and an unknown model with 404, in its
    ``{"error": {message, type, param, code}}`` form."""
    server = serve(loopback_server, "vllm")
    answer = await http.post(f"{server.url}/tokenize", json=body)
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == status


async def test_vllm_models_report_max_model_len_and_tgi_info_the_model_id(
        loopback_server: Start, http: httpx.AsyncClient) -> None:
    """A DeepSeek-R1 id is reported where each server reports it; vLLM's ModelCard carries
    ``max_model_len``."""
    vllm = serve(loopback_server, "vllm", max_total_tokens=2048)
    card = (await http.get(f"{vllm.url}/v1/models")).json()["data"][0]
    assert (card["id"], card["max_model_len"], card["owned_by"]) == (R1, 2048, "vllm")
    tgi = serve(loopback_server, "tgi")
    assert (await http.get(f"{tgi.url}/info")).json()["model_id"] == R1


async def test_each_flavor_serves_only_its_own_endpoints(loopback_server: Start,
                                                         http: httpx.AsyncClient) -> None:
    """If this fails, a client's detection of what a server speaks is tested against a server
    that speaks everything."""
    expected = {
        "vllm": {"/info": 404, "/chat_tokenize": 404, "/apply-template": 404,
                 "/extras/tokenize": 404, "/detokenize": 400},
        "llamacpp": {"/info": 404, "/chat_tokenize": 404, "/extras/tokenize": 404,
                     "/apply-template": 400},
        "llama-cpp-python": {"/tokenize": 404, "/apply-template": 404, "/detokenize": 404,
                             "/extras/tokenize": 422},
    }
    for flavor, statuses in expected.items():
        server = serve(loopback_server, flavor)
        for path, status in statuses.items():
            method = "GET" if path == "/info" else "POST"
            answer = await http.request(method, f"{server.url}{path}", json={})
            assert answer.status_code == status, (flavor, path)


async def test_completions_see_the_bos_the_tokenizer_adds(loopback_server: Start,
                                                          http: httpx.AsyncClient) -> None:
    """Real servers prepend BOS to a raw prompt; if this fails, a test cannot tell a prompt
    that carries BOS itself (so the model sees two) from one that does not."""
    server = serve(loopback_server, "vllm")
    prompt = "<｜User｜>2+2?<｜Assistant｜><think>\n"
    await http.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 4})
    await http.post(f"{server.url}/v1/completions",
                    json={"prompt": prompt, "max_tokens": 4, "add_special_tokens": False})
    first, second = server.records
    assert first.model_input == R1_BOS + prompt and second.model_input == prompt
    assert first.prompt_tokens == second.prompt_tokens + 1
    chatml = serve(loopback_server, "vllm", model_id="Qwen/Qwen2.5-7B")
    await http.post(f"{chatml.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert chatml.records[0].model_input == "Hi"


# --------------------------------------------------------------------------- llama.cpp


async def test_llamacpp_apply_template_leaves_out_the_bos_it_adds(
        loopback_server: Start, http: httpx.AsyncClient) -> None:
    """llama.cpp's common_chat_templates_apply cuts a leading BOS text when the vocabulary adds
    BOS; ``/tokenize`` adds it only with ``add_special``."""
    server = serve(loopback_server, "llamacpp")
    answer = (await http.post(f"{server.url}/apply-template", json={"messages": USER})).json()
    assert answer == {"prompt": "<｜User｜>2+2?<｜Assistant｜><think>\n"}
    pieces = (await http.post(f"{server.url}/tokenize", json={
        "content": "Hi", "add_special": True, "with_pieces": True})).json()["tokens"]
    assert [p["piece"] for p in pieces] == [R1_BOS, "Hi"]
    ids = [p["id"] for p in pieces]
    assert (await http.post(f"{server.url}/tokenize", json={"content": "Hi"})).json() == {
        "tokens": ids[1:]}
    assert (await http.post(f"{server.url}/detokenize", json={"tokens": ids})).json() == {
        "content": R1_BOS + "Hi"}
    assert (await http.post(f"{server.url}/tokenize", json={"prompt": "Hi"})).json() == {
        "tokens": []}
    props = (await http.get(f"{server.url}/props")).json()
    assert props["bos_token"] == R1_BOS


async def test_llama_cpp_python_extras(loopback_server: Start,
                                       http: httpx.AsyncClient) -> None:
    """llama-cpp-python's tokenizer lives under ``/extras`` and adds BOS."""
    server = serve(loopback_server, "llama-cpp-python", model_id="specthink/scripted")
    tokens = (await http.post(f"{server.url}/extras/tokenize", json={"input": "Hi there"})).json()
    count = (await http.post(f"{server.url}/extras/tokenize/count",
                             json={"input": "Hi there"})).json()
    text = (await http.post(f"{server.url}/extras/detokenize", json=tokens)).json()
    assert (len(tokens["tokens"]), count, text) == (2, {"count": 2}, {"text": "Hi there"})


# --------------------------------------------------------------------------- TGI tool_choice


@pytest.mark.parametrize(("tool_choice", "offered"), [
    ("auto", ["add", "mul", "no_tool"]),
    ("required", ["add", "mul"]),
    ("mul", ["mul"]),
    ({"type": "function", "function": {"name": "add"}}, ["add"]),
    ({"function": {"name": "add"}}, ["add"]),
    ("none", []),
    (None, []),
])
async def test_tgi_chat_tokenize_applies_tool_choice(loopback_server: Start,
                                                     http: httpx.AsyncClient,
                                                     tool_choice: Any,
                                                     offered: list[str]) -> None:
    """TGI's ToolGrammar::apply: ``no_tool`` only with auto; a name narrows the tools."""
    server = serve(loopback_server, "tgi", model_id="specthink/scripted")
    answer = await http.post(f"{server.url}/chat_tokenize", json={
        "messages": USER, "tools": [TOOL, OTHER], "tool_choice": tool_choice})
    text = answer.json()["templated_text"]
    rendered = [json.loads(line)["function"]["name"] for line in text.splitlines()
                if line.startswith('{"type": "function"')]
    assert rendered == offered


@pytest.mark.parametrize(("tool_choice", "error_type"), [
    ("divide", "tool_error"),
    ({"type": "function", "function": {"name": "divide"}}, "tool_error"),
    ({"type": "tool", "function": {"name": "add"}}, "validation"),
    (3, "validation"),
])
async def test_tgi_chat_tokenize_rejects_tool_choices_as_tgi(
        loopback_server: Start, http: httpx.AsyncClient, tool_choice: Any,
        error_type: str) -> None:
    """A name not among the tools is TGI's 422 ``tool_error``; a malformed choice does not
    deserialize (422 ``validation``)."""
    server = serve(loopback_server, "tgi", model_id="specthink/scripted")
    answer = await http.post(f"{server.url}/chat_tokenize", json={
        "messages": USER, "tools": [TOOL], "tool_choice": tool_choice})
    assert (answer.status_code, answer.json()["error_type"]) == (422, error_type)


# --------------------------------------------------------------------------- calls


async def test_every_request_is_recorded_in_order_with_its_status(
        loopback_server: Start, http: httpx.AsyncClient) -> None:
    """Tests count what a conversation asked before its first generation request from
    ``calls``; if this fails, they count nothing or the wrong requests."""
    server = serve(loopback_server, "vllm")
    await http.get(f"{server.url}/v1/models")
    await http.post(f"{server.url}/tokenize", json={"prompt": "x"})
    await http.get(f"{server.url}/info")
    await http.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
    calls = server.calls
    assert [(c.method, c.path, c.status, c.generation) for c in calls] == [
        ("GET", "/v1/models", 200, False), ("POST", "/tokenize", 200, False),
        ("GET", "/info", 404, False), ("POST", "/v1/completions", 200, True)]
    assert [c.started for c in calls] == sorted(c.started for c in calls)
    assert len(server.records) == 1
    server.reset()
    assert server.calls == []


# --------------------------------------------------------------------------- /v1/completions


def events(body: str) -> list[Any]:
    return [json.loads(line[len("data: "):]) for line in body.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


async def test_vllm_completion_stream_has_its_own_usage_chunk(
        loopback_server: Start, http: httpx.AsyncClient) -> None:
    """vLLM: OpenAI's finish reasons, the end-of-sequence step as an empty "stop" chunk, the
    usage in a chunk with no choices only when asked. If this fails, the client's handling of
    vLLM's stream is tested against TGI's."""
    server = serve(loopback_server, "vllm")
    request = {"prompt": "<｜User｜>2+2?<｜Assistant｜>", "max_tokens": 32, "stream": True,
               "temperature": 0, "stream_options": {"include_usage": True}}
    answer = await http.post(f"{server.url}/v1/completions", json=request)
    assert answer.text.endswith("data: [DONE]\n\n")
    stream = events(answer.text)
    *tokens, finish, usage = stream
    assert "".join(c["choices"][0]["text"] for c in tokens) == "Fine.</think>Four."
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens)
    assert finish["choices"] == [{"index": 0, "text": "", "logprobs": None,
                                  "finish_reason": "stop", "stop_reason": None}]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == (
        server.records[-1].prompt_tokens)
    without = await http.post(f"{server.url}/v1/completions",
                              json={**request, "stream_options": None})
    assert all(c["choices"] for c in events(without.text))
    plain = (await http.post(f"{server.url}/v1/completions",
                             json={"prompt": request["prompt"], "max_tokens": 2})).json()
    assert plain["choices"][0]["finish_reason"] == "length" and "usage" in plain


async def test_the_backend_reads_each_flavors_usage(loopback_server: Start) -> None:
    """The prompt count arrives from vLLM (BOS included) and llama.cpp; llama-cpp-python's
    server sends none in a stream. If this fails, ``input_tokens`` tests prove nothing about
    the vLLM path."""
    for flavor, counted in (("vllm", True), ("llamacpp", True), ("llama-cpp-python", False)):
        server = serve(loopback_server, flavor)
        tokens = await stream_tokens(OpenAICompletionsBackend(server.url),
                                     "<｜User｜>Hi<｜Assistant｜>", max_new_tokens=16)
        assert "".join(t.text for t in tokens) == "Fine.</think>Four."
        assert tokens[-1].finish_reason == "eos"
        expected = server.records[-1].prompt_tokens if counted else None
        assert tokens[-1].input_tokens == expected, flavor


async def test_an_injected_error_event_has_vllms_shape(loopback_server: Start) -> None:
    """vLLM reports an error inside the stream as ``{"error": {message, type}}``; the client
    still sees the error type (so overload is retried)."""
    server = serve(loopback_server, "vllm")
    server.inject(Fault.error_event(after_tokens=1, error_type="generation"))
    with pytest.raises(InStreamError) as info:
        await stream_tokens(OpenAICompletionsBackend(server.url), "<｜User｜>Hi<｜Assistant｜>",
                            max_new_tokens=16)
    assert info.value.error_type == "generation"
