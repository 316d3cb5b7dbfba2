"""Text Generation Inference: ``/generate_stream``, ``/info``, ``/health``, ``/tokenize`` and
``/chat_tokenize``, spoken with httpx.

Layers, as in TGI's own client: a pure request builder (:func:`generate_parameters`), a pure
event decoder (:func:`decode_stream_event`), the shared error mapper
(``specthink.errors.error_from_response``) and thin I/O methods on :class:`TGIBackend`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

from specthink.backends._counting import count_occurrences
from specthink.backends._httpbackend import (
    SSEBackend,
    TokenStream,
    event_json,
    malformed_event,
    sampling_fields,
)
from specthink.backends._sse import ServerSentEvent, SSEStream, loads_json
from specthink.backends.base import (
    FinishReason,
    SamplingParams,
    ServerInfo,
    StreamToken,
)
from specthink.errors import (
    BackendError,
    BackendStatusError,
    ConfigError,
    InStreamError,
    in_stream_error,
)

__all__ = ["BACKEND", "TGIBackend", "decode_stream_event", "generate_parameters",
           "tgi_tool_choice"]

logger = logging.getLogger("specthink.backends")

_FINISH: dict[str, FinishReason] = {
    "eos_token": "eos",
    "length": "length",
    "stop_sequence": "stop",
}


def generate_parameters(max_new_tokens: int, sampling: SamplingParams) -> dict[str, Any]:
    """The ``parameters`` object of a TGI generate request.

    Greedy decoding is ``do_sample=false`` with no temperature and no top_p: TGI answers
    ``temperature=0`` and ``top_p=1.0`` with a 422, and any of temperature, top_p or top_k
    switches it to sampling.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens, "details": True,
                              "do_sample": not sampling.greedy, **sampling_fields(sampling)}
    if sampling.grammar is not None:
        params["grammar"] = sampling.grammar
    return params


def tgi_tool_choice(tool_choice: str | Mapping[str, Any]) -> str | dict[str, Any]:
    """``tool_choice`` in the form TGI's ``ChatRequest`` takes (``ToolChoice`` in its OpenAPI):
    ``"auto"``, ``"none"``, ``"required"`` (LangChain's ``"any"`` too), or a tool name, plain
    or as OpenAI's ``{"type": "function", "function": {"name": ...}}``, sent in the latter form
    (TGI's typed variant is tagged by ``type``). Anything else is a ``ConfigError``.
    """
    if isinstance(tool_choice, str):
        if tool_choice in ("auto", "none", "required"):
            return tool_choice
        if tool_choice == "any":
            return "required"
        name: object = tool_choice
    elif isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else tool_choice.get("name")
    else:
        name = None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"tool_choice {tool_choice!r} is not 'auto', 'none', 'required', "
                          "'any', a tool name or {'type': 'function', 'function': {'name': ...}}")
    return {"type": "function", "function": {"name": name}}


def _error_event(payload: dict[str, Any], url: str, tokens_received: int) -> InStreamError:
    error_type = payload.get("error_type")
    return in_stream_error(str(payload.get("error") or "error event"), url=url,
                           error_type=None if error_type is None else str(error_type),
                           tokens_received=tokens_received)


def decode_stream_event(payload: dict[str, Any], *, url: str = "",
                        tokens_received: int = 0, keep_special: bool = False) -> StreamToken:
    """One ``/generate_stream`` event (a ``StreamResponse``) as a :class:`StreamToken`.

    TGI streams every token's text, special ones too (``special: true``); their text is kept
    with ``keep_special`` (an output format whose markers are special tokens: harmony's
    ``<|channel|>``, Mistral's ``[THINK]``), except the stop token's, which ends the stream
    (as vLLM never detokenizes it).

    Raises :class:`InStreamError` for an ``{"error", "error_type"}`` event.
    """
    if "error" in payload:
        raise _error_event(payload, url, tokens_received)
    token = payload.get("token") or {}
    special = bool(token.get("special"))
    details = payload.get("details")
    finish: FinishReason | None = None
    input_tokens: int | None = None
    if isinstance(details, dict):
        finish = _FINISH.get(str(details.get("finish_reason")), "eos")
        length = details.get("input_length")
        input_tokens = length if isinstance(length, int) else None
    elif payload.get("generated_text") is not None:
        # details=false (never sent by us, but a proxy might strip it): the end is still marked.
        finish = "eos" if special else "length"
    shown = not special or (keep_special and finish is None)
    return StreamToken(str(token.get("text", "")) if shown else "", special and not shown,
                       finish, input_tokens)


