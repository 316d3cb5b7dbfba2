"""Ollama's native ``/api/generate``: raw prompts in, newline-delimited JSON out.

One file, as every wire protocol: the request builder (:func:`generate_body`), the framing
(:class:`NDJSONStream`, lines of JSON over an open body), the decoder (:func:`decode_chunk`)
and :class:`OllamaBackend`. Connections, retries, timeouts, error answers, the routing key and
the cached ``/info`` come from :class:`~specthink.backends._httpbackend.HTTPBackend`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar, Unpack

from specthink.backends._connection import ResponseBody
from specthink.backends._httpbackend import HTTPBackend, HTTPOptions, TokenStream
from specthink.backends._sse import Body, LineSplitter, loads_json
from specthink.backends.base import FinishReason, SamplingParams, ServerInfo, StreamToken
from specthink.errors import BackendError, ConfigError, in_stream_error

__all__ = ["BACKEND", "NDJSONStream", "OllamaBackend", "decode_chunk", "generate_body"]

_FINISH: dict[str, FinishReason] = {"stop": "eos", "length": "length"}


def generate_body(prompt: str, *, model: str, max_new_tokens: int,
                  sampling: SamplingParams) -> dict[str, Any]:
    """The JSON body of a streamed raw ``/api/generate`` request (no server-side template:
    the engine renders the conversation). Greedy is ``temperature=0``."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if sampling.grammar is not None:
        raise ConfigError("grammar is not supported by the Ollama backend")
    options: dict[str, Any] = {"num_predict": max_new_tokens,
                               "temperature": 0.0 if sampling.greedy else sampling.temperature}
    if not sampling.greedy:
        if sampling.top_p is not None:
            options["top_p"] = sampling.top_p
        if sampling.top_k:
            options["top_k"] = sampling.top_k
    if sampling.seed is not None:
        options["seed"] = sampling.seed
    if sampling.repetition_penalty is not None:
        options["repeat_penalty"] = sampling.repetition_penalty
    return {"model": model, "prompt": prompt, "raw": True, "stream": True, "options": options}


def decode_chunk(payload: Any, *, url: str = "", tokens_received: int = 0) -> StreamToken | None:
    """One line of the stream as a token (``None`` for a line that carries none); an
    ``{"error": ...}`` line raises :class:`InStreamError`."""
    if not isinstance(payload, dict):
        return None
    if "error" in payload:
        raise in_stream_error(str(payload["error"]), url=url, tokens_received=tokens_received)
    text = str(payload.get("response") or "")
    if not payload.get("done"):
        return StreamToken(text)
    count = payload.get("prompt_eval_count")
    finish = _FINISH.get(str(payload.get("done_reason")), "eos")
    return StreamToken(text, special=not text and finish == "eos", finish_reason=finish,
                       input_tokens=count if isinstance(count, int) else None)


class NDJSONStream:
    """An open ``application/x-ndjson`` body, read one JSON value per line."""

    def __init__(self, body: Body) -> None:
        self.body = body
        self.url = body.url
        self.tokens_received = 0
        self._splitter = LineSplitter()
        self._lines: list[bytes] = []
        self._pushed_back: Any = None
        self._eof = False

    def push_back(self, value: Any) -> None:
        self._pushed_back = value

    async def next_value(self, *, opening: bool = False) -> Any:
        """The next line's JSON (``None`` at the end; blank lines are skipped)."""
        if self._pushed_back is not None:
            value, self._pushed_back = self._pushed_back, None
            return value
        while True:
            while self._lines:
                line = self._lines.pop(0).strip()
                if line:
                    try:
                        return loads_json(line)
                    except ValueError as exc:
                        raise BackendError(f"malformed stream line after "
                                           f"{self.tokens_received} tokens: {line[:200]!r}",
                                           url=self.url) from exc
            if self._eof:
                return None
            chunk = await self.body.next_chunk(None if opening else self.tokens_received)
            if chunk is None:
                self._eof = True
                # A last line without its newline still counts.
                self._lines = [self._splitter.rest]
            else:
                self._lines = self._splitter.feed_bytes(chunk)

    async def aclose(self) -> None:
        await self.body.aclose()


