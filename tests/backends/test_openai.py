"""OpenAICompletionsBackend: request bodies, the stream shapes of vLLM, llama.cpp and TGI, errors,
token counting fallbacks, and a real loopback server's ``/v1/completions``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from specthink.backends import Backend, OpenAICompletionsBackend, SamplingParams, StreamToken
from specthink.backends.openai import CompletionDecoder, completion_body
from specthink.errors import (
    BackendStatusError,
    ConfigError,
    ContextLimitError,
    InStreamError,
    OverloadedError,
    RequestValidationError,
    StreamDroppedError,
)
from specthink.testing import Fault, LoopbackServer, ScriptedModel, Tokenizer

URL = "http://vllm.test"
GREEDY = SamplingParams()
MODELS = {"object": "list", "data": [{"id": "Qwen/Qwen2.5-1.5B", "object": "model",
                                      "max_model_len": 32768}]}


def chunk(text: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            **extra}


def sse(*payloads: object, done: bool = True) -> httpx.Response:
    body = b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads)
    if done:
        body += b"data: [DONE]\n\n"
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


class Server:
    """A scripted OpenAI-compatible server: answers by path, keeps the requests."""

    def __init__(self, routes: dict[str, httpx.Response | list[httpx.Response]]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        missing = httpx.Response(404, json={"detail": "Not Found"})
        answer = self.routes.get(request.url.path, missing)
        if isinstance(answer, list):
            return answer.pop(0) if len(answer) > 1 else answer[0]
        return answer

    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]

    def body(self, path: str) -> Any:
        return json.loads(next(r for r in self.requests if r.url.path == path).content)


@pytest.fixture
async def openai() -> AsyncIterator[Callable[..., OpenAICompletionsBackend]]:
    """``openai(server, **options)``: a backend over a scripted transport, closed afterwards."""
    clients: list[httpx.AsyncClient] = []

    def make(server: Server, **options: Any) -> OpenAICompletionsBackend:
        clients.append(httpx.AsyncClient(transport=httpx.MockTransport(server)))
        options.setdefault("retry_backoff", 0.0)
        return OpenAICompletionsBackend(URL, client=clients[-1], **options)

    yield make
    for client in clients:
        await client.aclose()


Make = Callable[..., OpenAICompletionsBackend]


async def collect(backend: OpenAICompletionsBackend, prompt: str = "Q:", *,
                  max_new_tokens: int = 16, **options: Any) -> list[StreamToken]:
    async with backend.stream(prompt, max_new_tokens=max_new_tokens, sampling=GREEDY,
                              **options) as tokens:
        return [token async for token in tokens]


# --------------------------------------------------------------------------- request bodies


def test_greedy_is_temperature_zero() -> None:
    assert completion_body("P", model="m", max_new_tokens=9, sampling=SamplingParams()) == {
        "prompt": "P", "model": "m", "max_tokens": 9, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0.0}


def test_sampling_sends_its_settings() -> None:
    body = completion_body("P", model=None, max_new_tokens=9, sampling=SamplingParams(
        temperature=0.6, top_p=0.95, top_k=50, seed=1, repetition_penalty=1.05))
    assert "model" not in body
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "seed",
                                 "repetition_penalty")} == {
        "temperature": 0.6, "top_p": 0.95, "top_k": 50, "seed": 1, "repetition_penalty": 1.05}


def test_grammar_is_refused_before_any_request() -> None:
    with pytest.raises(ConfigError, match="grammar"):
        completion_body("P", model=None, max_new_tokens=9,
                        sampling=SamplingParams(grammar={"type": "regex", "value": "a+"}))


HARMONY = SamplingParams(keep_special_tokens=True,
                         marker_tokens=("<|channel|>", "<|message|>", "<|end|>", "<|return|>"))


def test_special_tokens_are_named_only_to_llama_cpp() -> None:
    """vLLM and SGLang keep every special token with skip_special_tokens false; llama.cpp keeps
    only those named in preserved_tokens, a field no other server is sent."""
    vllm = completion_body("P", model=None, max_new_tokens=9, sampling=HARMONY)
    llama = completion_body("P", model=None, max_new_tokens=9, sampling=HARMONY,
                            llama_cpp=True)
    assert vllm["skip_special_tokens"] is False and "preserved_tokens" not in vllm
    assert llama["preserved_tokens"] == list(HARMONY.marker_tokens)
    plain = completion_body("P", model=None, max_new_tokens=9, sampling=SamplingParams(
        marker_tokens=HARMONY.marker_tokens), llama_cpp=True)
    assert "preserved_tokens" not in plain and "skip_special_tokens" not in plain


def test_llama_cpp_leaves_a_named_stop_tokens_text_out() -> None:
    """If this fails, a stop token named in preserved_tokens reaches the text: llama.cpp sends
    its text in a chunk of its own, then an empty finishing chunk."""
    decoder = CompletionDecoder(preserved=frozenset(HARMONY.marker_tokens))
    assert decoder.feed(chunk("4")) == [StreamToken("4")]
    assert decoder.feed(chunk("<|return|>")) == []  # held: did it end the generation?
    assert decoder.feed(chunk("", "stop", usage={"prompt_tokens": 5})) == [
        StreamToken("", special=True, finish_reason="eos", input_tokens=5)]


def test_llama_cpp_releases_a_named_marker_that_did_not_stop() -> None:
    decoder = CompletionDecoder(preserved=frozenset(HARMONY.marker_tokens))
    assert decoder.feed(chunk("<|end|>")) == []
    assert decoder.feed(chunk("<|channel|>")) == [StreamToken("<|end|>")]
    assert decoder.feed(chunk("final")) == [StreamToken("<|channel|>"), StreamToken("final")]
    assert decoder.feed(chunk("<|end|>")) == []
    assert decoder.feed(chunk(" x", "length")) == [StreamToken("<|end|>")]
    assert decoder.end() == [StreamToken(" x", finish_reason="length")]
    # A stop token's text in the finishing chunk itself is left out too.
    decoder = CompletionDecoder(preserved=frozenset(HARMONY.marker_tokens))
    assert decoder.feed(chunk("<|return|>", "stop")) == []
    assert decoder.end() == [StreamToken("", special=True, finish_reason="eos")]


async def test_llama_cpp_is_sent_the_markers_and_their_text_kept(openai: Make) -> None:
    server = Server({"/tokenize": httpx.Response(200, json={"tokens": [1]}),
                     "/v1/completions": sse(chunk("<|end|>"), chunk("ok"),
                                            chunk("<|return|>"), chunk("", "stop"))})
    backend = openai(server, model="m")
    async with backend.stream("Q:", max_new_tokens=8, sampling=HARMONY) as stream:
        tokens = [token async for token in stream]
    assert backend.tokenize_method == "llama_cpp"
    assert server.body("/v1/completions")["preserved_tokens"] == list(HARMONY.marker_tokens)
    assert [t.text for t in tokens] == ["<|end|>", "ok", ""] and tokens[-1].special


async def test_llama_cpp_python_refuses_markers_its_model_holds_as_special_tokens(
        openai: Make) -> None:
    """If this fails, a format whose markers the served model holds as special tokens is run on
    llama-cpp-python, whose /v1/completions drops their text (``Llama._create_completion``
    detokenizes with ``special=False``): the answer would arrive fused with the reasoning, not
    as an error. Its own tokenizer says which: /extras/tokenize parses special tokens,
    /extras/detokenize drops them as the completions do; asked once per set of markers."""
    server = Server({"/extras/tokenize": httpx.Response(200, json={"tokens": [1, 2, 3, 4]}),
                     "/extras/detokenize": httpx.Response(200, json={"text": "\n<think>"})})
    backend = openai(server, model="m")
    await backend.check_keeps(())  # nothing asked, nothing refused
    assert server.paths() == []
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"llama-cpp-python.*llama-server") as refused:
            await backend.check_keeps(("<|end|>", "<think>"))
        assert refused.value.field == "backend"
        assert "<|end|>" in str(refused.value) and "<think>" not in str(refused.value)
    assert server.paths().count("/extras/detokenize") == 1
    asked = [json.loads(r.content) for r in server.requests if r.url.path == "/extras/tokenize"]
    assert asked[-1] == {"input": "<|end|>\n<think>"}


async def test_servers_that_keep_special_tokens_are_not_probed(openai: Make) -> None:
    server = Server({"/tokenize": httpx.Response(200, json={"count": 1, "tokens": [1]})})
    backend = openai(server, model="m")
    await backend.check_keeps(("<|end|>",))
    assert backend.tokenize_method == "vllm" and server.paths() == ["/tokenize"]


async def test_model_defaults_to_the_first_listed_id(openai: Make) -> None:
    server = Server({"/v1/models": httpx.Response(200, json=MODELS),
                     "/v1/completions": sse(chunk("a"), chunk("", "stop"))})
    backend = openai(server)
    await collect(backend)
    await collect(backend)
    assert server.body("/v1/completions")["model"] == "Qwen/Qwen2.5-1.5B"
    assert server.paths() == ["/v1/models", "/v1/completions", "/v1/completions"]


def test_implements_the_backend_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECTHINK_API_KEY", raising=False)
    backend = OpenAICompletionsBackend(URL, model="m")
    assert isinstance(backend, Backend)
    assert (backend.adds_bos_token, backend.supports_grammar) == (True, False)
    assert repr(backend) == "OpenAICompletionsBackend('http://vllm.test', model='m')"


async def test_sdk_style_base_url_is_accepted() -> None:
    assert OpenAICompletionsBackend("http://h:8000/v1/", model="m").url == "http://h:8000"


# --------------------------------------------------------------------------- stream shapes


def test_vllm_stream_with_a_usage_chunk_after_the_finish() -> None:
    decoder = CompletionDecoder()
    assert decoder.feed(chunk("Hi")) == [StreamToken("Hi")]
    assert decoder.feed(chunk("", "stop")) == []  # held until the usage arrives
    assert decoder.feed({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2,
                                                  "total_tokens": 9}}) == [
        StreamToken("", special=True, finish_reason="eos", input_tokens=7)]


def test_tgi_stream_ends_with_the_eos_text_and_usage_together() -> None:
    decoder = CompletionDecoder()
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert decoder.feed(chunk("Hi", "")) == [StreamToken("Hi")]
    assert decoder.feed(chunk("</s>", "eos_token", usage=usage)) == [
        StreamToken("", special=True, finish_reason="eos", input_tokens=3)]


def test_length_finish_keeps_the_last_tokens_text() -> None:
    decoder = CompletionDecoder()
    assert decoder.feed(chunk(" end", "length")) == []
    assert decoder.end() == [StreamToken(" end", finish_reason="length")]


async def test_llama_cpp_stream_without_usage_ends_at_done(openai: Make) -> None:
    server = Server({"/v1/completions": sse(chunk("a"), chunk("b"), chunk("", "stop"))})
    tokens = await collect(openai(server, model="m"))
    assert tokens == [StreamToken("a"), StreamToken("b"),
                      StreamToken("", special=True, finish_reason="eos")]


async def test_losing_only_the_trailing_usage_still_finishes(openai: Make) -> None:
    body = b"data: " + json.dumps(chunk("a")).encode() + b"\n\n"
    body += b"data: " + json.dumps(chunk("", "length")).encode() + b"\n\n"

    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield body
            raise httpx.RemoteProtocolError("peer closed connection")

    server = Server({"/v1/completions": httpx.Response(200, stream=Broken())})
    tokens = await collect(openai(server, model="m"))
    assert tokens[-1].finish_reason == "length"


async def test_stream_ending_early_is_a_dropped_stream(openai: Make) -> None:
    server = Server({"/v1/completions": sse(chunk("a"), done=False)})
    with pytest.raises(StreamDroppedError, match="without a finish reason"):
        await collect(openai(server, model="m"))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("payload", [
    {"error": {"message": "out of memory", "type": "InternalServerError"}},
    {"object": "error", "message": "out of memory", "type": "InternalServerError"},
    {"error": "out of memory", "error_type": "InternalServerError"},
])
async def test_error_events_of_every_server_family(openai: Make, payload: Any) -> None:
    server = Server({"/v1/completions": sse(chunk("a"), payload)})
    with pytest.raises(InStreamError) as info:
        await collect(openai(server, model="m"))
    assert (info.value.error_type, info.value.tokens_received) == ("InternalServerError", 1)
    assert "out of memory" in str(info.value)


async def test_a_routers_stream_error_event_is_a_dropped_stream(openai: Make) -> None:
    """smg reports a replica whose body broke off as an in-stream ``stream_error`` event (then
    ``[DONE]``); if this fails, the engine gives up instead of resuming through the router."""
    broke = {"error": {"message": "Stream error: error decoding response body: unexpected EOF",
                       "type": "stream_error"}}
    server = Server({"/v1/completions": sse(chunk("a"), chunk("b"), broke)})
    with pytest.raises(StreamDroppedError) as info:
        await collect(openai(server, model="m"))
    assert info.value.tokens_received == 2
    assert "unexpected EOF" in str(info.value)


@pytest.mark.parametrize(("answer", "expected"), [
    (httpx.Response(400, json={"error": {"message": "max_tokens too large",
                                         "type": "BadRequestError"}}), BackendStatusError),
    (httpx.Response(422, json={"detail": [{"msg": "field required"}]}), RequestValidationError),
    (httpx.Response(429, json={"error": {"message": "slow down", "type": "rate_limit"}}),
     OverloadedError),
])
async def test_error_bodies_map_into_the_hierarchy(openai: Make, answer: httpx.Response,
                                                   expected: type[Exception]) -> None:
    server = Server({"/v1/completions": answer})
    with pytest.raises(expected) as info:
        await collect(openai(server, model="m", max_retries=0))
    assert type(info.value) is expected


async def test_429_is_retried(openai: Make) -> None:
    busy = httpx.Response(429, json={"error": {"message": "busy"}})
    server = Server({"/v1/completions": [busy, sse(chunk("ok", "length"))]})
    attempts: list[int] = []
    tokens = await collect(openai(server, model="m"), on_attempt=attempts.append)
    assert [t.text for t in tokens] == ["ok"]
    assert attempts == [1, 2]


async def test_api_key_is_sent_and_hidden(openai: Make) -> None:
    server = Server({"/v1/completions": httpx.Response(401, json={"error": {
        "message": "bad key", "type": "auth"}})})
    backend = openai(server, model="m", api_key="sk-123")
    with pytest.raises(BackendStatusError) as info:
        await collect(backend)
    assert server.requests[0].headers["authorization"] == "Bearer sk-123"
    assert "sk-123" not in repr(backend) + str(info.value)


# --------------------------------------------------------------------------- info, tokens, chat


async def test_info_reads_max_model_len(openai: Make) -> None:
    info = await openai(Server({"/v1/models": httpx.Response(200, json=MODELS)})).info()
    assert (info.model_id, info.max_total_tokens, info.max_input_tokens) == (
        "Qwen/Qwen2.5-1.5B", 32768, 32767)


async def test_info_reads_llama_cpp_props_n_ctx(openai: Make) -> None:
    """If this fails, a llama.cpp server's context (``/props``; its ``/v1/models`` has none)
    is unknown, so an over-long prompt is sent instead of refused before generation."""
    models = {"object": "list", "data": [{"id": "smol", "object": "model", "owned_by": "llamacpp"}]}
    props = {"default_generation_settings": {"n_ctx": 4096, "params": {}}, "total_slots": 1}
    info = await openai(Server({"/v1/models": httpx.Response(200, json=models),
                                "/props": httpx.Response(200, json=props)})).info()
    assert (info.max_total_tokens, info.max_input_tokens) == (4096, 4095)


LLAMA_CPP_PYTHON_MODELS = {"object": "list", "data": [
    {"id": "SmolLM2-135M-Instruct", "object": "model", "owned_by": "me", "permissions": []}]}
LLAMA_CPP_PYTHON_REFUSAL = {"error": {
    "message": "This model's maximum context length is 256 tokens, however you requested 411 "
               "tokens (401 in your prompt; 10 for the completion). Please reduce your prompt; "
               "or completion length.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}


async def test_a_stream_llama_cpp_python_ends_before_its_first_event_is_a_context_limit(
        openai: Make) -> None:
    """llama-cpp-python answers a streamed prompt longer than its context with a 200 and no
    event at all (its check runs once the answer has begun). If this fails, that is a dropped
    stream (a 503 in serve, StreamDroppedError in the adapters) instead of a ContextLimitError,
    and the context size stays unknown."""
    def completions(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["stream"]:
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b"")
        return httpx.Response(400, json=LLAMA_CPP_PYTHON_REFUSAL)

    class Refusing(Server):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/completions":
                self.requests.append(request)
                return completions(request)
            return super().__call__(request)

    server = Refusing({"/v1/models": httpx.Response(200, json=LLAMA_CPP_PYTHON_MODELS)})
    backend = openai(server)
    assert (await backend.info()).max_total_tokens is None
    with pytest.raises(ContextLimitError, match="maximum context length is 256"):
        async with backend.stream("word " * 400, max_new_tokens=10, sampling=GREEDY):
            pytest.fail("the stream opened")
    asked = [json.loads(r.content) for r in server.requests if r.url.path == "/v1/completions"]
    assert [(body["stream"], body["max_tokens"]) for body in asked] == [(True, 10), (False, 1)]
    info = await backend.info()
    assert (info.max_total_tokens, info.max_input_tokens) == (256, 255)
    assert (await backend.info(refresh=True)).max_total_tokens == 256


TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
         for name in ("get_weather", "get_time")]


async def test_a_required_calls_grammar_is_gbnf_on_llama_cpp_servers_only(openai: Make) -> None:
    """If this fails, a call the engine opened for ``tool_choice`` is left to a model that may
    write anything on llama.cpp servers (which take GBNF in ``grammar``), or an unknown field
    goes to servers that take none."""
    python = openai(Server({"/extras/tokenize": httpx.Response(200, json={"tokens": [1]})}))
    named = await python.call_grammar(TOOLS, "get_time")
    any_tool = await python.call_grammar(TOOLS, None)
    assert named is not None and any_tool is not None
    assert named["type"] == "gbnf" and named["value"].startswith("root ::= object\n")
    assert any_tool["value"].startswith(
        'root ::= ("get_weather" | "get_time") "\\", \\"arguments\\": " object\n')
    body = completion_body("p", model=None, max_new_tokens=4,
                           sampling=SamplingParams(grammar=named))
    assert body["grammar"] == named["value"]
    vllm = openai(Server({"/tokenize": httpx.Response(200, json={"count": 1, "tokens": [1]})}),
                  model="m")
    assert await vllm.call_grammar(TOOLS, "get_time") is None


async def test_count_tokens_with_vllm(openai: Make) -> None:
    server = Server({"/tokenize": httpx.Response(200, json={"count": 5, "max_model_len": 9,
                                                            "tokens": [1, 2, 3, 4, 5]})})
    assert await openai(server, model="m").count_tokens("hello") == 5
    assert server.body("/tokenize") == {"model": "m", "prompt": "hello"}


async def test_count_tokens_falls_back_to_llama_cpp_python_and_remembers(openai: Make) -> None:
    server = Server({"/extras/tokenize": httpx.Response(200, json={"tokens": [1, 2, 3]})})
    backend = openai(server, model="m")
    assert await backend.count_tokens("abc") == 3
    assert backend.tokenize_method == "llama_cpp_python"
    assert await backend.count_tokens("abc") == 3
    assert server.paths() == ["/tokenize", "/tokenize", "/tokenize", "/extras/tokenize",
                              "/extras/tokenize"]


async def test_count_tokens_without_any_endpoint_estimates(openai: Make) -> None:
    backend = openai(Server({}), model="m")
    assert await backend.count_tokens("x" * 10) == 3
    assert backend.tokenize_method == "estimate"


async def test_render_chat_is_client_side(openai: Make) -> None:
    backend = openai(Server({}), model="m")
    assert await backend.render_chat([{"role": "user", "content": "hi"}]) is None
    assert backend.supports_grammar is False


async def test_health_prefers_health_then_models(openai: Make) -> None:
    assert await openai(Server({"/health": httpx.Response(200)})).health()
    assert await openai(Server({"/v1/models": httpx.Response(200, json=MODELS)})).health()
    assert not await openai(Server({"/health": httpx.Response(503)})).health()


# --------------------------------------------------------------------------- a real server


ANSWER = "Two plus two is four."
PROMPT = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
async def real(loopback_server: Callable[..., LoopbackServer],
               ) -> AsyncIterator[tuple[LoopbackServer, OpenAICompletionsBackend]]:
    server = loopback_server(ScriptedModel.single(ANSWER), model_id="test/model")
    backend = OpenAICompletionsBackend(server.url, retry_backoff=0.0)
    yield server, backend
    await backend.aclose()


async def test_loopback_completion_streams_to_eos(
        real: tuple[LoopbackServer, OpenAICompletionsBackend]) -> None:
    server, backend = real
    tokens = await collect(backend, PROMPT, max_new_tokens=32)
    assert "".join(t.text for t in tokens) == ANSWER
    assert tokens[-1] == StreamToken("", special=True, finish_reason="eos",
                                     input_tokens=Tokenizer().count(PROMPT))
    record = server.records[-1]
    assert (record.path, record.finish_reason) == ("/v1/completions", "eos_token")
    assert record.parameters["model"] == "test/model"


async def test_loopback_completion_budget(
        real: tuple[LoopbackServer, OpenAICompletionsBackend]) -> None:
    _, backend = real
    tokens = await collect(backend, PROMPT, max_new_tokens=2)
    assert [t.text for t in tokens] == Tokenizer().tokenize(ANSWER)[:2]
    assert tokens[-1].finish_reason == "length"


async def test_loopback_drop_and_retry(
        real: tuple[LoopbackServer, OpenAICompletionsBackend]) -> None:
    server, backend = real
    server.inject(Fault.status(503), Fault.drop(after_tokens=2))
    with pytest.raises(StreamDroppedError) as info:
        await collect(backend, PROMPT)
    assert info.value.tokens_received == 2
    assert [r.status for r in server.records] == [503, 200]


async def test_loopback_counts_tokens_through_tgi_tokenize(
        real: tuple[LoopbackServer, OpenAICompletionsBackend]) -> None:
    _, backend = real
    assert await backend.count_tokens(PROMPT) == Tokenizer().count(PROMPT)
    assert backend.tokenize_method == "tgi"
    assert (await backend.info()).model_id == "test/model"
