"""Server-side chat templates and tokenizers through the backends: vLLM's ``/tokenize`` with
``messages`` (token strings trusted after one check against ``/detokenize``), llama.cpp's
``/apply-template``, none on llama-cpp-python and SGLang; what a server speaks found once per
backend; one BOS at the model; ``tokenize`` and ``count_tokens`` on every flavor."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from specthink.backends import OpenAICompletionsBackend, SamplingParams, TGIBackend
from specthink.backends.openai import ChatRendering, decode_token_strs
from specthink.errors import BackendError, BackendStatusError
from specthink.testing import LoopbackServer, ScriptedModel
from specthink.testing._templates import token_strings
from tests.core.formats.test_pair_formats import GEMMA_4

Start = Callable[..., LoopbackServer]
R1 = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
R1_BOS = "<｜begin▁of▁sentence｜>"
LLAMA3 = "meta-llama/Llama-3.1-8B-Instruct"
QWEN3 = "Qwen/Qwen3-8B"
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 2? Réponds en 日本語 🙂"}]
TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                         "parameters": {"type": "object"}}}
DETECTION = ["/v1/models", "/tokenize", "/detokenize", "/tokenize"]
"""What a vLLM backend asks once: the model id, the probe conversation rendered, its text, and
that text as a raw prompt (which shows the BOS the server adds)."""


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., OpenAICompletionsBackend]]:
    made: list[OpenAICompletionsBackend] = []

    def make(url: str, **options: Any) -> OpenAICompletionsBackend:
        options.setdefault("retry_backoff", 0.0)
        made.append(OpenAICompletionsBackend(url, **options))
        return made[-1]

    yield make
    for backend in made:
        await backend.aclose()


Make = Callable[..., OpenAICompletionsBackend]


def serve(start: Start, flavor: str, model_id: str = R1, **options: Any) -> LoopbackServer:
    return start(ScriptedModel.single("Fine.</think>Four."), model_id=model_id, flavor=flavor,
                 **options)


def paths(server: LoopbackServer) -> list[str]:
    return [call.path for call in server.calls]


async def generate(backend: OpenAICompletionsBackend, prompt: str) -> None:
    async with backend.stream(prompt, max_new_tokens=8, sampling=SamplingParams()) as tokens:
        assert [t async for t in tokens][-1].finish_reason == "eos"


# --------------------------------------------------------------------------- the decoder


def test_decode_token_strs_reverses_the_byte_level_spelling() -> None:
    """If this fails, prompts rendered by vLLM reach the model with mangled spaces, newlines
    or non-ASCII text."""
    pieces = ["<｜User｜>", "Hi", " there", ",\n", " é", " 日本", "🙂", "<think>", "\n"]
    assert decode_token_strs(token_strings(pieces, "byte-level")) == "".join(pieces)
    assert decode_token_strs(["Ġ", "Ċ", "ĉ"]) == " \n\t"


def test_decode_token_strs_refuses_what_is_not_utf8() -> None:
    """Half a character is no text; if this fails, a cut token becomes replacement marks."""
    assert decode_token_strs(["Ã"]) is None  # the first byte of "é" alone


# --------------------------------------------------------------------------- vLLM


async def test_vllm_renders_with_the_models_template_and_the_model_sees_one_bos(
        loopback_server: Start, backends: Make) -> None:
    """The DeepSeek-R1 template writes BOS and vLLM adds BOS to a raw prompt: the rendering
    comes without it, so the generation request's prompt, as the server sees it, holds
    exactly one. If this fails, the model reads two BOS tokens (or none)."""
    server = serve(loopback_server, "vllm")
    backend = backends(server.url)
    prompt = await backend.render_chat(MESSAGES)
    assert prompt == server.template.render(MESSAGES).removeprefix(R1_BOS)
    assert prompt is not None and prompt.endswith("<｜Assistant｜><think>\n")
    await generate(backend, prompt)
    seen = server.records[-1].model_input
    assert seen.startswith(R1_BOS) and seen.count(R1_BOS) == 1
    assert backend.chat_rendering is not None
    assert backend.chat_rendering.bos_text == R1_BOS


@pytest.mark.parametrize(("model_id", "bos"), [(LLAMA3, "<|begin_of_text|>"), (QWEN3, "")])
async def test_vllm_other_families(loopback_server: Start, backends: Make, model_id: str,
                                   bos: str) -> None:
    """Llama 3 also starts with a BOS the server adds; a Qwen3 thinking template has none and
    opens the reasoning in the prompt."""
    server = serve(loopback_server, "vllm", model_id)
    backend = backends(server.url)
    prompt = await backend.render_chat(MESSAGES)
    assert prompt is not None and prompt == server.template.render(MESSAGES).removeprefix(bos)
    await generate(backend, prompt)
    seen = server.records[-1].model_input
    assert seen == bos + prompt
    if model_id == QWEN3:
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")


async def test_vllm_detection_happens_once_then_one_request_per_rendering(
        loopback_server: Start, backends: Make) -> None:
    """Concurrent first renderings share one detection; afterwards each rendering is one
    ``/tokenize`` (token strings decoded client-side, no ``/detokenize``). If this fails, every
    conversation pays extra round trips before its first token (issue 17)."""
    server = serve(loopback_server, "vllm")
    backend = backends(server.url)
    conversations = [[{"role": "user", "content": f"Question {i}?"}] for i in range(12)]
    prompts = await asyncio.gather(*(backend.render_chat(c) for c in conversations))
    assert prompts == [server.template.render(c).removeprefix(R1_BOS) for c in conversations]
    assert paths(server) == DETECTION + ["/tokenize"] * 12
    assert backend.chat_rendering == ChatRendering(
        "vllm", True, (server.vocabulary.ids([R1_BOS])[0],), R1_BOS)
    await backend.render_chat(MESSAGES)
    assert paths(server)[-1] == "/tokenize" and len(paths(server)) == len(DETECTION) + 13


async def test_vllm_tools_reach_the_template(loopback_server: Start, backends: Make) -> None:
    """vLLM's TokenizeChatRequest takes ``tools``; if this fails, tools are missing from a
    server-rendered prompt."""
    server = serve(loopback_server, "vllm")
    prompt = await backends(server.url).render_chat(MESSAGES, [TOOL], tool_choice="auto")
    assert prompt == server.template.render(MESSAGES, [TOOL]).removeprefix(R1_BOS)
    assert json.dumps(TOOL) in prompt


async def test_vllm_token_strings_that_are_not_byte_level_fall_back_to_detokenize(
        loopback_server: Start, backends: Make) -> None:
    """A SentencePiece vocabulary fails the one check against ``/detokenize``: rendering then
    costs two requests but stays exact. If this fails, ``▁`` and ``<0x0A>`` reach the model."""
    server = serve(loopback_server, "vllm", LLAMA3, token_strings="sentencepiece")
    backend = backends(server.url)
    first = await backend.render_chat(MESSAGES)
    second = await backend.render_chat(MESSAGES)
    expected = server.template.render(MESSAGES).removeprefix("<|begin_of_text|>")
    assert first == second == expected
    assert backend.chat_rendering is not None
    assert not backend.chat_rendering.decodes_token_strs
    assert paths(server) == DETECTION + ["/tokenize", "/detokenize"] * 2


async def test_render_before_count_shares_the_detection(loopback_server: Start,
                                                        backends: Make) -> None:
    """The chat probe tells that the server is vLLM: counting tokens afterwards needs no new
    search. If this fails, the tokenizer endpoint is searched again."""
    server = serve(loopback_server, "vllm")
    backend = backends(server.url)
    await backend.render_chat(MESSAGES)
    before = len(server.calls)
    assert await backend.count_tokens("Hi there") == 3  # BOS, "Hi", " there"
    assert backend.tokenize_method == "vllm" and len(server.calls) == before + 1


# --------------------------------------------------------------------------- llama.cpp


async def test_llamacpp_renders_with_apply_template(loopback_server: Start,
                                                    backends: Make) -> None:
    """llama.cpp's ``/apply-template`` already leaves out the BOS it adds: one BOS at the
    model, one request per rendering after detection."""
    server = serve(loopback_server, "llamacpp")
    backend = backends(server.url)
    prompt = await backend.render_chat(MESSAGES, [TOOL])
    assert prompt == server.template.render(MESSAGES, [TOOL]).removeprefix(R1_BOS)
    before = len(server.calls)
    await backend.render_chat(MESSAGES)
    assert paths(server)[before:] == ["/apply-template"]
    await generate(backend, prompt)
    assert server.records[-1].model_input.count(R1_BOS) == 1
    assert backend.tokenize_method == "llama_cpp"


@pytest.mark.parametrize("flavor", ["vllm", "llamacpp"])
async def test_template_kwargs_reach_the_servers_template(loopback_server: Start,
                                                          backends: Make, flavor: str) -> None:
    """If this fails, ``chat_template_kwargs`` do not reach a vLLM or llama.cpp server's
    template, and a family whose template switches thinking off by default (Gemma 4) is
    rendered without reasoning whatever the pair asks."""
    server = serve(loopback_server, flavor, "google/gemma-4-31B-it", chat_template=GEMMA_4)
    backend = backends(server.url)
    on = await backend.render_chat(MESSAGES, chat_template_kwargs={"enable_thinking": True})
    off = await backend.render_chat(MESSAGES)
    assert on is not None and off is not None
    assert "<|think|>" in on and "<|think|>" not in off
    assert on == server.template.render(
        MESSAGES, template_kwargs={"enable_thinking": True}).removeprefix("<bos>")


async def test_tgi_logs_once_that_template_kwargs_cannot_reach_it(
        loopback_server: Start, caplog: pytest.LogCaptureFixture) -> None:
    """If this fails, a TGI pair drops the thinking switch without a word in the debug log
    (TGI's /chat_tokenize takes no template kwargs), or says so on every request."""
    server = serve(loopback_server, "tgi")
    backend = TGIBackend(server.url)
    try:
        with caplog.at_level(logging.DEBUG, logger="specthink.backends"):
            for _ in range(2):
                prompt = await backend.render_chat(
                    MESSAGES, chat_template_kwargs={"enable_thinking": True})
                assert prompt == server.template.render(MESSAGES)
    finally:
        await backend.aclose()
    warned = [r for r in caplog.records if "chat template kwargs" in r.getMessage()]
    assert len(warned) == 1 and "enable_thinking" in warned[0].getMessage()


# --------------------------------------------------------------------------- none


@pytest.mark.parametrize("flavor", ["llama-cpp-python", "tgi"])
async def test_servers_without_a_template_endpoint_render_nothing_and_ask_once(
        loopback_server: Start, backends: Make, flavor: str) -> None:
    """llama-cpp-python has no template endpoint, TGI's renders through ``TGIBackend``: ``None``,
    found once. If this fails, every conversation probes again."""
    server = serve(loopback_server, flavor)
    backend = backends(server.url)
    assert await backend.render_chat(MESSAGES) is None
    before = len(server.calls)
    assert await backend.render_chat(MESSAGES) is None
    assert len(server.calls) == before
    assert backend.chat_rendering == ChatRendering(None)


class Scripted:
    """Answers by path (a callable gets the JSON body), keeps the paths asked."""

    def __init__(self, routes: dict[str, Callable[[Any], Any]]) -> None:
        self.routes = routes
        self.paths: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        route = self.routes.get(request.url.path)
        if route is None:
            return httpx.Response(404, json={"detail": "Not Found"})
        answer = route(json.loads(request.content) if request.content else None)
        return await answer if asyncio.iscoroutine(answer) else answer  # type: ignore[no-any-return]


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Scripted], OpenAICompletionsBackend]]:
    clients: list[httpx.AsyncClient] = []

    def make(server: Scripted) -> OpenAICompletionsBackend:
        clients.append(httpx.AsyncClient(transport=httpx.MockTransport(server)))
        return OpenAICompletionsBackend("http://server.test", model="m", client=clients[-1],
                                        retry_backoff=0.0)

    yield make
    for client in clients:
        await client.aclose()


