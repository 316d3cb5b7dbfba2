"""OpenAI-compatible ``/v1/completions`` (vLLM, SGLang, llama.cpp's and llama-cpp-python's
servers, TGI), spoken with httpx over raw prompts, plus each server's own tokenizer and chat
template endpoints where it has them: vLLM's ``/tokenize`` (a prompt, or ``messages`` through
the model's template) and ``/detokenize``, llama.cpp's ``/tokenize`` and ``/apply-template``,
TGI's and llama-cpp-python's tokenizers. What a server speaks is found once per backend.

Layers: a pure request builder (:func:`completion_body`), a pure chunk decoder
(:class:`CompletionDecoder`), a pure byte-level token decoder (:func:`decode_token_strs`), the
shared error mapper and thin I/O on :class:`OpenAICompletionsBackend`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Literal, Unpack

from specthink.backends._connection import ResponseBody
from specthink.backends._counting import count_occurrences, int_field
from specthink.backends._httpbackend import (
    HTTPOptions,
    SSEBackend,
    event_json,
    no_finish_reason,
    sampling_fields,
)
from specthink.backends._sse import ServerSentEvent, SSEStream
from specthink.backends.base import FinishReason, SamplingParams, ServerInfo, StreamToken
from specthink.errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    ConfigError,
    ContextLimitError,
    InStreamError,
    StreamDroppedError,
    in_stream_error,
    redact_url,
)

__all__ = ["BACKEND", "ChatRendering", "CompletionDecoder", "OpenAICompletionsBackend",
           "completion_body", "decode_token_strs", "openai_messages"]

logger = logging.getLogger("specthink.backends")

_FINISH: dict[str, FinishReason] = {
    # No stop sequences are ever sent, so "stop" can only mean end-of-sequence.
    "stop": "eos",
    "eos_token": "eos",  # TGI's /v1/completions stream
    "length": "length",
    "stop_sequence": "stop",
}

STREAMED_COUNT_CHARS = 64 * 1024
"""Texts longer than this are counted from the tokenizer's answer as it streams in
(:mod:`specthink.backends._counting`), never from a parsed id list."""
TokenizeMethod = Literal["vllm", "tgi", "llama_cpp", "llama_cpp_python", "estimate"]
_METHODS: tuple[TokenizeMethod, ...] = ("vllm", "tgi", "llama_cpp", "llama_cpp_python")

_ABSENT_STATUSES = frozenset({400, 404, 405, 422, 501})
"""Answers that mean "this server has no such endpoint, or not in this form" while probing
(vLLM and SGLang answer a body they cannot validate with 400, FastAPI with 422)."""

_PROBE_MESSAGES = ({"role": "user", "content": "Hi there,\nvoilà: 日本語 (1+2) 🙂"},)
"""The conversation that finds out, once per backend, whether vLLM's ``/tokenize`` renders
chat templates and whether its token strings decode byte-level: ASCII, a newline, Latin,
CJK and an emoji (multi-byte tokens), and no space before punctuation, which
``clean_up_tokenization_spaces`` would change in ``/detokenize``'s answer."""


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte table, in which byte-level BPE vocabularies (GPT-2,
    Qwen, Llama 3, DeepSeek) spell their tokens (a space is ``Ġ``, a newline ``Ċ``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def decode_token_strs(token_strs: Sequence[str]) -> str | None:
    """The text of tokens spelled as ``convert_ids_to_tokens`` spells them in a byte-level BPE
    vocabulary: ordinary tokens through GPT-2's byte table, added tokens (specials such as
    ``<｜User｜>``, which use characters outside the table) as they are. ``None`` if the bytes
    are not UTF-8 (the vocabulary is not byte-level, or a character is cut).

    >>> decode_token_strs(["Hello", "Ġworld", "Ċ", "<｜Assistant｜>"])
    'Hello world\n<｜Assistant｜>'
    """
    table = _byte_decoder()
    out = bytearray()
    for piece in token_strs:
        if all(ch in table for ch in piece):
            out.extend(table[ch] for ch in piece)
        else:
            out.extend(piece.encode())
    try:
        return out.decode()
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True, slots=True)
class ChatRendering:
    """How a server renders chat templates, found once per backend by :meth:`render_chat`.

    ``endpoint`` is ``"vllm"`` (``/tokenize`` with ``messages``), ``"llama_cpp"``
    (``/apply-template``) or ``None`` (the server renders nothing: llama-cpp-python, SGLang,
    TGI's ``/v1``, or a model without a template). For vLLM, ``decodes_token_strs`` says that
    ``return_token_strs`` was checked once against ``/detokenize`` and is trusted from then on
    (one request per rendering instead of two); ``bos_ids``/``bos_text`` are the BOS the server
    prepends to a raw prompt, cut from a rendering that starts with it.
    """

    endpoint: Literal["vllm", "llama_cpp"] | None
    decodes_token_strs: bool = False
    bos_ids: tuple[int, ...] = ()
    bos_text: str = ""