class OllamaBackend(HTTPBackend[NDJSONStream]):
    """An Ollama server, spoken to natively (``/api/generate`` with ``raw``).

    Example::

        backend = OllamaBackend("http://127.0.0.1:11434", model="qwen2.5:1.5b")

    ``model`` defaults to the first of ``/api/tags``. Prompts are rendered client-side
    (``render_chat`` is ``None``); Ollama reports no length limits over its API (it truncates
    to its ``num_ctx``), so :meth:`info` gives none. Auth, timeouts, retries and the routing
    key as :class:`~specthink.backends.tgi.TGIBackend`.
    """

    kind: ClassVar[str] = "ollama"
    health_paths: ClassVar[tuple[str, ...]] = ("/api/version",)
    adds_bos_token = True
    """Ollama's runner tokenizes raw prompts with the model's BOS, as llama.cpp does."""
    supports_grammar = False
    keeps_tool_turns = True

    async def call_grammar(self, tools: Sequence[dict[str, Any]],
                           name: str | None) -> dict[str, Any] | None:
        return None  # /api/generate takes a JSON schema in "format", not after a prefix
    """Moot: Ollama renders no template here (``raw``), so tool turns are rendered
    client-side, whole."""

    def __init__(self, url: str, *, model: str | None = None,
                 **options: Unpack[HTTPOptions]) -> None:
        super().__init__(url, **options)
        self.model = model

    def _repr_details(self) -> str:
        return f", model={self.model!r}" if self.model else ""

    async def _stream_request(self, prompt: str, max_new_tokens: int,
                              sampling: SamplingParams) -> tuple[str, dict[str, Any]]:
        if self.model is None:
            self.model = (await self.info()).model_id
        return "/api/generate", generate_body(prompt, model=self.model,
                                              max_new_tokens=max_new_tokens, sampling=sampling)

    async def _opened(self, body: ResponseBody) -> NDJSONStream:
        stream = NDJSONStream(body)
        first = await stream.next_value(opening=True)
        if isinstance(first, dict) and "error" in first:
            raise in_stream_error(str(first["error"]), url=self.url)
        stream.push_back(first)
        return stream

    def _tokens(self, stream: NDJSONStream, sampling: SamplingParams) -> AsyncIterator[StreamToken]:
        return TokenStream(stream, stream.next_value, decode_chunk)

    async def _fetch_info(self) -> ServerInfo:
        """``GET /api/tags``: the model (``model`` if given and listed, else the first)."""
        raw = await self._conn.request_json("GET", "/api/tags")
        models = raw.get("models") if isinstance(raw, dict) else None
        names = [str(m.get("name") or m.get("model")) for m in models or ()
                 if isinstance(m, dict) and (m.get("name") or m.get("model"))]
        if not names:
            raise BackendError(f"/api/tags lists no model: {str(raw)[:200]}", url=self.url)
        return ServerInfo(model_id=self.model if self.model in names else names[0],
                          raw=raw if isinstance(raw, dict) else {})

    async def count_tokens(self, text: str) -> int:
        """An estimate (Ollama has no tokenize endpoint): a quarter of the characters."""
        return -(-len(text) // 4)

    async def tokenize(self, text: str) -> list[int]:
        """Ollama has no tokenizer endpoint: always a ``BackendError``."""
        raise BackendError("Ollama has no tokenizer endpoint", url=self.url)

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None,
                          chat_template_kwargs: Mapping[str, Any] | None = None,
                          ) -> str | None:
        """Always ``None``: raw prompts are rendered client-side."""
        return None


BACKEND = OllamaBackend
"""The class :func:`specthink.backends.create` builds for this protocol."""
