"""The loopback TGI server over real sockets: streaming, the prefix cache, the latency model,
every fault, disconnect detection and TGI's validation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from specthink.backends import SamplingParams, StreamToken, TGIBackend
from specthink.errors import (
    BackendTimeoutError,
    InStreamError,
    OverloadedError,
    StreamDroppedError,
    UnhealthyError,
)
from specthink.testing import (
    EchoModel,
    Fault,
    LatencyModel,
    LoopbackServer,
    RequestRecord,
    ScriptedModel,
    Tokenizer,
)

Start = Callable[..., LoopbackServer]

ANSWER = "Let me think.\n\nWait, 2 + 2 = 4. Yes."
PROMPT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
GREEDY = SamplingParams()
TOKENS = Tokenizer().tokenize(ANSWER)


@pytest.fixture
def server(loopback_server: Start) -> LoopbackServer:
    return loopback_server(ScriptedModel.single(ANSWER))


Make = Callable[..., TGIBackend]


@pytest.fixture
async def tgi() -> AsyncIterator[Make]:
    """``tgi(server, **options)``: a backend for ``server``, closed after the test."""
    made: list[TGIBackend] = []

    def make(server: LoopbackServer, **options: Any) -> TGIBackend:
        options.setdefault("retry_backoff", 0.0)
        made.append(TGIBackend(server.url, **options))
        return made[-1]

    yield make
    for backend in made:
        await backend.aclose()


async def collect(backend: TGIBackend, prompt: str = PROMPT, *, max_new_tokens: int = 64,
                  **options: Any) -> list[StreamToken]:
    async with backend.stream(prompt, max_new_tokens=max_new_tokens, sampling=GREEDY,
                              **options) as tokens:
        return [token async for token in tokens]


async def wait_until_finished(server: LoopbackServer, index: int = -1) -> RequestRecord:
    """The server finishes a request on its own thread; wait (boundedly) until it has."""
    for _ in range(500):
        record = server.records[index]
        if record.finished is not None:
            return record
        await asyncio.sleep(0.01)
    raise AssertionError(f"request never finished: {server.records[index]}")


def sse_payloads(body: str) -> list[Any]:
    return [json.loads(line[len("data:"):]) for line in body.splitlines()
            if line.startswith("data:") and line != "data:[DONE]"]


# --------------------------------------------------------------------------- streaming


async def test_streams_the_scripted_answer_token_by_token(
        tgi: Make, server: LoopbackServer) -> None:
    tokens = await collect(tgi(server))
    assert [t.text for t in tokens[:-1]] == TOKENS
    assert tokens[-1] == StreamToken("", special=True, finish_reason="eos",
                                     input_tokens=Tokenizer().count(PROMPT))


async def test_budget_ends_the_answer_with_length(tgi: Make, server: LoopbackServer) -> None:
    tokens = await collect(tgi(server), max_new_tokens=3)
    assert [t.text for t in tokens] == TOKENS[:3]
    assert tokens[-1].finish_reason == "length"


async def test_a_completed_request_is_recorded(tgi: Make, server: LoopbackServer) -> None:
    await collect(tgi(server), max_new_tokens=50)
    [record] = server.records
    assert (record.path, record.prompt, record.status) == ("/generate_stream", PROMPT, 200)
    assert record.parameters == {"max_new_tokens": 50, "details": True, "do_sample": False}
    assert record.prompt_tokens == Tokenizer().count(PROMPT)
    assert record.tokens_sent == len(TOKENS) + 1
    assert (record.finish_reason, record.disconnected, record.fault) == ("eos_token", False, None)
    assert record.finished is not None and record.finished >= record.started


async def test_the_model_continues_text_written_by_anyone(
        tgi: Make, server: LoopbackServer) -> None:
    written = "Let me think.\n\n"
    tokens = await collect(tgi(server), PROMPT + written)
    assert "".join(t.text for t in tokens) == ANSWER[len(written):]


def test_sync_with_serves_and_stops() -> None:
    server = LoopbackServer(EchoModel())
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url
    with server:
        assert httpx.get(f"{server.url}/health").status_code == 200
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url


async def test_async_with_serves_and_stops(tgi: Make) -> None:
    async with LoopbackServer(EchoModel(prefix="You said: "), model_id="echo") as server:
        tokens = await collect(tgi(server), "<|im_start|>user\nhi<|im_end|>\n"
                                            "<|im_start|>assistant\n")
        assert "".join(t.text for t in tokens) == "You said: hi"
        backend = TGIBackend(server.url)
        assert (await backend.info()).model_id == "echo"
        await backend.aclose()


async def test_256_concurrent_streams(tgi: Make, loopback_server: Start) -> None:
    server = loopback_server(EchoModel())
    backend = tgi(server)
    try:
        async def one(i: int) -> str:
            prompt = f"<|im_start|>user\n{i}<|im_end|>\n<|im_start|>assistant\n"
            async with backend.stream(prompt, max_new_tokens=8, sampling=GREEDY) as tokens:
                return "".join([t.text async for t in tokens])

        answers = await asyncio.gather(*(one(i) for i in range(256)))
    finally:
        await backend.aclose()
    assert answers == [str(i) for i in range(256)]
    assert len(server.records) == 256
    assert all(r.finish_reason == "eos_token" and not r.disconnected for r in server.records)


# --------------------------------------------------------------------------- prefix cache


async def test_prefix_cache_reuses_prompt_and_generated_tokens(
        tgi: Make, server: LoopbackServer) -> None:
    tokenizer = Tokenizer()
    await collect(tgi(server), max_new_tokens=4)  # writes "Let me think."
    first = server.records[0]
    assert first.cached_prompt_tokens == 0

    written = "".join(TOKENS[:4])
    await collect(tgi(server), PROMPT + written + " Then")
    second = server.records[1]
    assert second.prompt_tokens == tokenizer.count(PROMPT) + 4 + 1
    assert second.cached_prompt_tokens == tokenizer.count(PROMPT) + 4
    assert second.recomputed_prompt_tokens == 1


async def test_the_last_prompt_token_is_always_recomputed(
        tgi: Make, server: LoopbackServer) -> None:
    await collect(tgi(server), max_new_tokens=1)
    await collect(tgi(server), max_new_tokens=1)
    repeat = server.records[1]
    assert repeat.cached_prompt_tokens == repeat.prompt_tokens - 1


async def test_a_different_prefix_is_recomputed(tgi: Make, server: LoopbackServer) -> None:
    await collect(tgi(server), max_new_tokens=1)
    await collect(tgi(server), "Completely different. " + PROMPT, max_new_tokens=1)
    assert server.records[1].cached_prompt_tokens == 0


async def test_reset_forgets_records_cache_and_faults(tgi: Make, server: LoopbackServer) -> None:
    await collect(tgi(server), max_new_tokens=1)
    server.inject(Fault.status(503))
    server.reset()
    assert (server.records, server.pending_faults, len(server.cache)) == ([], [], 0)
    await collect(tgi(server), max_new_tokens=1)
    assert server.records[0].cached_prompt_tokens == 0


# --------------------------------------------------------------------------- latency model


async def test_latency_model_charges_prefill_and_each_token(
        tgi: Make, loopback_server: Start) -> None:
    latency = LatencyModel(per_request=0.002, per_uncached_prompt_token=0.0001, per_token=0.001)
    server = loopback_server(ScriptedModel.single(ANSWER), latency=latency)
    await collect(tgi(server), max_new_tokens=5)
    record = server.records[0]
    expected = 0.002 + 0.0001 * record.prompt_tokens + 0.001 * 5
    assert record.service_seconds == pytest.approx(expected)
    assert latency.service_seconds(record.prompt_tokens, 5) == pytest.approx(expected)


def test_a_full_batch_shares_the_replica() -> None:
    """If this fails, a replica's throughput has no bound and a scale-out benchmark cannot
    show what more replicas buy."""
    latency = LatencyModel(per_token=0.001, max_batch=4)
    assert [latency.slowdown(n) for n in (0, 1, 4, 6, 8)] == [1.0, 1.0, 1.0, 1.5, 2.0]
    assert LatencyModel(per_token=0.001).slowdown(1000) == 1.0
    with pytest.raises(ValueError, match="max_batch"):
        LatencyModel(max_batch=0)


async def test_a_generation_beyond_the_batch_is_charged_its_share(
        tgi: Make, loopback_server: Start) -> None:
    """One stream stalls holding its slot while a second runs: with ``max_batch=1`` every
    step of the second takes twice as long (two in flight on a batch of one)."""
    latency = LatencyModel(per_request=0.001, per_token=0.002, max_batch=1)
    server = loopback_server(ScriptedModel.single(ANSWER), latency=latency)
    server.inject(Fault.stall(after_tokens=0, seconds=0.5))
    backend = tgi(server)
    held = asyncio.create_task(collect(backend, max_new_tokens=5))
    for _ in range(500):  # until the held request is in flight (boundedly)
        if server.records:
            break
        await asyncio.sleep(0.005)
    await collect(backend, max_new_tokens=5)
    await held
    second = server.records[1]
    nominal = latency.service_seconds(second.prompt_tokens - second.cached_prompt_tokens, 5)
    assert second.service_seconds == pytest.approx(2 * nominal)


async def http_chunks(url: str, body: dict[str, Any]) -> list[bytes]:
    """The body of a chunked response as the server wrote it: one item per HTTP chunk."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    writer.write(b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(payload), payload))
    raw = await reader.read()
    writer.close()
    rest = raw.split(b"\r\n\r\n", 1)[1]
    chunks = []
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        rest = rest[size + 2:]