def sglang_tokenize(body: Any) -> httpx.Response:
    if "prompt" not in body:
        return httpx.Response(400, json={"object": "error", "message": "Field required: prompt",
                                         "type": "BadRequestError", "code": 400})
    return httpx.Response(200, json={"tokens": [1, 2], "count": 2, "max_model_len": 8})


async def test_sglang_renders_nothing_but_still_counts(
        scripted: Callable[[Scripted], OpenAICompletionsBackend]) -> None:
    """SGLang's ``/tokenize`` takes a prompt only (no chat template over HTTP): ``None``, and
    its tokenizer still counts."""
    server = Scripted({"/tokenize": sglang_tokenize})
    backend = scripted(server)
    assert await backend.render_chat(MESSAGES) is None
    assert backend.chat_rendering == ChatRendering(None)
    assert backend.tokenize_method == "vllm"
    assert await backend.tokenize("ab") == [1, 2]


async def test_old_llamacpp_without_apply_template_is_marked_absent(
        scripted: Callable[[Scripted], OpenAICompletionsBackend]) -> None:
    """A 404 on ``/apply-template`` (llama.cpp before early 2025) marks it absent: the next
    rendering asks nothing."""
    server = Scripted({"/tokenize": lambda body: httpx.Response(
        200, json={"tokens": [1, 2] if "content" in body else []})})
    backend = scripted(server)
    assert await backend.render_chat(MESSAGES) is None
    asked = len(server.paths)
    assert await backend.render_chat(MESSAGES) is None
    assert len(server.paths) == asked and server.paths[-1] == "/apply-template"


