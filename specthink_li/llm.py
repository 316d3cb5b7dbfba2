"""``SpeculativeThinkingLLM``: speculative thinking as a LlamaIndex function-calling LLM."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.generic_utils import (
    achat_to_completion_decorator,
    astream_chat_to_completion_decorator,
    chat_to_completion_decorator,
    stream_chat_to_completion_decorator,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from specthink.backends.base import SamplingParams, ServerInfo
from specthink.engine import SpeculativeThinker
from specthink.errors import ConfigError
from specthink.request import DEFAULT_MAX_NEW_TOKENS, ChatRequest
from specthink.settings import PairSettings
from specthink.sync import close_on_sync_loop, run_sync

from ._messages import to_engine_messages
from ._responses import ChatStreamAssembler, response_from_result
from ._tools import TOOLS_OFFERED_KEY, openai_tools, resolve_tool_choice, tool_selections

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["SpeculativeThinkingLLM"]


_CALL_PARAMS = frozenset({"tools", "tool_choice", "stop", "max_tokens", "max_new_tokens",
                          "temperature", "top_p", "top_k", "seed", "session_id",
                          "template_kwargs"})


class SpeculativeThinkingLLM(PairSettings, FunctionCallingLLM):
    """Speculative Thinking (arXiv 2504.12329) as a LlamaIndex LLM: a small reasoning model
    writes, and at reasoning breakpoints a larger model takes over for a few tokens.

    Setup:
        Install the extra and point it at two servers (TGI, OpenAI-compatible
        ``/v1/completions`` servers such as vLLM, SGLang or llama.cpp, or Ollama)::

            pip install "specthink[llamaindex]"
            export SPECTHINK_SMALL_URL=http://127.0.0.1:8031
            export SPECTHINK_TARGET_URL=http://127.0.0.1:8032
            export SPECTHINK_API_KEY=...        # optional, sent as Authorization: Bearer

    Key init args — the two models:
        small_url, target_url: server URLs (default ``$SPECTHINK_SMALL_URL``,
            ``$SPECTHINK_TARGET_URL``).
        backend: a kind of ``specthink.backends.kinds()``: ``"tgi"``, ``"openai"``
            (``/v1/completions``) or ``"ollama"`` (``/api/generate``).
        small_model, target_model: model names for ``"openai"`` and ``"ollama"`` servers.
        rules: a preset name (``"paper"``, ``"paper_instruct"``) or a ``TakeoverRules``.
        small_template, target_template: chat templates (``"auto"``, ``"chatml"``,
            ``"deepseek-r1"``, a Jinja source).

    Key init args — generation and client:
        temperature (0 is greedy), top_p, top_k, seed, max_tokens, stop; timeout (seconds),
        max_retries, api_key (never serialised), on_target_error (``"fallback"``/``"raise"``).

    Instantiate::

        from llama_index.core import Settings
        from specthink_li import SpeculativeThinkingLLM

        llm = SpeculativeThinkingLLM(small_url="http://gpu0:8080",
                                     target_url="http://gpu1:8080", max_tokens=2048)
        Settings.llm = llm        # query engines, chat engines and agents now use it

    Chat::

        from llama_index.core.llms import ChatMessage

        response = llm.chat([ChatMessage(role="user", content="What is 12 * 13?")])
        print(response.message.content)
        # 156
        print(response.message.blocks[0].content)       # the reasoning, a ThinkingBlock
        # Okay, 12 times 13 ... Wait, let me check: 12 * 13 = 156.

    Stream (each item has the growing ``message``, the new ``delta`` and the engine event in
    ``raw["event"]``; new reasoning arrives in ``additional_kwargs["thinking_delta"]``)::

        for chunk in llm.stream_chat(messages):
            print(chunk.delta, end="")

    Async (native on the engine: many conversations share one event loop)::

        response = await llm.achat(messages)
        async for chunk in await llm.astream_chat(messages):
            ...
        await llm.aclose()        # closes the HTTP connections of this event loop

    Tool calling (Hermes ``<tool_call>`` blocks, read back as ``ToolCallBlock``)::

        from llama_index.core.tools import FunctionTool

        def multiply(a: int, b: int) -> int:
            "Multiply two integers."
            return a * b

        tool = FunctionTool.from_defaults(multiply)
        response = llm.chat_with_tools([tool], user_msg="What is 12 * 13?")
        llm.get_tool_calls_from_response(response)
        # [ToolSelection(tool_id='call_3f2a...', tool_name='multiply',
        #                tool_kwargs={'a': 12, 'b': 13})]

        from llama_index.core.agent.workflow import FunctionAgent
        agent = FunctionAgent(tools=[tool], llm=llm)

    Structured output (a forced tool call)::

        from pydantic import BaseModel
        from llama_index.core.prompts import PromptTemplate

        class Product(BaseModel):
            value: int

        llm.structured_predict(Product, PromptTemplate("Multiply {a} by {b}."), a=12, b=13)
        # Product(value=156)

    Metadata (``context_window`` is the smaller ``max_input_tokens`` of the two servers'
    ``/info``, as any call learnt it, or fetched by ``afetch_metadata``; a default stands in
    until then, so fetch it before building a query engine, which sizes its prompts once)::

        meta = await llm.afetch_metadata()       # or llm.fetch_metadata() in sync code
        meta.context_window, meta.num_output, meta.model_name
        # (32767, 2048, 'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B + deepseek-ai/DeepSeek-R1-...')

    Speculative-thinking statistics (per request, in the message's ``additional_kwargs``)::

        stats = response.message.additional_kwargs["speculative_thinking"]
        stats["target_share"], stats["takeovers"], stats["requests"]
        # (0.19, {'rule1': 4, 'rule2': 1, 'rule3': 0, ...}, {'small': 6, 'target': 5})
        response.additional_kwargs
        # {'prompt_tokens': 31, 'completion_tokens': 412, 'total_tokens': 443}
    """

    # The pair's settings (small_url, target_url, backend, small_model, target_model, rules,
    # small_template, target_template, on_target_error, api_key, timeout, max_retries,
    # routing_headers) are inherited from specthink.settings.PairSettings, declared there once;
    # the key is excluded from every serialised form (LlamaIndex's callbacks log to_dict()).
    temperature: float = Field(
        default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy decoding.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0,
                                description="Nucleus sampling mass (ignored when greedy).")
    top_k: int | None = Field(default=None, gt=0,
                              description="Top-k sampling (ignored when greedy).")
    seed: int | None = Field(default=None, description="Sampling seed.")
    max_tokens: int | None = Field(
        default=None, gt=0,
        description="Tokens to generate, both models and the intervention text together "
                    "(None: up to what the servers allow).")
    stop: list[str] | None = Field(default=None, description="Default stop sequences.")
    context_window: int | None = Field(
        default=None, gt=0,
        description="Override of the context window (None: the servers' max_input_tokens).")

    _thinker: SpeculativeThinker | None = PrivateAttr(default=None)
    _thinker_key: tuple[Any, ...] | None = PrivateAttr(default=None)
    """The settings the engine was built from; None for an engine given to ``from_thinker``."""
    _infos: tuple[ServerInfo, ServerInfo] | None = PrivateAttr(default=None)

    def __init__(self, small_url: str | None = None, target_url: str | None = None,
                 **kwargs: Any) -> None:
        # The URLs may come positionally; left out, the settings read the environment.
        if small_url is not None:
            kwargs["small_url"] = small_url
        if target_url is not None:
            kwargs["target_url"] = target_url
        super().__init__(**kwargs)

    @classmethod
    def from_thinker(cls, thinker: SpeculativeThinker, **kwargs: Any) -> SpeculativeThinkingLLM:
        """Wrap a ready ``SpeculativeThinker`` (any backends, e.g. in-process ones for tests).

        The URLs are taken from its backends; connection settings (``backend``, ``timeout``,
        ``max_retries``, templates, ``rules``) are the thinker's own.
        """
        kwargs.setdefault("small_url", thinker.small.url)
        kwargs.setdefault("target_url", thinker.target.url)
        kwargs.setdefault("rules", thinker.rules)
        kwargs.setdefault("on_target_error", thinker.on_target_error)
        for name in ("small_template", "target_template"):
            spec = getattr(thinker, name)
            if isinstance(spec, str):
                kwargs.setdefault(name, spec)
        llm = cls(**kwargs)
        llm._thinker = thinker
        return llm

    @classmethod
    def class_name(cls) -> str:
        return "SpeculativeThinkingLLM"

    # ---- the engine ----------------------------------------------------------------------

    @property
    def thinker(self) -> SpeculativeThinker:
        """The engine, built on first use (no connection is opened before a request)."""
        key = self.pair_key()
        if self._thinker is None or (self._thinker_key is not None and self._thinker_key != key):
            # A copy made with model_copy(update=...) shares private state: rebuild when the
            # servers or connection settings differ from the ones the engine was built with.
            backends = self.build_backends()
            thinker = self.build(backends=backends)
            # The sync methods' connections live on the library's loop thread, which outlives
            # this object: close them there once the engine is garbage.
            weakref.finalize(thinker, close_on_sync_loop, *backends)
            self._thinker, self._thinker_key = thinker, key
            self._infos = None
        return self._thinker

    async def aclose(self) -> None:
        """Close the HTTP connections the backends opened (those of other running event loops,
        such as the one behind the sync methods, are closed by their own loops)."""
        if self._thinker is not None:
            await self._thinker.aclose()

    def close(self) -> None:
        """Close the HTTP connections the backends opened, from synchronous code."""
        if self._thinker is not None:
            run_sync(self._thinker.aclose())

    # ---- metadata ------------------------------------------------------------------------

    @property
    def metadata(self) -> LLMMetadata:
        """What LlamaIndex plans prompts with; a default until the servers' ``/info`` is in
        (``await afetch_metadata()``, or any call, fetches it)."""
        infos = self._infos or self._learnt_infos()
        window = self.context_window or _context_window(infos) or DEFAULT_CONTEXT_WINDOW
        if infos is None:
            names = (self.small_model or self.small_url, self.target_model or self.target_url)
        else:
            names = (infos[0].model_id, infos[1].model_id)
        return LLMMetadata(
            context_window=window,
            # A reasoning model needs room to think: half the window unless max_tokens says.
            num_output=self.max_tokens or min(DEFAULT_MAX_NEW_TOKENS, window // 2),
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=f"{names[0]} + {names[1]}",
        )

    def _learnt_infos(self) -> tuple[ServerInfo, ServerInfo] | None:
        """What the engine's calls learnt of both servers (no request is made here)."""
        if self._thinker is None or (self._thinker_key is not None
                                     and self._thinker_key != self.pair_key()):
            return None  # settings changed since: the next call's engine will ask again
        learnt = self._thinker.server_info
        if "small" not in learnt or "target" not in learnt:
            return None
        return learnt["small"], learnt["target"]

    async def afetch_metadata(self) -> LLMMetadata:
        """Ask both servers for ``/info`` (once; the backends' timeouts and auth apply)."""
        await self._aprepare()
        return self.metadata

    def fetch_metadata(self) -> LLMMetadata:
        """``afetch_metadata`` for synchronous code (call it before building a query engine,
        which sizes its prompts from ``metadata`` once)."""
        self._prepare()
        return self.metadata

    async def _aprepare(self) -> None:
        """Fetch the servers' limits for ``metadata``, once. Calls never wait for it: whether
        the output starts in the reasoning comes with the engine's stream."""
        if self._infos is not None:
            return
        thinker = self.thinker
        small, target = await _all_or_none(thinker.small.info(), thinker.target.info())
        self._infos = (small, target)

    def _prepare(self) -> None:
        if self._infos is None:
            run_sync(self._aprepare())

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` from the small model's server (its ``/tokenize``), e.g. for
        ``Settings.tokenizer = llm.get_token_ids`` and LlamaIndex's token counting."""
        return run_sync(self.thinker.small.tokenize(text))

    # ---- per-call parameters -------------------------------------------------------------

    def _request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatRequest:
        """The one request of this call, checked once before any request is sent (so a stream
        fails when it is asked for, not at its first item)."""
        unknown = sorted(set(kwargs) - _CALL_PARAMS)
        if unknown:
            raise ConfigError(f"SpeculativeThinkingLLM got unknown arguments {unknown}; it "
                              f"accepts {sorted(_CALL_PARAMS)}")
        temperature = kwargs.get("temperature", self.temperature)
        sampling = SamplingParams(
            temperature=temperature or None,
            top_p=kwargs.get("top_p", self.top_p),
            top_k=kwargs.get("top_k", self.top_k),
            seed=kwargs.get("seed", self.seed))
        tools = kwargs.get("tools")
        if tools:
            tools = [t if isinstance(t, dict) else openai_tools([t])[0] for t in tools]
        return ChatRequest.build(
            to_engine_messages(messages), tools=tools or None,
            tool_choice=kwargs.get("tool_choice") if tools else None,
            stop=kwargs.get("stop", self.stop),
            max_new_tokens=kwargs.get("max_tokens", kwargs.get("max_new_tokens",
                                                               self.max_tokens)),
            sampling=sampling,
            # The routing key: a router keeps the conversation on its warm replica.
            session_id=kwargs.get("session_id"), template_kwargs=kwargs.get("template_kwargs"))

    def _finish_response(self, response: ChatResponse, request: ChatRequest) -> ChatResponse:
        if request.tool_names is not None:
            response.additional_kwargs[TOOLS_OFFERED_KEY] = list(request.tool_names)
        return response

    # ---- chat: async on the engine, sync through its sync edge ----------------------------

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._achat(messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage],
                           **kwargs: Any) -> ChatResponseAsyncGen:
        return await self._astream_chat(messages, **kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, **kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, **kwargs)

    async def _achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._request(messages, kwargs)
        result = await self.thinker.agenerate(request)
        response = response_from_result(result)
        return self._finish_response(response, request)

    async def _astream_chat(self, messages: Sequence[ChatMessage],
                            **kwargs: Any) -> ChatResponseAsyncGen:
        request = self._request(messages, kwargs)
        assembler = ChatStreamAssembler()
        events = self.thinker.astream(request)

        async def gen() -> ChatResponseAsyncGen:
            try:
                async for event in events:
                    if (response := assembler.feed(event)) is not None:
                        yield self._finish_response(response, request)
            finally:
                # Leaving early (break, cancellation) closes both servers' streams at once.
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()

        return gen()

    def _chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._request(messages, kwargs)
        result = self.thinker.generate(request)
        response = response_from_result(result)
        return self._finish_response(response, request)

    def _stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request = self._request(messages, kwargs)
        assembler = ChatStreamAssembler()
        events = self.thinker.stream(request)

        def gen() -> ChatResponseGen:
            try:
                for event in events:
                    if (response := assembler.feed(event)) is not None:
                        yield self._finish_response(response, request)
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()

        return gen()

    # ---- completion: derived from chat ---------------------------------------------------

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponse:
        response: CompletionResponse = await achat_to_completion_decorator(self._achat)(
            prompt, **kwargs)
        return response

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        stream: CompletionResponseAsyncGen = await astream_chat_to_completion_decorator(
            self._astream_chat)(prompt, **kwargs)
        return stream

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False,
                 **kwargs: Any) -> CompletionResponse:
        response: CompletionResponse = chat_to_completion_decorator(self._chat)(prompt, **kwargs)
        return response

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponseGen:
        stream: CompletionResponseGen = stream_chat_to_completion_decorator(self._stream_chat)(
            prompt, **kwargs)
        return stream

    # ---- tools ---------------------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])  # the caller's history is not ours to append to
        if isinstance(user_msg, str):
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg))
        elif user_msg is not None:
            messages.append(user_msg)
        specs = openai_tools(tools)
        return {
            "messages": messages,
            "tools": specs or None,
            "tool_choice": resolve_tool_choice(tool_choice, tool_required) if specs else None,
            **kwargs,
        }

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        if not allow_parallel_tool_calls:
            blocks = response.message.blocks
            calls = [block for block in blocks if isinstance(block, ToolCallBlock)]
            for extra in calls[1:]:
                blocks.remove(extra)
        return response

    def get_tool_calls_from_response(
        self,
        response: ChatResponse,
        error_on_no_tool_call: bool = True,
        **kwargs: Any,
    ) -> list[ToolSelection]:
        """The tool calls of a response (``ToolCallBlock``s); JSON-string arguments are
        parsed. With ``error_on_no_tool_call`` an answer without one raises
        ``NoToolCallError`` (a ``ValueError``) naming the tools that were offered."""
        return tool_selections(response, error_on_no_tool_call=error_on_no_tool_call)


def _context_window(infos: tuple[ServerInfo, ServerInfo] | None) -> int | None:
    # Each takeover resends prompt + accepted text as input, so the whole conversation must
    # fit the smaller max_input_tokens, not just the prompt.
    if infos is None:
        return None
    limits = [info.max_input_tokens or info.max_total_tokens for info in infos]
    known = [limit for limit in limits if limit]
    return min(known) if known else None


async def _all_or_none(*awaitables: Coroutine[Any, Any, Any]) -> list[Any]:
    """Await all; on the first failure cancel the rest and raise that failure as is.

    ``asyncio.gather`` would leave the others running (a request to the healthy server
    outliving the call), and a TaskGroup would wrap the error in an ExceptionGroup.
    """
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
    return [task.result() for task in tasks]