@pytest.mark.parametrize(("burst", "events_per_write"), [(1, [1] * 6), (4, [4, 2])])
async def test_due_tokens_go_out_in_bursts(loopback_server: Start, burst: int,
                                           events_per_write: list[int]) -> None:
    """A server with no per-token latency is ahead of its reader: with ``burst`` it writes up
    to that many events at once, which is what a client's throughput is measured against."""
    server = loopback_server(ScriptedModel.single(ANSWER), latency=LatencyModel(burst=burst))
    chunks = await http_chunks(server.url, {"inputs": PROMPT,
                                            "parameters": {"max_new_tokens": 6}})
    assert [chunk.count(b"data:") for chunk in chunks] == events_per_write
    events = sse_payloads(b"".join(chunks).decode())
    assert [e["token"]["text"] for e in events] == TOKENS[:6]
    assert server.records[0].tokens_sent == 6


def test_a_burst_is_at_least_one_token() -> None:
    with pytest.raises(ValueError, match="burst must be >= 1"):
        LatencyModel(burst=0)


# --------------------------------------------------------------------------- faults


async def test_status_fault_answers_with_tgi_error_body_and_retry_after(
        server: LoopbackServer) -> None:
    server.inject(Fault.status(429, retry_after=1.5))
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{server.url}/generate_stream",
                                   json={"inputs": PROMPT, "parameters": {}})
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "1.5"
    assert answer.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert server.records[0].status == 429