async def test_a_template_error_on_real_messages_is_raised_not_cached(
        scripted: Callable[[Scripted], OpenAICompletionsBackend]) -> None:
    """Once the server is known to render, its template's error on one conversation is that
    conversation's error; if this fails, one bad conversation switches rendering off."""
    def apply(body: Any) -> httpx.Response:
        if body["messages"][0]["role"] == "assistant":
            return httpx.Response(500, json={"error": {"code": 500, "type": "server_error",
                                                       "message": "roles must alternate"}})
        return httpx.Response(200, json={"prompt": "rendered"})

    server = Scripted({"/tokenize": lambda body: httpx.Response(
        200, json={"tokens": [1] if "content" in body else []}), "/apply-template": apply})
    backend = scripted(server)
    with pytest.raises(BackendStatusError, match="roles must alternate"):
        await backend.render_chat([{"role": "assistant", "content": "x"}])
    assert await backend.render_chat(MESSAGES) == "rendered"


# --------------------------------------------------------------------------- token ids


@pytest.mark.parametrize(("flavor", "method"), [
    ("vllm", "vllm"), ("llamacpp", "llama_cpp"), ("llama-cpp-python", "llama_cpp_python"),
    ("tgi", "tgi"),
])
async def test_tokenize_and_count_tokens_on_every_flavor(
        loopback_server: Start, backends: Make, flavor: str, method: str) -> None:
    """Token ids come from the server's tokenizer, BOS first where the server adds it; the
    count is their number. If this fails, ``get_token_ids`` needs transformers again."""
    server = serve(loopback_server, flavor)
    backend = backends(server.url)
    ids = await backend.tokenize("Hi there")
    assert ids == server.vocabulary.ids([R1_BOS, "Hi", " there"])
    assert await backend.count_tokens("Hi there") == len(ids)
    assert backend.tokenize_method == method


