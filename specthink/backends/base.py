"""What the engine needs from a server, whatever protocol it speaks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["eos", "length", "stop"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling settings sent with every request of a conversation.

    ``temperature`` of ``None`` or ``0`` means greedy decoding (on TGI: ``do_sample=false`` and no
    temperature sent, since TGI rejects ``temperature=0``).
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    grammar: dict[str, Any] | None = None
    """TGI grammar (``{"type": "json", "value": schema}``); sent only to backends that
    support it. ``{"type": "gbnf", "value": text}`` is llama.cpp's (``call_grammar``)."""
    keep_special_tokens: bool = False
    """The output format's markers may be special tokens (harmony's ``<|channel|>``, Mistral's
    ``[THINK]``): ask the server to keep them in the text (vLLM / SGLang
    ``skip_special_tokens: false``, TGI's ``special`` tokens' text, llama.cpp's
    ``preserved_tokens`` from ``marker_tokens``; the stop token stays out either way)."""
    marker_tokens: tuple[str, ...] = ()
    """With ``keep_special_tokens``, the texts of the format's markers that may be special
    tokens (``ResponseTemplate.marker_tokens``), for servers that keep only the special tokens
    a request names (llama.cpp's ``preserved_tokens``)."""

    @property
    def greedy(self) -> bool:
        return not self.temperature


@dataclass(frozen=True, slots=True)
class StreamToken:
    """One generated token.

    Special tokens (e.g. the final ``</s>``) arrive with ``special=True`` and empty ``text``.
    The last token of a stream carries ``finish_reason`` and, where the server reports it,
    ``input_tokens`` (the prompt length in tokens).
    """

    text: str
    special: bool = False
    finish_reason: FinishReason | None = None
    input_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What a server says about itself (TGI ``/info``, or ``/v1/models`` for OpenAI servers)."""

    model_id: str
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_stop_sequences: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)


OnAttempt = Callable[[int], None]
"""Called with the attempt number (1, 2, ...) each time an HTTP request is sent."""

RequestKind = Literal["generation", "auxiliary"]
"""What an upstream request is for: a generation stream (``Backend.stream``), or anything else
a backend asks on the way (``/info``, ``/v1/models``, ``/props``, tokenizers, chat-template
endpoints, health)."""


@runtime_checkable
class Backend(Protocol):
    """A text-completion server.

    ``stream`` returns an async context manager; leaving it closes the HTTP stream at once, which
    tells the server to cancel the generation.
    """

    url: str
    adds_bos_token: bool
    """True when the server prepends BOS itself, so a rendered template must not start with it."""
    supports_grammar: bool
    """True when ``SamplingParams.grammar`` is honoured (constrained output)."""
    keeps_tool_turns: bool
    """The server's own chat template sees assistant ``tool_calls`` and tool results as the
    model's template expects (vLLM, llama.cpp); TGI keeps only role and content."""

    def stream(self, prompt: str, *, max_new_tokens: int, sampling: SamplingParams,
               on_attempt: OnAttempt | None = None, routing_key: str | None = None,
               ) -> AbstractAsyncContextManager[AsyncIterator[StreamToken]]:
        """``routing_key`` goes in the backend's routing headers (``X-Session-ID`` by default)
        of every attempt, so a router in front of replicas keeps one call on one replica."""
        ...

    async def info(self, *, refresh: bool = False) -> ServerInfo:
        """Cached after the first call (concurrent first callers share one request);
        ``refresh`` asks the server again (after a :class:`~specthink.errors.ContextLimitError`,
        for instance)."""
        ...

    async def health(self) -> bool: ...

    async def call_grammar(self, tools: Sequence[dict[str, Any]],
                           name: str | None) -> dict[str, Any] | None:
        """A ``SamplingParams.grammar`` for the rest of a call the engine opened (a required
        call): with ``name``, its arguments, one JSON object; without, the name of one of
        ``tools``, then its arguments. ``None`` where the server takes no such grammar."""
        ...

    async def count_tokens(self, text: str) -> int: ...

    async def tokenize(self, text: str) -> list[int]:
        """The server's token ids of ``text`` as a raw prompt (BOS first where the server adds
        it); ``BackendError`` when the server has no tokenizer endpoint."""
        ...

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None,
                          chat_template_kwargs: Mapping[str, Any] | None = None,
                          ) -> str | None:
        """The server's own chat template applied to ``messages`` with the generation prompt,
        or ``None`` when the server cannot render templates (found out once per backend).
        ``tool_choice`` is OpenAI's: ``"auto"``, ``"none"``, ``"required"`` or a function; it
        goes to servers whose template endpoint takes one (TGI), others render ``tools`` as
        given. ``chat_template_kwargs`` (``{"enable_thinking": True}``) go to the template
        where the server's endpoint takes them (vLLM, llama.cpp); callers pass the keyword
        only when there are some."""
        ...

    async def aclose(self) -> None: ...