async def test_overload_is_retried_by_the_backend(tgi: Make, server: LoopbackServer) -> None:
    server.inject(Fault.status(429, retry_after=0))
    attempts: list[int] = []
    tokens = await collect(tgi(server), on_attempt=attempts.append)
    assert tokens[-1].finish_reason == "eos"
    assert attempts == [1, 2]
    assert [r.status for r in server.records] == [429, 200]


async def test_fault_times_and_exhausted_retries(tgi: Make, server: LoopbackServer) -> None:
    server.inject(Fault.status(503, times=2))
    with pytest.raises(UnhealthyError):
        await collect(tgi(server, max_retries=1))
    assert [r.status for r in server.records] == [503, 503]
    assert server.pending_faults == []


async def test_faults_apply_in_fifo_order_to_matching_paths(
        tgi: Make, server: LoopbackServer) -> None:
    server.inject(Fault.status(424, path="/generate"), Fault.status(429))
    with pytest.raises(OverloadedError):
        await collect(tgi(server, max_retries=0))
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{server.url}/generate",
                                   json={"inputs": PROMPT, "parameters": {}})
    assert answer.status_code == 424
    assert answer.json()["error_type"] == "generation"


async def test_error_event_after_tokens(tgi: Make, server: LoopbackServer) -> None:
    server.inject(Fault.error_event(after_tokens=2, error_type="generation"))
    with pytest.raises(InStreamError) as info:
        await collect(tgi(server))
    assert (info.value.error_type, info.value.tokens_received) == ("generation", 2)
    record = await wait_until_finished(server)
    assert (record.tokens_sent, record.error_type, record.finish_reason) == (2, "generation",
                                                                            None)


