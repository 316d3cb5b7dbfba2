"""``ChatSpeculativeThinking``: speculative thinking as a LangChain chat model."""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from dataclasses import fields
from typing import Any, Self, TypeVar, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.utils.utils import _build_model_kwargs
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from specthink.backends.base import Backend, SamplingParams
from specthink.engine import SpeculativeThinker
from specthink.errors import ConfigError
from specthink.request import ChatRequest
from specthink.settings import API_KEY_ENV, PairSettings
from specthink.sync import close_on_sync_loop, run_sync
from specthink.trace import Event

from ._messages import to_engine_messages
from ._output import ChunkAssembler, OutputShape, message_from_result
from ._structured import (
    StructuredMethod,
    ToolLike,
    format_tools,
    normalize_tool_choice,
    response_format_for,
    structured_runnable,
)

__all__ = ["ChatSpeculativeThinking"]

_T = TypeVar("_T")
_LLM_TYPE = "specthink-chat"
_EXTRA_SAMPLING = frozenset(f.name for f in fields(SamplingParams)) - {
    "temperature", "top_p", "top_k", "seed", "grammar"}
"""Sampling settings without a field of their own; they go through ``model_kwargs``."""
_BUILD_LOCK = threading.Lock()
"""Guards the lazy construction of backends and engine (``batch`` calls from many threads)."""