def _event_token(event: ServerSentEvent, *, url: str, tokens_received: int,
                 keep_special: bool = False) -> StreamToken | None:
    """A ``/generate_stream`` event's token (``None``: ``[DONE]``, or no JSON object)."""
    data = event.data
    if data == "[DONE]":
        return None
    try:  # event_json, inlined: this runs for every token
        payload = loads_json(data)
    except ValueError as exc:
        raise malformed_event(event, url, tokens_received) from exc
    if not isinstance(payload, dict):
        return None
    return decode_stream_event(payload, url=url, tokens_received=tokens_received,
                               keep_special=keep_special)


class TGIBackend(SSEBackend):
    """A Text Generation Inference server.

    Example::

        backend = TGIBackend("http://127.0.0.1:8080")
        async with backend.stream(prompt, max_new_tokens=64, sampling=SamplingParams()) as tokens:
            async for token in tokens:
                print(token.text, end="")
        await backend.aclose()

    ``api_key`` (default: ``$SPECTHINK_API_KEY``) is sent as ``Authorization: Bearer``.
    Timeouts bound connecting and the gap between two bytes, never a whole stream; they apply
    to a passed-in ``client`` too. Requests that fail before their first token with 429, 503, a
    refused connection or an in-stream ``overloaded`` event are retried up to ``max_retries``
    times, with exponential backoff from ``retry_backoff`` to ``retry_max_backoff`` seconds.
    """

    kind: ClassVar[str] = "tgi"
    """The name :func:`specthink.backends.create` knows this protocol by."""
    health_paths: ClassVar[tuple[str, ...]] = ("/health",)
    adds_bos_token = True
    """TGI tokenizes ``inputs`` with special tokens: a rendered template must not carry BOS."""
    supports_grammar = True
    keeps_tool_turns = False

    async def call_grammar(self, tools: Sequence[dict[str, Any]],
                           name: str | None) -> dict[str, Any] | None:
        """TGI's JSON grammar: the named tool's arguments, an object its ``parameters``
        validate (a JSON grammar cannot begin inside the call, before the name)."""
        if name is None:
            return None
        schema = next((tool["function"].get("parameters") for tool in tools
                       if tool["function"]["name"] == name), None)
        return {"type": "json", "value": dict(schema or {"type": "object"})}
    """TGI 3.3 keeps only role and content of each message it renders."""
    _warned_kwargs = False
    """The template kwargs TGI cannot take were warned about (once per backend)."""

    async def _stream_request(self, prompt: str, max_new_tokens: int,
                              sampling: SamplingParams) -> tuple[str, dict[str, Any]]:
        return "/generate_stream", {"inputs": prompt,
                                    "parameters": generate_parameters(max_new_tokens, sampling)}

    def _check_first(self, event: ServerSentEvent) -> None:
        payload = event_json(event, self.url, 0)
        if isinstance(payload, dict) and "error" in payload:
            raise _error_event(payload, self.url, 0)

    def _tokens(self, stream: SSEStream, sampling: SamplingParams) -> AsyncIterator[StreamToken]:
        decode = (partial(_event_token, keep_special=True) if sampling.keep_special_tokens
                  else _event_token)
        return TokenStream(stream, stream.next_event, decode)

    async def _fetch_info(self) -> ServerInfo:
        """``GET /info``."""
        raw = await self._conn.request_json("GET", "/info")
        if not isinstance(raw, dict) or "model_id" not in raw:
            raise BackendError(f"/info answered without a model_id: {str(raw)[:200]}",
                               url=self.url)
        return ServerInfo(
            model_id=str(raw["model_id"]),
            # TGI before 2.1 called it max_input_length.
            max_input_tokens=_opt_int(raw.get("max_input_tokens", raw.get("max_input_length"))),
            max_total_tokens=_opt_int(raw.get("max_total_tokens")),
            max_stop_sequences=_opt_int(raw.get("max_stop_sequences")),
            raw=raw)

    async def count_tokens(self, text: str) -> int:
        """``POST /tokenize``: the server's token count, special tokens (BOS) included, counted
        as the answer streams in (one object per token: never parsed whole)."""
        return await self._conn.open_stream(
            "/tokenize", {"inputs": text},
            opened=lambda body: count_occurrences(body, b'"id":'))

    async def tokenize(self, text: str) -> list[int]:
        """``POST /tokenize``: the server's token ids of ``text`` as a raw prompt, BOS first
        where the model's tokenizer adds it."""
        ids = [token.get("id") if isinstance(token, dict) else None
               for token in await self._tokenized(text)]
        checked = [i for i in ids if isinstance(i, int)]
        if len(checked) != len(ids):
            raise BackendError("/tokenize answered tokens without ids", url=self.url)
        return checked

    async def _tokenized(self, text: str) -> list[Any]:
        tokens = await self._conn.request_json("POST", "/tokenize", {"inputs": text})
        if not isinstance(tokens, list):
            raise BackendError(f"/tokenize answered {str(tokens)[:200]}", url=self.url)
        return tokens

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None,
                          chat_template_kwargs: Mapping[str, Any] | None = None,
                          ) -> str | None:
        """``POST /chat_tokenize``: the model's own chat template with the generation prompt.

        With ``tools``, ``tool_choice`` (see :func:`tgi_tool_choice`) goes along: TGI renders
        only the named tool for a name, all of them for ``"required"``, none for ``"none"``,
        and adds its ``no_tool`` pseudo-function only for ``"auto"`` (its default when none is
        sent). A name not among the tools is TGI's 422 ``tool_error`` (a
        ``RequestValidationError``). ``None`` when the server has no such endpoint (TGI before
        2.2). TGI 3.3 keeps only ``role`` and ``content`` of each message; the text keeps the
        template's BOS (``/generate`` adds another: the caller cuts it). TGI's endpoint takes
        no template kwargs (huggingface/text-generation-inference#3259): ``chat_template_kwargs``
        cannot reach its template, which the debug log says once per backend (``PairSettings``
        warns when the user's own ``template_kwargs`` meet a TGI-rendered template; a family's
        default thinking switch, which its template mostly defaults to anyway, is no news).
        """
        if chat_template_kwargs and not self._warned_kwargs:
            self._warned_kwargs = True
            logger.debug(
                "%s: TGI's /chat_tokenize takes no chat template kwargs, so %s do not reach "
                "its template; pass a client-side template (the model's tokenizer_config.json "
                "as small_template / target_template) for them", self.url,
                dict(chat_template_kwargs))
        body: dict[str, Any] = {"model": "tgi", "messages": list(messages)}
        if tools:
            body["tools"] = list(tools)
            if tool_choice is not None:
                body["tool_choice"] = tgi_tool_choice(tool_choice)
        try:
            answer = await self._conn.request_json("POST", "/chat_tokenize", body)
        except BackendStatusError as exc:
            if exc.status_code in (404, 405):
                return None
            raise
        text = answer.get("templated_text") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise BackendError(f"/chat_tokenize answered {json.dumps(answer)[:200]}",
                               url=self.url)
        return text


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


BACKEND = TGIBackend
"""The class :func:`specthink.backends.create` builds for this protocol."""