async def test_overloaded_event_before_the_first_token_is_retried(
        tgi: Make, server: LoopbackServer) -> None:
    server.inject(Fault.error_event(after_tokens=0, error_type="overloaded"))
    tokens = await collect(tgi(server))
    assert "".join(t.text for t in tokens) == ANSWER
    assert [r.error_type for r in server.records] == ["overloaded", None]


async def test_drop_breaks_the_connection_mid_stream(tgi: Make, server: LoopbackServer) -> None:
    server.inject(Fault.drop(after_tokens=3))
    received: list[str] = []
    with pytest.raises(StreamDroppedError) as info:
        async with tgi(server).stream(PROMPT, max_new_tokens=64, sampling=GREEDY) as tokens:
            async for token in tokens:
                received.append(token.text)
    assert received == TOKENS[:3]
    assert info.value.tokens_received == 3
    record = await wait_until_finished(server)
    assert record.fault == Fault.drop(after_tokens=3)
    assert (record.tokens_sent, record.finish_reason, record.disconnected) == (3, None, False)


async def test_stall_trips_the_read_timeout(tgi: Make, server: LoopbackServer) -> None:
    server.inject(Fault.stall(after_tokens=1, seconds=30))
    with pytest.raises(BackendTimeoutError):
        await collect(tgi(server, read_timeout=0.2))
    record = await wait_until_finished(server)
    assert (record.tokens_sent, record.disconnected) == (1, True)


async def test_stopping_the_server_breaks_streams_in_flight(
        tgi: Make, loopback_server: Start) -> None:
    server = loopback_server(ScriptedModel.single(ANSWER))
    server.inject(Fault.stall(after_tokens=1, seconds=30))
    backend = tgi(server)
    with pytest.raises(StreamDroppedError):
        async with backend.stream(PROMPT, max_new_tokens=64, sampling=GREEDY) as tokens:
            await tokens.__anext__()
            await asyncio.to_thread(server.stop)
            await tokens.__anext__()
    await backend.aclose()


# --------------------------------------------------------------------------- disconnects


async def test_client_closing_early_is_recorded_as_a_disconnect(
        tgi: Make, loopback_server: Start) -> None:
    long_answer = " word" * 400
    server = loopback_server(ScriptedModel.single(long_answer),
                             latency=LatencyModel(per_token=0.002))
    backend = tgi(server)
    async with backend.stream(PROMPT, max_new_tokens=1000, sampling=GREEDY) as tokens:
        for _ in range(3):
            await tokens.__anext__()
    await backend.aclose()
    record = await wait_until_finished(server)
    assert record.disconnected
    assert record.finish_reason is None
    assert 3 <= record.tokens_sent < 401


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("parameters", "message"), [
    ({"temperature": 0}, "`temperature` must be strictly positive"),
    ({"do_sample": True, "top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"max_new_tokens": 9000}, "`inputs` tokens + `max_new_tokens` must be <= 8192"),
])
async def test_generate_rejects_what_tgi_rejects_with_422(
        server: LoopbackServer, parameters: dict[str, Any], message: str) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{server.url}/generate",
                                   json={"inputs": PROMPT, "parameters": parameters})
    assert answer.status_code == 422
    assert answer.json()["error_type"] == "validation"
    assert message in answer.json()["error"]
    assert server.records[0].status == 422


async def test_generate_stream_reports_validation_inside_the_stream(
        server: LoopbackServer) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{server.url}/generate_stream",
                                   json={"inputs": PROMPT, "parameters": {"temperature": 0.0}})
    assert answer.status_code == 200
    assert sse_payloads(answer.text) == [{
        "error": "Input validation error: `temperature` must be strictly positive",
        "error_type": "validation"}]


async def test_prompt_longer_than_max_input_tokens(tgi: Make, loopback_server: Start) -> None:
    server = loopback_server(EchoModel(), max_input_tokens=5, max_total_tokens=100)
    with pytest.raises(InStreamError, match="`inputs` must have less than 5 tokens"):
        await collect(tgi(server), max_new_tokens=10)


async def test_empty_inputs_are_rejected(tgi: Make, server: LoopbackServer) -> None:
    with pytest.raises(InStreamError, match="`inputs` cannot be empty"):
        await collect(tgi(server), "")


async def test_malformed_body_is_a_422(server: LoopbackServer) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{server.url}/generate_stream", json={"prompt": "x"})
    assert answer.status_code == 422
    assert "inputs" in answer.json()["error"]