class ChatSpeculativeThinking(PairSettings, BaseChatModel):
    """Speculative Thinking (arXiv 2504.12329) as a LangChain chat model.

    A small reasoning model writes; at reasoning breakpoints (a blank line followed by "wait",
    "yes", "check", ...) a larger model takes over for a few tokens, then hands back. Two
    text-generation servers do the work: ``small_url`` and ``target_url``.

    Setup:
        Install the extra and point the model at the two servers (TGI; any
        OpenAI-compatible ``/v1/completions`` server with ``backend="openai"``; Ollama with
        ``backend="ollama"``):

        .. code-block:: bash

            pip install "specthink[langchain]"
            export SPECTHINK_SMALL_URL="http://small-tgi:8080"
            export SPECTHINK_TARGET_URL="http://target-tgi:8080"
            export SPECTHINK_API_KEY="..."   # optional, sent as Authorization: Bearer

    Key init args — completion params:
        temperature: float | None
            Sampling temperature; ``0`` or ``None`` means greedy decoding.
        top_p: float | None
            Nucleus sampling.
        top_k: int | None
            Top-k sampling.
        max_tokens: int | None
            Budget of generated tokens, both models and the intervention text together.
        stop: list[str] | None
            Stop sequences; the text is cut where one begins.
        rules: str | TakeoverRules
            When the target takes over: a preset name (``"paper"``, ``"paper_instruct"``,
            ...) or a ``specthink.TakeoverRules``.

    Key init args — client params:
        small_url / target_url: str
            The servers (default ``$SPECTHINK_SMALL_URL`` / ``$SPECTHINK_TARGET_URL``).
        backend: str
            The wire protocol both servers speak: a kind of ``specthink.backends.kinds()``
            (``"tgi"``, ``"openai"``, ``"ollama"``).
        api_key: SecretStr | None
            Bearer token for both servers (default ``$SPECTHINK_API_KEY``).
        timeout: float | None
            Seconds a stream may stay silent before it counts as stalled (no total limit).
        max_retries: int | None
            Retries of a request that failed before its first token (429, 503, refused).
        on_target_error: "fallback" | "raise"
            If the target server fails, let the small model finish alone, or raise.

    Instantiate:
        .. code-block:: python

            from specthink_lc import ChatSpeculativeThinking

            model = ChatSpeculativeThinking(
                small_url="http://small-tgi:8080",    # e.g. DeepSeek-R1-Distill-Qwen-1.5B
                target_url="http://target-tgi:8080",  # e.g. DeepSeek-R1-Distill-Qwen-32B
                temperature=0,
                max_tokens=512,
            )

        The local CPU pair (``specthink local up``) speaks the OpenAI protocol:
        ``backend="openai"``, ``small_url="http://127.0.0.1:8031"``,
        ``target_url="http://127.0.0.1:8032"``. Backends you build yourself (your own httpx
        client, or ``specthink.testing`` doubles) go through
        ``ChatSpeculativeThinking.from_backends(small, target, ...)``.

    Invoke:
        .. code-block:: python

            message = model.invoke("What is 12 * 13?")
            message.content
            message.additional_kwargs["reasoning_content"]

        .. code-block:: python

            '12 * 13 = 156.'
            '\n12 * 13 = 12 * 10 + 12 * 3 = 120 + 36.\n\nWait, let me check: 120 + 36 = 156.\n'

        The reasoning (``<think>…</think>``) never lands in ``content``. With
        ``output_version="v1"`` it is a ``{"type": "reasoning"}`` content block instead.

    Stream:
        .. code-block:: python

            for chunk in model.stream("What is 12 * 13?"):
                print(chunk.text, end="", flush=True)

        Reasoning chunks carry ``additional_kwargs["reasoning_content"]`` and empty text. The
        last chunk has ``chunk_position="last"``, the usage and the response metadata. A probe
        the small model wrote and the target replaced is never streamed.

    Async:
        .. code-block:: python

            await model.ainvoke("What is 12 * 13?")
            async for chunk in model.astream("What is 12 * 13?"):
                ...
            await model.abatch([f"What is {n} * 13?" for n in range(64)])
            await model.aclose()  # before the event loop ends

        The async methods run on the engine itself (no thread pool), so a batch of 64
        conversations shares one event loop.

    Tool calling:
        .. code-block:: python

            from langchain_core.tools import tool

            @tool
            def get_weather(location: str) -> str:
                \"\"\"Get the current weather in a given location.\"\"\"
                return "It's sunny."

            model.bind_tools([get_weather]).invoke("Weather in Paris?").tool_calls

        .. code-block:: python

            [{'name': 'get_weather', 'args': {'location': 'Paris'},
              'id': 'call_bc1db1d9dafc', 'type': 'tool_call'}]

        Tools are rendered into the chat template in the Hermes/Qwen form and the
        ``<tool_call>`` blocks are read back from the answer, never from the reasoning.
        ``tool_choice`` takes a tool name, ``"any"``/``"required"``, ``"auto"`` or ``"none"``;
        ``parallel_tool_calls=False`` keeps the first call only.

    Structured output:
        .. code-block:: python

            from pydantic import BaseModel

            class Joke(BaseModel):
                setup: str
                punchline: str

            model.with_structured_output(Joke).invoke("Tell me a joke about cats.")

        .. code-block:: python

            Joke(setup='Why was the cat sitting on the computer?',
                 punchline='To keep an eye on the mouse!')

        ``method`` is ``"function_calling"`` (default: a forced tool call),
        ``"json_schema"`` (the schema goes into the system prompt, and into a TGI grammar
        when both servers take one) or ``"json_mode"``; ``include_raw=True`` returns
        ``{"raw", "parsed", "parsing_error"}``.

    Token usage:
        .. code-block:: python

            message.usage_metadata

        .. code-block:: python

            {'input_tokens': 16, 'output_tokens': 57, 'total_tokens': 73,
             'output_token_details': {'reasoning': 46}}

        ``output_tokens`` counts every accepted token, whichever model wrote it; a stream
        reports usage on its last chunk only.

    Response metadata:
        .. code-block:: python

            message.response_metadata

        .. code-block:: python

            {'model_name': 'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B+deepseek-ai/DeepSeek-R1-Distill-Qwen-32B',
             'model_provider': 'specthink',
             'finish_reason': 'stop',
             'speculative_thinking': {...},
             'speculative_trace': {...}}

    Speculative-thinking statistics:
        ``response_metadata["speculative_thinking"]`` holds the request's statistics as the
        engine counted them (``specthink.Statistics.to_dict()``):

        .. code-block:: python

            {'small_tokens': 27, 'target_tokens': 30, 'intervention_tokens': 0,
             'reasoning_tokens': 46, 'discarded_tokens': 1, 'input_tokens': 16,
             'takeovers': {'rule1': 1, 'rule2': 1, 'rule3': 0, 'begin': 0, 'every_trigger': 0},
             'requests': {'small': 1, 'target': 1}, 'retries': {'small': 0, 'target': 0},
             'resumed_streams': {'small': 0, 'target': 0},
             'wait_seconds': {'small': 0.02528, 'target': 0.033126},
             'fallback': False, 'fallback_error': None, 'finish_reason': 'stop',
             'output_tokens': 57, 'target_share': 0.526316}

        ``response_metadata["speculative_trace"]`` says who wrote what:

        .. code-block:: python

            {'segments': [
                {'source': 'small', 'rule': None,
                 'text': '<think>\n12 * 13 = 12 * 10 + 12 * 3 = 120 + 36.\n\n'},
                {'source': 'target', 'rule': 'rule1',
                 'text': 'Wait, let me check: 120 + 36 = 156.\n</think>\n\n'},
                {'source': 'target', 'rule': 'rule2', 'text': '12 * 13 = 156.'}],
             'takeovers': [{'rule': 'rule1', 'offset': 48, 'discarded_tokens': 1},
                           {'rule': 'rule2', 'offset': 94, 'discarded_tokens': 0}]}
    """  # noqa: E501

    model_config = ConfigDict(populate_by_name=True)

    # The pair's settings (small_url, target_url, backend, small_model, target_model, rules,
    # small_template, target_template, on_target_error, api_key, timeout, max_retries,
    # routing_headers) are inherited from specthink.settings.PairSettings, declared there once.
    model_name: str | None = Field(default=None, alias="model")
    """Name of the pair in traces and usage; default: the servers' model ids joined by ``+``."""
    temperature: float | None = Field(default=None, ge=0)
    """Sampling temperature; ``0`` or ``None`` is greedy decoding."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus sampling: keep the smallest token set with this probability mass."""
    top_k: int | None = Field(default=None, gt=0)
    """Sample from the ``top_k`` most likely tokens."""
    seed: int | None = None
    """Random seed of the servers' sampler."""
    max_tokens: int | None = Field(default=None, gt=0, alias="max_new_tokens")
    """Generated-token budget of a request, both models together (engine default 4096)."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop sequences: the output is cut where the first one begins."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (callbacks then see every token)."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further sampling settings of ``SamplingParams`` (e.g. ``repetition_penalty``)."""

    _backends: tuple[Backend, Backend] | None = PrivateAttr(default=None)
    _thinker: SpeculativeThinker | None = PrivateAttr(default=None)
    _thinker_key: tuple[Any, ...] | None = PrivateAttr(default=None)

    # ---- construction --------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _build_extra(cls, values: dict[str, Any]) -> Any:
        """Sweep unknown constructor arguments into ``model_kwargs`` (with a warning)."""
        if not isinstance(values, dict):
            return values
        if "request_timeout" in values:  # LangChain's name for the read timeout
            values = dict(values)
            values.setdefault("timeout", values.pop("request_timeout"))
        return _build_model_kwargs(values, _field_names(cls) | {"request_timeout"})

    @field_validator("model_kwargs")
    @classmethod
    def _sampling_kwargs(cls, model_kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(model_kwargs) - _EXTRA_SAMPLING)
        if unknown:
            raise ValueError(f"model_kwargs {unknown} are not sampling settings; "
                             f"accepted: {sorted(_EXTRA_SAMPLING)}")
        return model_kwargs

    @model_validator(mode="after")
    def _stop_is_list(self) -> Self:
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop sequences must be non-empty strings, got {self.stop!r}")
        return self

    @classmethod
    def from_backends(cls, small: Backend, target: Backend, **kwargs: Any,
                      ) -> ChatSpeculativeThinking:
        """A model over backends you built yourself (your own ``httpx`` client, in-process
        test doubles from ``specthink.testing``, ...)."""
        model = cls(small_url=small.url, target_url=target.url, **kwargs)
        model._backends = (small, target)
        return model

    # ---- LangChain identity --------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        """Constant: the type of chat model, whatever servers it talks to."""
        return _LLM_TYPE

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": API_KEY_ENV}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        rules = self.rules if isinstance(self.rules, str) else self.rules.model_dump(mode="json")
        return {
            "small_url": self.small_url, "target_url": self.target_url,
            "backend": self.backend, "small_model": self.small_model,
            "target_model": self.target_model, "model_name": self.model_name, "rules": rules,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "seed": self.seed, "max_tokens": self.max_tokens, "stop": self.stop,
            "small_template": self.small_template, "target_template": self.target_template,
            "on_target_error": self.on_target_error, **self.model_kwargs,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="specthink",
            ls_model_name=kwargs.get("model") or self.model_name or "speculative-thinking",
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop := (stop if stop is not None else self.stop):
            params["ls_stop"] = stop
        return params

    # ---- the engine, built once ----------------------------------------------------------

    def _get_thinker(self) -> SpeculativeThinker:
        key = self._config_key()
        thinker = self._thinker
        if thinker is not None and self._thinker_key == key:
            return thinker
        with _BUILD_LOCK:
            if self._thinker is None or self._thinker_key != key:
                backends = self._backends or self.build_backends()
                thinker = self.build(backends=backends)
                if self._backends is None:
                    # Pooled connections of an engine nobody holds any more (copies of a model
                    # share it) would otherwise stay open until the process ends.
                    weakref.finalize(thinker, close_on_sync_loop, *backends)
                self._thinker = thinker
                self._thinker_key = key
            return self._thinker

    async def aclose(self) -> None:
        """Close the pooled HTTP connections to both servers.

        Call it before the event loop you used the model in ends (``asyncio.run`` closes its
        loop on return); the model stays usable and opens new connections when called again.
        """
        if self._thinker is not None:
            await self._thinker.aclose()

    def close(self) -> None:
        """Close the pooled HTTP connections of the sync methods (``invoke``, ``stream``)."""
        if self._thinker is not None:
            run_sync(self._thinker.aclose())

    def _config_key(self) -> tuple[Any, ...]:
        # A copy made with model_copy(update=...) shares private state; rebuild if the pair's
        # settings or the name changed.
        return (self.pair_key(), self.model_name, id(self._backends))

    def _build_backends(self) -> tuple[Backend, Backend]:
        return self.build_backends()

    # ---- one request ---------------------------------------------------------------------

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any],
                 run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
                 ) -> ChatRequest:
        """The one request of this call, checked once (``ChatRequest.build``)."""
        call = dict(kwargs)
        call.pop("stream", None)
        session_id = call.pop("session_id", None)
        if "model" in call:
            raise ConfigError(
                "ChatSpeculativeThinking serves the models at small_url and target_url; "
                "choose models by server, not with a per-call model= argument")
        tools = call.pop("tools", None)
        tool_choice = call.pop("tool_choice", None)
        parallel_tool_calls = call.pop("parallel_tool_calls", None)
        response_format = call.pop("response_format", None)
        template_kwargs = call.pop("template_kwargs", None)
        sampling = {"temperature": self.temperature, "top_p": self.top_p,
                    "top_k": self.top_k, "seed": self.seed, **self.model_kwargs}
        for name in ("temperature", "top_p", "top_k", "seed", *_EXTRA_SAMPLING):
            if name in call:
                sampling[name] = call.pop(name)
        max_tokens = call.pop("max_tokens", call.pop("max_new_tokens", self.max_tokens))
        if call:
            raise ConfigError(f"unexpected call arguments {sorted(call)}; accepted: tools, "
                              "tool_choice, parallel_tool_calls, response_format, stop, "
                              "session_id, template_kwargs, max_tokens, temperature, "
                              f"top_p, top_k, seed, {', '.join(sorted(_EXTRA_SAMPLING))}")
        return ChatRequest.build(
            to_engine_messages(messages), tools=tools or None,
            tool_choice=tool_choice if tools else None, parallel_tool_calls=parallel_tool_calls,
            response_format=response_format, stop=stop if stop is not None else self.stop,
            max_new_tokens=max_tokens, sampling=SamplingParams(**sampling),
            session_id=session_id or _session_id(run_manager), template_kwargs=template_kwargs)

    def _shape(self) -> OutputShape:
        return OutputShape(model_name=self.model_name)

    # ---- BaseChatModel hooks -------------------------------------------------------------

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        if self.streaming:
            return await agenerate_from_stream(
                self._astream(messages, stop=stop, run_manager=run_manager, **kwargs))
        request = self._prepare(messages, stop, kwargs, run_manager)
        result = await self._get_thinker().agenerate(request)
        return ChatResult(generations=[message_from_result(result, self._shape())])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        if self.streaming:
            return generate_from_stream(
                self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))
        request = self._prepare(messages, stop, kwargs, run_manager)
        result = self._get_thinker().generate(request)
        return ChatResult(generations=[message_from_result(result, self._shape())])

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        request = self._prepare(messages, stop, kwargs, run_manager)
        assembler = ChunkAssembler(self._shape())
        events = cast(AsyncGenerator[Event, None], self._get_thinker().astream(request))
        # Closing the engine's generator closes both server streams: a caller that stops
        # reading (or is cancelled) stops the generation on the servers too.
        async with aclosing(events):
            async for event in events:
                for chunk in assembler.feed(event):
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        request = self._prepare(messages, stop, kwargs, run_manager)
        assembler = ChunkAssembler(self._shape())
        events = self._get_thinker().stream(request)
        try:
            for event in events:
                for chunk in assembler.feed(event):
                    if run_manager is not None:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    # ---- streams: the run's session reaches the engine -------------------------------------

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        # langchain-core calls _stream without the run manager, so the run's metadata (its
        # session) comes along as a call argument.
        yield from super().stream(input, config, stop=stop, **_with_session(config, kwargs))

    def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                stop: list[str] | None = None, **kwargs: Any,
                ) -> AsyncIterator[AIMessageChunk]:
        # langchain-core's own stream, handed over as it is rather than wrapped in one more
        # async generator (a frame switch per chunk): closing it (aclose, or leaving an
        # ``aclosing`` block) closes the engine's stream, and so the servers'.
        return super().astream(input, config, stop=stop, **_with_session(config, kwargs))

    # ---- token counting ------------------------------------------------------------------

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as the small model's server tokenises it (its ``/tokenize``);
        ``get_num_tokens`` and ``get_num_tokens_from_messages`` count with it."""
        return run_sync(self._get_thinker().small.tokenize(text))

    # ---- agents --------------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[ToolLike],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        strict: bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` to the model; its ``<tool_call>`` blocks become ``tool_calls``.

        ``tool_choice``: a tool name (call that tool), ``"any"``/``"required"``/``True`` (call
        some tool), ``"auto"`` (the model decides) or ``"none"``/``False`` (hide the tools).
        ``parallel_tool_calls=False`` keeps only the first call the model writes.
        """
        formatted = format_tools(tools, strict=strict)
        choice = normalize_tool_choice(tool_choice, formatted)
        if choice is not None:
            kwargs["tool_choice"] = choice
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: StructuredMethod = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """A runnable that answers with ``schema`` (a pydantic class, TypedDict or JSON schema).

        ``method``: ``"function_calling"`` forces a tool call whose arguments are the answer;
        ``"json_schema"`` puts the schema in the system prompt (and in a TGI grammar when both
        servers take one); ``"json_mode"`` asks only for a JSON object (say what you want in
        the prompt). ``include_raw=True`` returns ``{"raw", "parsed", "parsing_error"}``.
        """
        if kwargs:
            raise ValueError(f"unexpected arguments {sorted(kwargs)}")
        if method not in ("function_calling", "json_schema", "json_mode"):
            raise ValueError(f"method must be 'function_calling', 'json_schema' or "
                             f"'json_mode', got {method!r}")
        if schema is None and method != "json_mode":
            raise ValueError(f"method={method!r} needs a schema")
        structured_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        bound: Runnable[LanguageModelInput, AIMessage]
        if method == "function_calling":
            assert schema is not None
            name = format_tools([schema])[0]["function"]["name"]
            bound = self.bind_tools([schema], tool_choice=name, strict=strict,
                                    ls_structured_output_format=structured_format)
        else:
            bound = self.bind(response_format=response_format_for(schema, method, strict),
                              ls_structured_output_format=structured_format)
        return structured_runnable(bound, schema, method, include_raw=include_raw)




def _session_id(
        run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
) -> str | None:
    """The conversation's routing key: ``session_id`` or LangGraph's ``thread_id`` from the
    run's metadata (``config={"metadata": {"session_id": ...}}``); else the engine makes one."""
    return _session_from(run_manager.metadata if run_manager is not None else {})


def _with_session(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    if "session_id" in kwargs:
        return kwargs
    session = _session_from(ensure_config(config).get("metadata") or {})
    return {**kwargs, "session_id": session} if session is not None else kwargs


def _session_from(metadata: dict[str, Any]) -> str | None:
    for key in ("session_id", "thread_id"):
        value = metadata.get(key)
        if value is not None and str(value).strip():
            return str(value)
    return None


def _field_names(cls: type[ChatSpeculativeThinking]) -> set[str]:
    names = set()
    for name, info in cls.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return names