class _Once:
    """A lock per event loop (a backend may be used from the sync edge's loop and the caller's),
    so that concurrent first callers share one detection."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()

    def lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._lock = loop, asyncio.Lock()
        return self._lock


def completion_body(prompt: str, *, model: str | None, max_new_tokens: int,
                    sampling: SamplingParams, llama_cpp: bool = False) -> dict[str, Any]:
    """The JSON body of a streamed ``/v1/completions`` request. Greedy is ``temperature=0``,
    which OpenAI-compatible servers accept (TGI maps it to ``do_sample=false``).

    ``keep_special_tokens`` is ``skip_special_tokens: false`` (vLLM, SGLang) and, for
    llama.cpp's server (``llama_cpp``), ``preserved_tokens``: the format's ``marker_tokens``.
    llama.cpp writes a special token's text only when the server runs with ``--special`` or
    the request names it there (tools/server: ``server_task::params_from_json_cmpl`` keeps
    each string that tokenizes to one token; ``update_slots``' ``accept_special_token``
    decides each sampled token's ``common_token_to_piece``), and it writes a named stop
    token's text too, which :class:`CompletionDecoder` then leaves out."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    grammar = sampling.grammar
    if grammar is not None and grammar.get("type") != "gbnf":
        raise ConfigError("grammar is not supported by the OpenAI-compatible backend "
                          "(supports_grammar is False); use TGIBackend for constrained output")
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max_new_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    if sampling.greedy:
        body["temperature"] = 0.0
    body.update(sampling_fields(sampling))
    if grammar is not None:
        body["grammar"] = grammar["value"]  # llama.cpp's and llama-cpp-python's GBNF field
    if sampling.keep_special_tokens:
        body["skip_special_tokens"] = False
        if llama_cpp and sampling.marker_tokens:
            body["preserved_tokens"] = list(sampling.marker_tokens)
    return body


PROXY_STREAM_ERROR = "stream_error"
"""The error type a router (smg) sends in the stream when its upstream replica's body broke off:
the same as a dropped connection, so the engine resumes (through the router, on a live replica)."""


def _error_event(payload: dict[str, Any], url: str,
                 tokens_received: int) -> InStreamError | StreamDroppedError:
    error = payload.get("error")
    if isinstance(error, dict):  # OpenAI / newer vLLM: {"error": {"message", "type"}}
        message, error_type = error.get("message"), error.get("type")
    elif error is not None:  # TGI: {"error", "error_type"}
        message, error_type = error, payload.get("error_type")
    else:  # older vLLM: {"object": "error", "message", "type"}
        message, error_type = payload.get("message"), payload.get("type")
    if error_type == PROXY_STREAM_ERROR:
        return StreamDroppedError(f"the router's upstream stream broke: {message}", url=url,
                                  tokens_received=tokens_received)
    return in_stream_error(str(message or "error event"), url=url,
                           error_type=None if error_type is None else str(error_type),
                           tokens_received=tokens_received)


def _is_error(payload: object) -> bool:
    return isinstance(payload, dict) and ("error" in payload or payload.get("object") == "error")


class CompletionDecoder:
    """Chunks of a streamed completion in, :class:`StreamToken` out.

    The token that finishes the answer is held back until the usage arrives (vLLM sends it in a
    chunk of its own after the finish, TGI in the same chunk), so that it can carry
    ``input_tokens``. TGI's stream gives the end-of-sequence token's text (e.g. ``</s>``) with
    finish reason ``eos_token``: that token becomes a special one.

    ``preserved`` are the special tokens' texts a llama.cpp request named
    (``preserved_tokens``): llama.cpp writes a named stop token's text too, in a chunk of its
    own before the finishing one (tools/server ``process_token``: the text is sent, then the
    end of generation is checked). A chunk that is exactly one of them is held until the next
    says whether it ended the generation; if it did, its text is left out, as vLLM and TGI
    leave out the stop token.
    """

    def __init__(self, *, url: str = "", preserved: frozenset[str] = frozenset()) -> None:
        self.url = url
        self.tokens_received = 0
        self._held: StreamToken | None = None
        self._preserved = preserved
        self._maybe_stop: str | None = None
        self.finished = False

    def feed(self, payload: Any) -> list[StreamToken]:
        if _is_error(payload):
            raise _error_event(payload, self.url, self.tokens_received)
        if not isinstance(payload, dict):
            return []
        out: list[StreamToken] = []
        usage = payload.get("usage")
        prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            text = str(choice.get("text") or "")
            reason = choice.get("finish_reason")
            self.tokens_received += 1
            finish = _FINISH.get(str(reason), "eos") if reason else None
            if self._maybe_stop is not None:
                held, self._maybe_stop = self._maybe_stop, None
                if not (finish == "eos" and not text):
                    out.append(StreamToken(held))  # it did not end the generation
            if finish is None:
                if text in self._preserved:
                    self._maybe_stop = text
                else:
                    out.append(StreamToken(text))
                continue
            special = reason == "eos_token" or not text or (
                finish == "eos" and text in self._preserved)
            self._held = StreamToken("" if special else text, special, finish)
        if self._held is not None and isinstance(prompt_tokens, int):
            out.append(self._release(prompt_tokens))
        return out

    @property
    def holding(self) -> bool:
        """The finishing token has arrived and waits for the usage."""
        return self._held is not None

    def end(self) -> list[StreamToken]:
        """The stream ended (``[DONE]`` or end of body): release a held finishing token. A
        marker still held had no finish after it: the stream broke, and what follows it is
        written again from what was delivered."""
        self._maybe_stop = None
        return [self._release(None)] if self._held is not None else []

    def _release(self, prompt_tokens: int | None) -> StreamToken:
        held = self._held
        assert held is not None
        self._held = None
        self.finished = True
        return StreamToken(held.text, held.special, held.finish_reason, prompt_tokens)


class _TokenStream:
    def __init__(self, stream: SSEStream, preserved: frozenset[str] = frozenset()) -> None:
        self._stream = stream
        self._decoder = CompletionDecoder(url=stream.url, preserved=preserved)
        self._ready: deque[StreamToken] = deque()
        self._done = False

    def __aiter__(self) -> _TokenStream:
        return self

    async def __anext__(self) -> StreamToken:
        stream, decoder = self._stream, self._decoder
        while not self._ready:
            if self._done:
                raise StopAsyncIteration
            try:
                event = await stream.next_event()
            except (StreamDroppedError, BackendTimeoutError, BackendConnectionError):
                if not decoder.holding:
                    raise
                # The answer was complete; only the trailing usage chunk was lost.
                self._ready.extend(self._end())
                continue
            if event is None or event.data == "[DONE]":
                self._ready.extend(self._end())
                if not self._ready and not decoder.finished:
                    raise no_finish_reason(stream.url, decoder.tokens_received)
                continue
            if decoder.finished:
                continue  # drain what follows the answer, so the connection can be reused
            payload = event_json(event, stream.url, decoder.tokens_received)
            self._ready.extend(decoder.feed(payload))
            stream.tokens_received = decoder.tokens_received
        return self._ready.popleft()

    def _end(self) -> list[StreamToken]:
        self._done = True
        return self._decoder.end()


class OpenAICompletionsBackend(SSEBackend):
    """An OpenAI-compatible completions server (vLLM, SGLang, llama.cpp, TGI's ``/v1``).

    Example::

        backend = OpenAICompletionsBackend("http://127.0.0.1:8000", model="Qwen/Qwen2.5-7B")
        async with backend.stream(prompt, max_new_tokens=64, sampling=SamplingParams()) as tokens:
            async for token in tokens:
                print(token.text, end="")
        await backend.aclose()

    ``model`` defaults to the first id of ``/v1/models`` (for TGI pass ``model="tgi"``: TGI
    reads any other name as a LoRA adapter id). :meth:`render_chat` applies the server's own
    chat template where the server has an endpoint for it (vLLM, llama.cpp), else returns
    ``None``; :meth:`tokenize` and :meth:`count_tokens` use the server's tokenizer. Auth,
    timeouts and retries as :class:`TGIBackend`.
    """

    kind: ClassVar[str] = "openai"
    """The name :func:`specthink.backends.create` knows this protocol by."""
    health_paths: ClassVar[tuple[str, ...]] = ("/health", "/v1/models")
    """``/health`` (vLLM, SGLang, TGI, llama.cpp), else ``/v1/models``."""
    adds_bos_token = True
    """vLLM, SGLang and llama.cpp tokenize raw prompts with BOS, as TGI does: a prompt from
    :meth:`render_chat` comes without it, and a client-side rendering must drop its own."""
    supports_grammar = False
    keeps_tool_turns = True

    def __init__(self, url: str, *, model: str | None = None,
                 **options: Unpack[HTTPOptions]) -> None:
        url = url.rstrip("/") if isinstance(url, str) else url
        if isinstance(url, str) and url.endswith("/v1"):
            url = url[: -len("/v1")]  # accept the OpenAI SDK's base_url spelling too
        super().__init__(url, **options)
        self.model = model
        self.tokenize_method: TokenizeMethod | None = None
        """Which tokenizer endpoint worked (found on first use, then kept)."""
        self.chat_rendering: ChatRendering | None = None
        """How the server renders chat templates (found on the first :meth:`render_chat`)."""
        self._detecting = _Once()
        self._probing_chat = _Once()
        self._learnt_context: int | None = None
        self._dropped: dict[tuple[str, ...], tuple[str, ...]] = {}
        """Per set of markers: those llama-cpp-python's detokenizer drops (``check_keeps``)."""

    def _repr_details(self) -> str:
        return f", model={self.model!r}" if self.model else ""

    async def _model(self) -> str:
        if self.model is None:
            self.model = (await self.info()).model_id
        return self.model

    async def _stream_request(self, prompt: str, max_new_tokens: int,
                              sampling: SamplingParams) -> tuple[str, dict[str, Any]]:
        llama_cpp = False
        if sampling.keep_special_tokens and sampling.marker_tokens:
            # The markers are named to llama.cpp's server only (a field the others do not take).
            llama_cpp = (await self._tokenizer("Hi"))[0] == "llama_cpp"
        return "/v1/completions", completion_body(prompt, model=await self._model(),
                                                  max_new_tokens=max_new_tokens,
                                                  sampling=sampling, llama_cpp=llama_cpp)

    async def check_keeps(self, markers: Sequence[str]) -> None:
        """Raise :class:`ConfigError` when this server would drop any of ``markers`` (an output
        format's ``required_markers``) from its generated text: llama-cpp-python's server,
        whose ``/v1/completions`` never writes a special token's text
        (``Llama._create_completion`` detokenizes with ``special=False`` and takes no field to
        change that), when the served model holds one of them as a special token. Then the
        parts they separate would arrive fused. Found once per set of markers from the
        server's own tokenizer: ``/extras/tokenize`` (special tokens parsed) and back through
        ``/extras/detokenize`` (the same ``Llama.detokenize`` the completions use). vLLM,
        SGLang, TGI and llama.cpp's server keep them when asked (``keep_special_tokens``)."""
        if not markers or (await self._tokenizer("Hi"))[0] != "llama_cpp_python":
            return
        key = tuple(markers)
        dropped = self._dropped.get(key)
        if dropped is None:
            text = "\n".join(key)
            answer = await self._conn.request_json("POST", "/extras/tokenize", {"input": text})
            ids = _int_list(answer.get("tokens")) if isinstance(answer, dict) else None
            back = await self._conn.request_json("POST", "/extras/detokenize",
                                                 {"tokens": ids or []})
            kept = back.get("text") if isinstance(back, dict) else None
            if ids is None or not isinstance(kept, str):
                raise BackendError("llama-cpp-python's /extras tokenizer answered an "
                                   "unexpected shape", url=self.url)
            dropped = self._dropped[key] = tuple(m for m in key if m not in kept)
        if dropped:
            raise ConfigError(
                f"{redact_url(self.url)} is llama-cpp-python's server, which drops special "
                f"tokens' text from /v1/completions, and its model holds the output format's "
                f"markers {', '.join(dropped)} as special tokens: the reasoning would arrive "
                "fused into the answer. Serve this model with llama.cpp's llama-server (which "
                "keeps them when asked with preserved_tokens) or vLLM", field="backend")

    def _check_first(self, event: ServerSentEvent) -> None:
        if event.data == "[DONE]":
            return
        try:
            payload = event.json()
        except ValueError:
            return  # reported, with context, when the stream is read
        if _is_error(payload):
            raise _error_event(payload, self.url, 0)

    def _tokens(self, stream: SSEStream, sampling: SamplingParams) -> AsyncIterator[StreamToken]:
        named = sampling.keep_special_tokens and self.tokenize_method == "llama_cpp"
        return _TokenStream(stream, frozenset(sampling.marker_tokens) if named else frozenset())

    async def call_grammar(self, tools: Sequence[dict[str, Any]],
                           name: str | None) -> dict[str, Any] | None:
        """llama.cpp's and llama-cpp-python's ``grammar`` (GBNF; these servers are known by
        their tokenizer endpoints): the arguments object, after one of the tools' names when
        none is chosen. ``None`` for other servers (the model writes unconstrained)."""
        method, _ = await self._tokenizer("{}")
        if method not in ("llama_cpp", "llama_cpp_python"):
            return None
        if name is not None:
            return {"type": "gbnf", "value": "root ::= object\n" + JSON_GBNF}
        names = " | ".join(_gbnf_literal(tool["function"]["name"]) for tool in tools)
        head = f'root ::= ({names}) "\\", \\"arguments\\": " object\n'
        return {"type": "gbnf", "value": head + JSON_GBNF}

    async def _opened(self, body: ResponseBody) -> SSEStream:
        # llama-cpp-python checks the prompt against its context only once its answer has
        # begun: a prompt that does not fit is a 200 whose body ends, or breaks, before any
        # event. Asked without streaming, it says so (and how large its context is).
        stream = SSEStream(body)
        try:
            first = await stream.next_event(opening=True)
        except BackendConnectionError as exc:
            if not isinstance(exc, StreamDroppedError) and self.context_size is None:
                await self._check_fits(body.response.request.content)
            raise
        if first is None:
            if self.context_size is None:
                await self._check_fits(body.response.request.content)
            return stream  # its reader reports the empty stream
        self._check_first(first)
        stream.push_back(first)
        return stream

    async def _check_fits(self, streamed_body: bytes) -> None:
        """Ask the request of a stream that broke before its first event again, unstreamed and
        for one token: a :class:`ContextLimitError` when the server's context cannot hold it
        (its size learnt from the refusal), nothing when the break had another cause."""
        try:
            request = json.loads(streamed_body)
        except ValueError:
            return
        if not isinstance(request, dict):
            return
        request.pop("stream_options", None)
        request.update(stream=False, max_tokens=1)
        try:
            await self._conn.request("POST", "/v1/completions", request, retry=False)
        except ContextLimitError as refusal:
            self.learn_context_size(refusal.message)
            raise
        except BackendError:
            return

    def learn_context_size(self, message: str) -> int | None:
        """Keep the context size a server named in a refusal (llama-cpp-python: "This
        model's maximum context length is N tokens"); it then shows in :meth:`info`."""
        found = _CONTEXT_SIZE.search(message)
        if found is None:
            return None
        size = int(found.group(1) or found.group(2))
        self._learnt_context = size
        if self._info is not None:
            self._info = _with_context(self._info, size)
        return size

    @property
    def context_size(self) -> int | None:
        """The server's context in tokens (prompt and answer), once known: ``max_model_len``
        (vLLM), ``/props`` ``n_ctx`` (llama.cpp), or learnt from a refusal (llama-cpp-python,
        which reports it nowhere else)."""
        info = self._info
        if info is not None and info.max_total_tokens is not None:
            return info.max_total_tokens
        return self._learnt_context

    async def _fetch_info(self) -> ServerInfo:
        """``GET /v1/models``: the model id (``model`` if given and listed), and the context
        length where the server reports one: vLLM's ``max_model_len``, else llama.cpp's
        ``GET /props`` ``n_ctx``, else what a refusal said (:meth:`learn_context_size`)."""
        raw = await self._conn.request_json("GET", "/v1/models")
        data = raw.get("data") if isinstance(raw, dict) else None
        entries = [e for e in data or () if isinstance(e, dict) and "id" in e]
        if not entries:
            raise BackendError(f"/v1/models lists no model: {str(raw)[:200]}", url=self.url)
        entry = next((e for e in entries if e["id"] == self.model), entries[0])
        max_len = _positive(entry.get("max_model_len"))
        if max_len is None:
            max_len = await self._props_context()
        info = ServerInfo(model_id=str(entry["id"]), raw=raw)
        size = max_len or self._learnt_context
        return info if size is None else _with_context(info, size)

    async def _props_context(self) -> int | None:
        """llama.cpp's ``GET /props``: the context of a slot (``default_generation_settings``
        ``n_ctx``); ``None`` from servers without it (a 404: vLLM, llama-cpp-python, TGI)."""
        try:
            props = await self._conn.request_json("GET", "/props", retry=False)
        except BackendStatusError as exc:
            if exc.status_code in _ABSENT_STATUSES:
                return None
            raise
        settings = props.get("default_generation_settings") if isinstance(props, dict) else None
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        if n_ctx is None and isinstance(props, dict):
            n_ctx = props.get("n_ctx")
        return _positive(n_ctx)

    async def count_tokens(self, text: str) -> int:
        """The server's token count of ``text`` as a raw prompt, BOS included where the server
        adds it; ``len(text) / 4`` rounded up when the server has no tokenizer endpoint.

        The endpoint is found on first use (here, in :meth:`tokenize` or :meth:`render_chat`),
        trying in order: vLLM's and SGLang's ``/tokenize`` (``{"model", "prompt"}`` ->
        ``count``), TGI's ``/tokenize`` (``{"inputs"}``), llama.cpp's ``/tokenize``
        (``{"content"}``), llama-cpp-python's ``/extras/tokenize`` (``{"input"}``); concurrent
        first callers share that search, and its answer is kept (:attr:`tokenize_method`).
        """
        if len(text) > STREAMED_COUNT_CHARS:
            if self.tokenize_method is None:
                await self._tokenizer("Hi")  # found on a probe: never on the long text
            count = await self._count(self.tokenize_method, text)
            if count is not None:
                return count
        ids = await self._server_ids(text)
        return -(-len(text) // 4) if ids is None else len(ids)

    async def _count(self, method: TokenizeMethod | None, text: str) -> int | None:
        """``text``'s token count read as the tokenizer's answer streams in: vLLM's and
        llama-cpp-python's ``count`` field, or TGI's objects counted one read at a time; ``None``
        where the endpoint has no such answer (llama.cpp's bare id list)."""
        if method == "vllm":
            return await self._conn.open_stream(
                "/tokenize", {"model": await self._model(), "prompt": text},
                opened=lambda body: int_field(body, "count"))
        if method == "tgi":
            return await self._conn.open_stream(
                "/tokenize", {"inputs": text},
                opened=lambda body: count_occurrences(body, b'"id":'))
        if method == "llama_cpp_python":
            return await self._conn.open_stream(
                "/extras/tokenize/count", {"input": text},
                opened=lambda body: int_field(body, "count"))
        return None

    async def tokenize(self, text: str) -> list[int]:
        """The server's token ids of ``text`` as a raw prompt (BOS first where the server adds
        it), from the endpoint :meth:`count_tokens` describes. Raises ``BackendError`` when the
        server has no tokenizer endpoint."""
        ids = await self._server_ids(text)
        if ids is None:
            raise BackendError("the server has no tokenizer endpoint (tried vLLM's and TGI's "
                               "/tokenize, llama.cpp's /tokenize, llama-cpp-python's "
                               "/extras/tokenize)", url=self.url)
        return ids

    async def _server_ids(self, text: str) -> list[int] | None:
        """``text``'s ids from the server's tokenizer; ``None`` when it has none."""
        method, ids = await self._tokenizer(text)
        if method == "estimate":
            return None
        if ids is None:
            ids = await self._ids(method, text)
        if ids is None:
            raise BackendError(f"the server answered its tokenizer ({method}) with an "
                               "unexpected shape", url=self.url)
        return ids

    async def _tokenizer(self, text: str) -> tuple[TokenizeMethod, list[int] | None]:
        """The tokenizer endpoint, found once; with ``text``'s ids when finding it just
        tokenized ``text``."""
        if self.tokenize_method is not None:
            return self.tokenize_method, None
        async with self._detecting.lock():
            if self.tokenize_method is not None:
                return self.tokenize_method, None
            for method in _METHODS:
                try:
                    ids = await self._ids(method, text)
                except BackendStatusError as exc:
                    if exc.status_code not in _ABSENT_STATUSES:
                        raise
                    continue
                if ids is not None:
                    logger.debug("%s tokenizes with %s", redact_url(self.url), method)
                    self.tokenize_method = method
                    return method, ids
            logger.debug("%s has no tokenizer endpoint; token counts are estimated",
                         redact_url(self.url))
            self.tokenize_method = "estimate"
            return "estimate", None

    async def _ids(self, method: TokenizeMethod, text: str) -> list[int] | None:
        """``text``'s ids from one tokenizer endpoint, or ``None`` if the answer has another
        server's shape (servers answer each other's bodies with 200s: llama.cpp answers a body
        without ``content`` with ``{"tokens": []}``)."""
        if method == "vllm":
            answer = await self._conn.request_json(
                "POST", "/tokenize", {"model": await self._model(), "prompt": text})
            # Only vLLM and SGLang answer with "count".
            if isinstance(answer, dict) and isinstance(answer.get("count"), int):
                return _int_list(answer.get("tokens"))
            return None
        if method == "tgi":
            answer = await self._conn.request_json("POST", "/tokenize", {"inputs": text})
            if isinstance(answer, list):
                return _int_list([t.get("id") if isinstance(t, dict) else None for t in answer])
            return None
        if method == "llama_cpp":
            answer = await self._conn.request_json("POST", "/tokenize",
                                                   {"content": text, "add_special": True})
        else:
            answer = await self._conn.request_json("POST", "/extras/tokenize", {"input": text})
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if isinstance(tokens, list):  # llama.cpp's with_pieces form is {"id", "piece"} objects
            return _int_list([t.get("id") if isinstance(t, dict) else t for t in tokens])
        return None

    # ----------------------------------------------------------------- chat templates

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None,
                          chat_template_kwargs: Mapping[str, Any] | None = None,
                          ) -> str | None:
        """The server's own chat template applied to ``messages`` (and ``tools``) with the
        generation prompt, ready for :meth:`stream`: a BOS the server prepends to raw prompts
        is cut from its start, so the model sees exactly one. ``None`` when the server renders
        nothing (llama-cpp-python; SGLang, whose ``/tokenize`` takes no ``messages``; TGI's
        ``/v1``, which ``TGIBackend`` renders through ``/chat_tokenize``).

        - vLLM: ``POST /tokenize`` with ``messages``, ``add_generation_prompt`` and
          ``return_token_strs``: the token strings are decoded client-side, once checked
          against ``/detokenize`` on a probe conversation (then one request per rendering;
          else ``/detokenize`` every time, two).
        - llama.cpp: ``POST /apply-template``, which already leaves out the BOS the server
          adds.

        What the server speaks is found on the first call and kept (:attr:`chat_rendering`),
        shared by concurrent callers; a 404 marks an endpoint absent. ``tool_choice`` is not
        sent: neither endpoint takes one, so narrow ``tools`` before (as
        ``prompts.apply_tool_choice`` does). ``chat_template_kwargs`` go to both endpoints
        under that name (vLLM's TokenizeChatRequest field; llama.cpp's server parses it on
        /apply-template as on its chat endpoint). Errors of the server's template on these
        messages raise ``BackendStatusError``.
        """
        rendering = self.chat_rendering or await self._chat_rendering()
        kwargs = dict(chat_template_kwargs or {})
        if rendering.endpoint == "vllm":
            return await self._render_vllm(rendering, messages, tools, kwargs)
        if rendering.endpoint == "llama_cpp":
            return await self._render_llama_cpp(messages, tools, kwargs)
        return None

    async def _chat_rendering(self) -> ChatRendering:
        async with self._probing_chat.lock():
            if self.chat_rendering is None:
                self.chat_rendering = await self._probe_chat()
                logger.debug("%s renders chat templates with %s", redact_url(self.url),
                             self.chat_rendering)
            return self.chat_rendering

    async def _probe_chat(self) -> ChatRendering:
        if self.tokenize_method in (None, "vllm"):
            vllm = await self._probe_vllm()
            if vllm is not None:
                self.tokenize_method = self.tokenize_method or "vllm"
                return vllm
        method, _ = await self._tokenizer("Hi")
        # llama.cpp's /apply-template is tried on the first rendering (a 404 there marks it
        # absent); the other servers have no template endpoint over HTTP.
        return ChatRendering("llama_cpp" if method == "llama_cpp" else None)

    async def _probe_vllm(self) -> ChatRendering | None:
        """Render a probe conversation with vLLM's ``/tokenize``; ``None`` if the server is no
        vLLM, a ``ChatRendering(None)`` if it is one that renders nothing (no template)."""
        try:
            answer = await self._conn.request_json("POST", "/tokenize", self._vllm_chat_body(
                _PROBE_MESSAGES, None, await self._model()))
        except BackendStatusError as exc:
            if exc.status_code not in _ABSENT_STATUSES:
                raise
            # vLLM-family servers that take no messages (SGLang) or a model without a
            # template answer 400; a vLLM tokenizer then still counts tokens.
            return None
        if not (isinstance(answer, dict) and isinstance(answer.get("count"), int)):
            return None  # another server's answer to a body it does not know (llama.cpp)
        ids = _int_list(answer.get("tokens")) or []
        strs = _str_list(answer.get("token_strs"))
        detokenized = await self._detokenize(ids)
        decoded = None if strs is None else decode_token_strs(strs)
        trusted = decoded is not None and decoded == detokenized
        # What the server prepends to a raw prompt: the rendering sent back as a prompt gains
        # those ids at its front.
        raw = await self._ids("vllm", detokenized)
        added = len(raw or ()) - len(ids)
        bos_ids: tuple[int, ...] = ()
        bos_text = ""
        if raw is not None and added > 0 and raw[added:] == ids and raw[:added] == ids[:added]:
            bos_ids = tuple(ids[:added])
            head = None if strs is None else decode_token_strs(strs[:added])
            bos_text = head if head is not None else await self._detokenize(list(bos_ids))
        if not trusted:
            logger.debug("%s: vLLM token strings do not decode byte-level; rendering "
                         "uses /detokenize", redact_url(self.url))
        return ChatRendering("vllm", trusted, bos_ids, bos_text)

    @staticmethod
    def _vllm_chat_body(messages: Sequence[dict[str, Any]],
                        tools: Sequence[dict[str, Any]] | None,
                        model: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": openai_messages(messages),
                                "add_generation_prompt": True, "return_token_strs": True}
        if model is not None:
            body["model"] = model
        if tools:
            body["tools"] = list(tools)
        return body

    async def _detokenize(self, ids: list[int]) -> str:
        body: dict[str, Any] = {"model": await self._model(), "tokens": ids}
        answer = await self._conn.request_json("POST", "/detokenize", body)
        text = answer.get("prompt") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise BackendError(f"/detokenize answered {str(answer)[:200]}", url=self.url)
        return text

    async def _render_vllm(self, rendering: ChatRendering, messages: Sequence[dict[str, Any]],
                           tools: Sequence[dict[str, Any]] | None,
                           kwargs: dict[str, Any]) -> str:
        body = self._vllm_chat_body(messages, tools, await self._model())
        if kwargs:
            body["chat_template_kwargs"] = kwargs
        answer = await self._conn.request_json("POST", "/tokenize", body)
        ids = _int_list(answer.get("tokens")) if isinstance(answer, dict) else None
        if ids is None:
            raise BackendError(f"/tokenize answered {str(answer)[:200]}", url=self.url)
        text = None
        if rendering.decodes_token_strs:
            strs = _str_list(answer.get("token_strs"))
            text = None if strs is None or len(strs) != len(ids) else decode_token_strs(strs)
        if text is None:
            text = await self._detokenize(ids)
        # The BOS is cut here rather than sending add_special_tokens=false with the completion:
        # every prompt this backend sends then follows one rule (client-side templates drop
        # their BOS too, since adds_bos_token is True), the field is vLLM's own (llama.cpp,
        # llama-cpp-python, TGI's /v1 and routers in between do not take it), and the server
        # adds back the same id, so the prefix cache sees identical tokens.
        bos = rendering.bos_ids
        if bos and tuple(ids[:len(bos)]) == bos and text.startswith(rendering.bos_text):
            text = text[len(rendering.bos_text):]
        return text

    async def _render_llama_cpp(self, messages: Sequence[dict[str, Any]],
                                tools: Sequence[dict[str, Any]] | None,
                                kwargs: dict[str, Any]) -> str | None:
        body: dict[str, Any] = {"messages": openai_messages(messages),
                                "add_generation_prompt": True}
        if tools:
            body["tools"] = list(tools)
        if kwargs:
            body["chat_template_kwargs"] = kwargs
        try:
            answer = await self._conn.request_json("POST", "/apply-template", body)
        except BackendStatusError as exc:
            if exc.status_code not in (404, 405, 501):
                raise
            # A llama.cpp server from before /apply-template (early 2025).
            self.chat_rendering = ChatRendering(None)
            return None
        prompt = answer.get("prompt") if isinstance(answer, dict) else None
        if not isinstance(prompt, str):
            raise BackendError(f"/apply-template answered {str(answer)[:200]}", url=self.url)
        return prompt


JSON_GBNF = r"""value ::= object ws | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}"
array ::= "[" ws ( value ( "," ws value )* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9]{1,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"""
"""JSON values (llama.cpp's grammars/json.gbnf), an ``object`` without trailing space so that
a required call's arguments end the generation."""


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a GBNF one for these names

_CONTEXT_SIZE = re.compile(r"maximum context length is (\d+) tokens"
                           r"|exceed context window of (\d+)")
"""llama-cpp-python's refusal (its server's wording, and its library's underneath)."""


def _positive(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _with_context(info: ServerInfo, size: int) -> ServerInfo:
    # A prompt must leave room for at least one new token (llama.cpp refuses len >= n_ctx).
    return dataclasses.replace(info, max_input_tokens=size - 1, max_total_tokens=size)


def openai_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` as OpenAI's chat schema has them, which vLLM and llama.cpp validate: a tool
    call's ``arguments`` is a JSON string (``prompts.validate_messages`` decodes it to the
    object chat templates want; the servers decode it again before rendering)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_string_arguments(call) for call in calls]}
        out.append(message)
    return out


def _string_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or isinstance(function.get("arguments"), str):
        return call
    arguments = json.dumps(function.get("arguments") or {}, ensure_ascii=False)
    return {**call, "function": {**function, "arguments": arguments}}


def _int_list(value: object) -> list[int] | None:
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                       for v in value):
        return value
    return None


def _str_list(value: object) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


BACKEND = OpenAICompletionsBackend
"""The class :func:`specthink.backends.create` builds for this protocol."""