async def test_tokenize_without_any_tokenizer_endpoint_is_an_error(
        scripted: Callable[[Scripted], OpenAICompletionsBackend]) -> None:
    """Ids cannot be estimated: a clear ``BackendError``, while the count falls back to an
    estimate."""
    backend = scripted(Scripted({}))
    with pytest.raises(BackendError, match="no tokenizer endpoint"):
        await backend.tokenize("abcd")
    assert await backend.count_tokens("abcd") == 1


async def test_tgi_backend_tokenize(loopback_server: Start) -> None:
    """TGI's ``/tokenize`` ids, as the server reports them, BOS first."""
    server = serve(loopback_server, "tgi")
    backend = TGIBackend(server.url)
    try:
        assert await backend.tokenize("Hi there") == server.vocabulary.ids(
            [R1_BOS, "Hi", " there"])
        assert await backend.count_tokens("Hi there") == 3
    finally:
        await backend.aclose()


async def test_a_failed_detection_is_not_kept(
        scripted: Callable[[Scripted], OpenAICompletionsBackend]) -> None:
    """A server error while probing says nothing about what the server speaks: the next call
    probes again. If this fails, one hiccup at start-up switches server rendering off for
    the backend's life."""
    answers = [httpx.Response(500, json={"error": {"message": "warming up", "type": "x",
                                                   "code": 500}})]

    def apply(body: Any) -> httpx.Response:
        return answers.pop() if answers else httpx.Response(200, json={"prompt": "rendered"})

    server = Scripted({"/tokenize": lambda body: httpx.Response(
        200, json={"tokens": [1] if "content" in body else []}), "/apply-template": apply})
    backend = scripted(server)
    with pytest.raises(BackendStatusError, match="warming up"):
        await backend.render_chat(MESSAGES)
    assert await backend.render_chat(MESSAGES) == "rendered"

    failing = Scripted({"/tokenize": lambda body: httpx.Response(
        500, json={"error": {"message": "down", "type": "x", "code": 500}})})
    backend = scripted(failing)
    with pytest.raises(BackendStatusError):
        await backend.render_chat(MESSAGES)
    assert backend.chat_rendering is None and backend.tokenize_method is None