# --------------------------------------------------------------------------- other endpoints


async def test_generate_answers_at_once_with_details(server: LoopbackServer) -> None:
    async with httpx.AsyncClient() as client:
        answer = (await client.post(f"{server.url}/generate", json={
            "inputs": PROMPT, "parameters": {"max_new_tokens": 3}})).json()
    assert answer["generated_text"] == "".join(TOKENS[:3])
    assert answer["details"]["finish_reason"] == "length"
    assert [t["text"] for t in answer["details"]["tokens"]] == TOKENS[:3]
    assert server.records[0].tokens_sent == 3


async def test_stop_sequence_ends_the_answer(server: LoopbackServer) -> None:
    async with httpx.AsyncClient() as client:
        answer = (await client.post(f"{server.url}/generate", json={
            "inputs": PROMPT, "parameters": {"stop": ["Wait"]}})).json()
    assert answer["generated_text"] == "Let me think.\n\nWait"
    assert answer["details"]["finish_reason"] == "stop_sequence"


async def test_tokenize_and_count_tokens(tgi: Make, server: LoopbackServer) -> None:
    async with httpx.AsyncClient() as client:
        tokens = (await client.post(f"{server.url}/tokenize",
                                    json={"inputs": "Hi there"})).json()
    assert [(t["text"], t["start"], t["stop"]) for t in tokens] == [("Hi", 0, 2),
                                                                   (" there", 2, 8)]
    assert await tgi(server).count_tokens(PROMPT) == Tokenizer().count(PROMPT)


async def test_chat_tokenize_renders_chatml_with_hermes_tools(
        tgi: Make, server: LoopbackServer) -> None:
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    text = await tgi(server).render_chat(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "text", "text": "2+2?"}]}], [tool])
    assert text is not None
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert f"<tools>\n{json.dumps(tool)}\n</tools>" in text
    assert text.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


async def test_chat_without_tools_is_plain_chatml(tgi: Make, server: LoopbackServer) -> None:
    text = await tgi(server).render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


async def test_info_reports_the_limits(tgi: Make, loopback_server: Start) -> None:
    server = loopback_server(EchoModel(), model_id="test/m", max_input_tokens=100,
                             max_total_tokens=200, max_stop_sequences=2)
    info = await tgi(server).info()
    assert (info.model_id, info.max_input_tokens, info.max_total_tokens,
            info.max_stop_sequences) == ("test/m", 100, 200, 2)


async def test_health_follows_the_healthy_flag(tgi: Make, server: LoopbackServer) -> None:
    backend = tgi(server)
    assert await backend.health()
    server.healthy = False
    assert not await backend.health()
    await backend.aclose()


async def test_requests_beyond_max_concurrent_are_overloaded(tgi: Make,
                                                             loopback_server: Start) -> None:
    server = loopback_server(ScriptedModel.single(" word" * 50), max_concurrent_requests=1,
                             latency=LatencyModel(per_token=0.01))
    holder = tgi(server)
    async with holder.stream(PROMPT, max_new_tokens=50, sampling=GREEDY) as tokens:
        await tokens.__anext__()
        with pytest.raises(InStreamError) as info:
            await collect(tgi(server, max_retries=0))
        assert info.value.error_type == "overloaded"
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{server.url}/generate", json={"inputs": PROMPT})
        assert (answer.status_code, answer.json()["error_type"]) == (429, "overloaded")
    await holder.aclose()
    await wait_until_finished(server, 0)
    tokens_after = await collect(tgi(server), max_new_tokens=2)
    assert tokens_after[-1].finish_reason == "length"


async def test_cancelling_the_caller_closes_the_server_stream(tgi: Make,
                                                             server: LoopbackServer) -> None:
    server.inject(Fault.stall(after_tokens=1, seconds=30))
    backend = tgi(server)
    first_token = asyncio.Event()

    async def consume() -> None:
        async with backend.stream(PROMPT, max_new_tokens=64, sampling=GREEDY) as tokens:
            await tokens.__anext__()
            first_token.set()
            await tokens.__anext__()

    task = asyncio.create_task(consume())
    await first_token.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await wait_until_finished(server)
    assert (record.disconnected, record.tokens_sent) == (True, 1)