def old_vllm(body: Any) -> httpx.Response:
    """A vLLM from before ``return_token_strs``: ids only; BOS id 1 added to raw prompts."""
    if "messages" in body:
        ids = [1, 10, 11]
    else:
        ids = [1, *([1, 10, 11] if body["prompt"] == "<s>Hi" else [10])]
    return httpx.Response(200, json={"count": len(ids), "max_model_len": 8, "tokens": ids})


def old_detokenize(body: Any) -> httpx.Response:
    text = {1: "<s>", 10: "H", 11: "i"}
    return httpx.Response(200, json={"prompt": "".join(text[i] for i in body["tokens"])})


async def test_a_vllm_without_token_strings_renders_through_detokenize(
        scripted: Callable[[Scripted], OpenAICompletionsBackend]) -> None:
    """Without token strings nothing can be decoded client-side: ``/detokenize`` renders, and
    the BOS text comes from it too. If this fails, an older vLLM gets a doubled BOS."""
    server = Scripted({"/tokenize": old_vllm, "/detokenize": old_detokenize})
    backend = scripted(server)
    assert await backend.render_chat(MESSAGES) == "Hi"
    assert backend.chat_rendering == ChatRendering("vllm", False, (1,), "<s>")
    asked = len(server.paths)
    assert await backend.render_chat(MESSAGES) == "Hi"
    assert server.paths[asked:] == ["/tokenize", "/detokenize"]


def test_detection_is_shared_within_each_event_loop_in_turn() -> None:
    """The sync edge runs its own loop: a detection that failed under concurrent callers on
    one loop is retried by concurrent callers on another. If this fails, the second loop's
    callers raise about a lock bound to the first loop."""
    up = False

    async def tokenize(body: Any) -> httpx.Response:
        await asyncio.sleep(0)  # let the other callers queue on the detection
        if not up:
            return httpx.Response(500, json={"error": {"message": "down", "type": "x",
                                                       "code": 500}})
        return httpx.Response(200, json={"tokens": [1] if "content" in body else []})

    server = Scripted({"/tokenize": tokenize, "/apply-template": lambda body: httpx.Response(
        200, json={"prompt": "rendered"})})
    client = httpx.AsyncClient(transport=httpx.MockTransport(server))
    backend = OpenAICompletionsBackend("http://server.test", model="m", client=client,
                                       retry_backoff=0.0)

    async def render_four() -> list[Any]:
        return await asyncio.gather(*(backend.render_chat(MESSAGES) for _ in range(4)),
                                    return_exceptions=True)

    assert all(isinstance(r, BackendStatusError) for r in asyncio.run(render_four()))
    up = True
    assert asyncio.run(render_four()) == ["rendered"] * 4
    asyncio.run(client.aclose())


TOOL_TURNS = [
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
]
"""A tool round trip as ``prompts.validate_messages`` leaves it: ``arguments`` decoded."""


@pytest.mark.parametrize("flavor", ["vllm", "llamacpp"])
async def test_tool_call_arguments_go_as_json_strings(loopback_server: Start, backends: Make,
                                                      flavor: str) -> None:
    """vLLM and llama.cpp validate messages against OpenAI's schema, where ``arguments`` is a
    string; if this fails, every conversation with a tool call is a 400 (or 500)."""
    server = serve(loopback_server, flavor)
    prompt = await backends(server.url).render_chat(TOOL_TURNS, [TOOL])
    assert prompt == server.template.render(TOOL_TURNS, [TOOL], tool_calls=True).removeprefix(
        R1_BOS)
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in prompt
    assert "<tool_response>\n5\n</tool_response>" in prompt
    assert TOOL_TURNS[1]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3}


async def test_concurrent_first_counts_share_one_search(loopback_server: Start,
                                                        backends: Make) -> None:
    """Eight conversations counting at once: the tokenizer endpoint is searched once, then
    each count is one request. If this fails, a burst repeats the search per conversation."""
    server = serve(loopback_server, "llama-cpp-python")
    backend = backends(server.url)
    counts = await asyncio.gather(*(backend.count_tokens(" ".join(["Hi"] * n))
                                    for n in range(1, 9)))
    assert counts == [1 + n for n in range(1, 9)]  # BOS, then one token per "Hi"
    # /props: llama.cpp's context size, which llama-cpp-python does not have (a 404)
    assert paths(server) == ["/v1/models", "/props", "/tokenize", "/tokenize", "/tokenize",
                             *["/extras/tokenize"] * 8]
