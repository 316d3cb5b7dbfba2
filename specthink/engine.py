"""The speculative-thinking engine: one async state machine driving two backends.

The small model writes from ``prompt + text_so_far``. Every token either model writes is reported
to the answer's :class:`~specthink.rules.TakeoverPolicy`, which decides everything: hold a probe
back, release it, hand over to the target (the small model's stream is closed at once, so the
server cancels the generation), extend, intervene, hand back. This module only carries those
actions out: it opens and closes streams, resumes dropped ones, accounts tokens and the budget,
applies stop sequences, and yields events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from ._constants import ROLES, Role
from .accepted import AcceptedText
from .backends.base import Backend, RequestKind, SamplingParams, ServerInfo, StreamToken
from .errors import (
    BackendError,
    ConfigError,
    ContextLimitError,
    PromptTooLongError,
    StreamDroppedError,
    TargetFallbackWarning,
    redact_url,
)
from .formats import THINK_HERMES, OutputFormat, held_back
from .request import ChatRequest
from .rules import (
    ACCEPT,
    HOLD,
    Extend,
    Handover,
    Intervene,
    Release,
    SmallAction,
    TakeoverPolicy,
    TakeoverRules,
    TargetAction,
    resolve_rules,
)
from .sync import _LoopThread, run_sync
from .trace import (
    Event,
    FallbackEvent,
    FinishEvent,
    Result,
    Rule,
    Source,
    StartEvent,
    Statistics,
    TakeoverEvent,
    TextEvent,
)

__all__ = ["SpeculativeThinker"]

if TYPE_CHECKING:
    from . import prompts

TargetErrorPolicy = Literal["fallback", "raise"]
T = TypeVar("T")
A = TypeVar("A")
"""The policy's answers to one role's tokens."""

CONTEXT_MARGIN_TOKENS = 8
"""Slack for re-tokenising accepted text, which may take a few more tokens than were generated."""
_WARM_UP_MESSAGES = ({"role": "user", "content": "Hello"},)
"""The conversation ``warm_up`` prepares (it is never sent for generation)."""


@dataclass(slots=True)
class _Run:
    """The state of one request: accepted text, budget, the policy and statistics."""

    prompts: dict[Role, str]
    budget_left: int
    stop: tuple[str, ...]
    sampling: SamplingParams
    policy: TakeoverPolicy
    """Every takeover decision of this request, and the rules' counters."""
    stats: Statistics = field(default_factory=Statistics)
    prompt_tokens: dict[Role, int] = field(default_factory=lambda: {"small": 0, "target": 0})
    """An upper bound of each prompt's tokens (its UTF-8 length), or the exact count."""
    exact_prompt_tokens: dict[Role, int] = field(default_factory=dict)
    """Prompt tokens as the server counted them, where it was asked."""
    reports_prompt_tokens: bool = False
    """The open small stream is the conversation's first: its prompt is the prompt alone, so
    the count the server reports at its end is the call's ``input_tokens``."""
    total_limits: dict[Role, int] = field(default_factory=dict)
    """Each server's max_total_tokens (prompt + generated), where it said."""
    accepted: AcceptedText = field(init=False)
    """The accepted text (``text``, ``length``, ``recent`` read it)."""
    emitted: int = 0
    """Characters of ``text`` already yielded; the rest may be the start of a stop sequence."""
    unemitted: list[TextEvent] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    model_ids: dict[str, str] = field(default_factory=dict)
    starts_in_reasoning: bool = False
    """The small prompt opened the reasoning and no grammar constrains the output."""
    routing_key: str = ""
    """Sent with every generation request of this call (``routing_headers``)."""
    request: ChatRequest | None = None
    """The call's checked request (``None`` for ``warm_up``'s preparation only)."""
    prepare_target: Callable[[], Awaitable[None]] | None = None
    """The target's prompt and limits, not started yet: the small model's first token starts
    them (``SpeculativeThinker._start_target_preparation``), or the first handoff."""
    target_preparation: asyncio.Future[None] | None = None
    """The target's preparation once started, beside the small model's stream."""
    reasoning: bool | None = None
    """Inside a reasoning section: the prompt or the text opened ``<think>`` and it has not
    closed yet (``None`` until the first accepted text tells)."""
    undecided_tokens: int = 0
    """Tokens accepted while ``reasoning`` is still ``None`` (the text so far may still
    become the opening tag): counted as reasoning if it does."""
    call_opener: str = ""
    """A tool call the caller requires (``tool_choice``), not begun yet: the engine writes this
    opener as soon as the reasoning ends (at the answer's first token when there is none)."""
    call_after_reasoning: str = ""
    """What the format writes between the reasoning's end and a call (``CallOpener``)."""
    call_closable: bool = False
    """The opened call goes on as Hermes JSON: the engine closes it when the model stopped
    right after its arguments (a grammar ends there)."""
    reopen: bool = False
    """The engine wrote into the text (the call opener): the open stream must be asked again
    from the new text."""
    call_at: int = -1
    """Where the call the engine opened begins in the text, its opener (-1: none)."""
    call_grammars: dict[Role, dict[str, Any] | None] = field(default_factory=dict)
    """Per server, the grammar for the rest of the opened call (``backend.call_grammar``)."""
    done: bool = False

    def __post_init__(self) -> None:
        longest = max((len(s) for s in self.stop), default=0)
        # All a stop sequence or the end of the reasoning can still complete in.
        self.accepted = AcceptedText(
            max(longest, len(self.policy.output_format.reasoning.close)) - 1)

    @property
    def text(self) -> str:
        return self.accepted.text

    @property
    def length(self) -> int:
        return self.accepted.length

    def finish(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.stats.finish_reason = reason


class _Part(ABC, Generic[A]):
    """One model's part of the answer, from one policy decision to the next: what differs
    between the two roles, chosen once per part, so that one token loop
    (``SpeculativeThinker._stream``) serves both. The part lasts while the policy's
    ``handover`` is still this part's (``None``: the small model's part)."""

    __slots__ = ("decide", "engine", "handover", "resumes", "rule", "run")
    role: ClassVar[Role]

    def __init__(self, engine: SpeculativeThinker, run: _Run, handover: Handover | None,
                 decide: Callable[[str], A]) -> None:
        self.engine = engine
        self.run = run
        self.handover = handover
        self.decide = decide
        """The policy's method that answers a token of this role."""
        self.rule: Rule | None = None if handover is None else handover.rule
        """The rule the accepted tokens are written under."""
        self.resumes = 0
        """Streams of this part resumed after a drop (``SpeculativeThinker._broken``)."""

    @abstractmethod
    def wanted(self) -> int:
        """Tokens the part's next request asks for (before the server's limits)."""

    @abstractmethod
    def answer(self, action: A, text: str) -> Sequence[Event]:
        """Carry out the policy's answer to ``text`` other than ``ACCEPT`` and ``HOLD``."""

    def restarted(self) -> None:
        """The part's stream is asked again from the accepted text (it broke, or the engine
        wrote into the text)."""

    def ended(self) -> Sequence[Event]:
        """The stream ended by itself, the part goes on."""
        return ()

    def failed(self, exc: BackendError) -> Sequence[Event]:
        """The stream failed: the small model's failure is the call's."""
        raise exc


class _SmallPart(_Part[SmallAction]):
    __slots__ = ()
    role = "small"

    def __init__(self, engine: SpeculativeThinker, run: _Run) -> None:
        super().__init__(engine, run, None, run.policy.small_token)

    def wanted(self) -> int:
        return self.run.budget_left

    def answer(self, action: SmallAction, text: str) -> Sequence[Event]:
        # a release of held text, then maybe a takeover (the policy's ``handover`` then)
        return self.engine._release(self.run, action)

    def restarted(self) -> None:
        self.run.policy.small_dropped()  # held tokens go back to the earliest open window

    def ended(self) -> Sequence[Event]:
        # open windows close with what they hold
        return self.engine._release(self.run, self.run.policy.small_ended())


class _TargetPart(_Part[TargetAction]):
    __slots__ = ()
    role = "target"

    def __init__(self, engine: SpeculativeThinker, run: _Run, handover: Handover) -> None:
        # one request serves the first ``handover.tokens`` and a rule-2 extension
        super().__init__(engine, run, handover, run.policy.target_token)

    def wanted(self) -> int:
        return min(self.run.policy.target_left, self.run.budget_left)

    def answer(self, action: TargetAction, text: str) -> Sequence[Event]:
        # the token is accepted whatever the answer: HAND_BACK after it, or Extend
        run, engine = self.run, self.engine
        events: list[Event] = [*engine._accept(run, "target", text, self.rule, 1)]
        if isinstance(action, Extend) and not run.done:
            self.rule = action.rule
            events.append(engine._note_takeover(run, action.rule, 0))
        return events

    def failed(self, exc: BackendError) -> Sequence[Event]:
        return (self.engine._target_failed(self.run, exc),)


class SpeculativeThinker:
    """Speculative Thinking over two text-generation servers.

    >>> thinker = SpeculativeThinker(small=TGIBackend(small_url), target=TGIBackend(target_url))
    >>> result = await thinker.agenerate([{"role": "user", "content": "What is 7 * 8?"}])
    >>> result.text, result.stats.target_share

    ``astream`` yields :class:`TextEvent` as text is accepted (a probe that may be thrown away is
    never yielded), :class:`TakeoverEvent` when a takeover is decided, :class:`FallbackEvent` when
    the target failed, and last a :class:`FinishEvent` carrying the :class:`Result`.
    """

    def __init__(
        self,
        small: Backend,
        target: Backend,
        *,
        rules: TakeoverRules | str = "paper",
        small_template: Any = "auto",
        target_template: Any = "auto",
        on_target_error: TargetErrorPolicy = "fallback",
        max_stream_resumes: int = 2,
        check_prompt_length: bool = True,
        output_format: OutputFormat = THINK_HERMES,
        small_template_kwargs: Mapping[str, Any] | None = None,
        target_template_kwargs: Mapping[str, Any] | None = None,
        on_request: Callable[[Role, int, RequestKind], None] | None = None,
    ) -> None:
        if on_target_error not in ("fallback", "raise"):
            raise ConfigError(
                f"on_target_error must be 'fallback' or 'raise', got {on_target_error!r}")
        if max_stream_resumes < 0:
            raise ConfigError(f"max_stream_resumes must be >= 0, got {max_stream_resumes}")
        self.small = small
        self.target = target
        self.rules = resolve_rules(rules)
        from . import prompts  # imported late: prompts pulls in jinja2

        self.small_template = small_template
        self.target_template = target_template
        # Resolved once: a bad template name or file fails here, before any request.
        # Template kwargs (``{"enable_thinking": True}``) reach the chat template wherever it
        # is rendered: a client-side template's variables, a server's chat_template_kwargs.
        self._templates: dict[Role, prompts.ChatTemplate] = {
            "small": prompts.resolve_template(small_template, "small").with_template_kwargs(
                small_template_kwargs),
            "target": prompts.resolve_template(target_template, "target").with_template_kwargs(
                target_template_kwargs)}
        self.on_target_error: TargetErrorPolicy = on_target_error
        self.max_stream_resumes = max_stream_resumes
        self.check_prompt_length = check_prompt_length
        self.output_format = output_format
        """How the models mark reasoning and tool calls (the rules' ``thinking_end`` may move
        the end of the reasoning)."""
        self._intervention_tokens: dict[str, int] = {}
        """Tokens of each intervention text (rules may differ per call), counted once."""
        self._on_request: Callable[[Role, int, RequestKind], None] | None = None
        self.on_request = on_request
        self._server_info: dict[Role, ServerInfo] = {}
        self._target_checked = False
        """The target's template and limits were checked once; later calls prepare its prompt
        beside the small model's first stream."""

    def __repr__(self) -> str:
        return (f"SpeculativeThinker(small={self.small!r}, target={self.target!r}, "
                f"on_target_error={self.on_target_error!r})")

    @property
    def templates(self) -> dict[Role, prompts.ChatTemplate]:
        """The resolved templates; what ``auto`` learns of a server lives in them, so engines
        over the same backends share it by sharing these."""
        return dict(self._templates)

    @property
    def on_request(self) -> Callable[[Role, int, RequestKind], None] | None:
        """Called with the role, the attempt number (1, 2, ...) and the kind of every upstream
        request as it is sent, retries included, whether the call then succeeds or not
        (``serve``'s metrics; ``Statistics.requests`` only reaches callers whose call
        finished): ``"generation"`` for the streams, ``"auxiliary"`` for what a backend asks
        besides them (``/info``, tokenizers, chat-template endpoints), including the requests
        of another engine over the same backend objects. Setting it hands the auxiliary
        attempts' reporting to backends that offer it (``observe_auxiliary_attempts``)."""
        return self._on_request

    @on_request.setter
    def on_request(self, observer: Callable[[Role, int, RequestKind], None] | None) -> None:
        installed, self._on_request = self._on_request, observer
        if observer is None and installed is None:
            return  # an engine without one leaves another's over the same backends alone
        for role, backend in self.backends.items():
            observe = getattr(backend, "observe_auxiliary_attempts", None)
            if observe is not None:
                observe(None if observer is None else _auxiliary_observer(observer, role))

    @property
    def backends(self) -> dict[Role, Backend]:
        return {"small": self.small, "target": self.target}

    @property
    def server_info(self) -> dict[Role, ServerInfo]:
        """What each server said about itself (model id, limits) when a call or ``warm_up``
        last asked; empty before. Adapters describe the model with it without a request."""
        return dict(self._server_info)

    async def aclose(self) -> None:
        """Close both backends' HTTP clients (the ones they opened themselves)."""
        await asyncio.gather(self.small.aclose(), self.target.aclose())

    # ---- public API ----------------------------------------------------------------------

    async def agenerate(self, request: ChatRequest | Sequence[dict[str, Any]],
                        **params: Any) -> Result:
        """Run the whole loop and return the accepted text, the events and the statistics."""
        async for event in self.astream(request, **params):
            if isinstance(event, FinishEvent):
                return event.result
        raise AssertionError("astream ended without a FinishEvent")  # pragma: no cover

    async def astream(self, request: ChatRequest | Sequence[dict[str, Any]],
                      **params: Any) -> AsyncIterator[Event]:
        """Stream events as text is accepted; the last event is a :class:`FinishEvent`.

        ``request`` is a :class:`~specthink.request.ChatRequest` (checked once where it was
        built; nothing is validated again here), or the messages, with ``ChatRequest.build``'s
        keyword arguments in ``params`` (``max_new_tokens``, ``stop``, ``sampling``, ``tools``,
        ``tool_choice``, ``parallel_tool_calls``, ``response_format``, ``session_id``,
        ``rules``, ``template_kwargs``) as a convenience that builds it. ``session_id`` (the
        caller's conversation or user session) is the routing key sent with every generation
        request of the call, so a router keeps the conversation on the replica that holds its
        prefix; without one, each call gets a fresh random key.
        """
        checked = self.request(request, **params)
        run = await self._prepare(checked)
        output_format = run.policy.output_format
        # Yielded with the first event the loop produces, so a call that fails before it
        # writes anything yields nothing at all.
        start: StartEvent | None = StartEvent(
            starts_in_reasoning=run.starts_in_reasoning, output_format=output_format,
            routing_key=run.routing_key, tool_names=checked.tool_names,
            max_tool_calls=checked.max_tool_calls, tool_schemas=_counted_tools(checked))
        for early in tuple(run.events):  # a target found down before the first request
            if start is not None:
                yield start
                start = None
            yield early
        try:
            async with aclosing(self._drive(run)) as stream:
                async for event in stream:
                    if start is not None:
                        yield start
                        start = None
                    yield event
        finally:
            self._end_preparation(run)
        if start is not None:
            yield start
        models = {role: run.model_ids.get(role) or redact_url(self.backends[role].url)
                  for role in ("small", "target")}
        result = Result(text=run.text, events=tuple(run.events), stats=run.stats,
                        starts_in_reasoning=run.starts_in_reasoning,
                        output_format=output_format, models=models,
                        tool_names=checked.tool_names, max_tool_calls=checked.max_tool_calls,
                        tool_schemas=_counted_tools(checked))
        yield FinishEvent(result)

    def request(self, request: ChatRequest | Sequence[dict[str, Any]],
                **params: Any) -> ChatRequest:
        """``request`` as it is, or a :class:`ChatRequest` built from the messages and
        ``params`` (dict rules override this engine's). A bad field is a ``ConfigError``."""
        if isinstance(request, ChatRequest):
            if params:
                raise ConfigError(f"a ChatRequest carries its own parameters; got "
                                  f"{sorted(params)} beside it")
            return request
        params.setdefault("base_rules", self.rules)
        return ChatRequest.build(request, **params)

    def generate(self, request: ChatRequest | Sequence[dict[str, Any]],
                 **params: Any) -> Result:
        """Blocking ``agenerate``; works where an event loop already runs (notebooks)."""
        return run_sync(self.agenerate(request, **params))

    def stream(self, request: ChatRequest | Sequence[dict[str, Any]],
               **params: Any) -> Iterator[Event]:
        """Blocking ``astream``; leaving the loop early cancels the request and closes streams."""
        return _LoopThread.get().iterate(self.astream(request, **params))

    # ---- preparation: everything that can fail before a generation request -----------------

    async def _prepare(self, request: ChatRequest) -> _Run:
        sampling = request.sampling
        if (template := self.output_format.template) is not None:
            # A format read by a response template may be marked by special tokens: the
            # servers keep them as text (told which ones where a server keeps only those it is
            # told: llama.cpp's preserved_tokens).
            sampling = dataclasses.replace(sampling, keep_special_tokens=True,
                                           marker_tokens=template.marker_tokens)
        if request.grammar is not None and self.small.supports_grammar \
                and self.target.supports_grammar:
            sampling = dataclasses.replace(sampling, grammar=request.grammar)
        # A grammar restarts with every request, so a handoff inside constrained output would
        # break it: constrained answers are written by the small model alone.
        policy = TakeoverPolicy(request.rules or self.rules, handoffs=sampling.grammar is None,
                                output_format=self.output_format)
        run = _Run(prompts={"small": "", "target": ""}, budget_left=request.max_new_tokens,
                   stop=request.stop, sampling=sampling, policy=policy,
                   routing_key=request.session_id or uuid.uuid4().hex, request=request)

        async def prepare_role(role: Role) -> None:
            await self._prepare_role(run, role, request)

        if self._target_checked:
            # Off the critical path: the small model's first request needs only its own
            # prompt; the target's is awaited at the first handoff (``_target_prepared``).
            await prepare_role("small")
            # Started once the small model's first token has been handled (its text given to
            # the caller), not now: under a burst, every conversation's target render (its
            # CPU, and a request for a server-rendered template) would otherwise run between
            # the small models' requests being built and their connections being written to,
            # and again beside their first tokens. No takeover is decided before that token.
            run.prepare_target = functools.partial(prepare_role, "target")
        else:
            # The first call checks the target's configuration (its template, its limits)
            # before any generation request, side by side with the small model's.
            small_ready, target_ready = await asyncio.gather(
                prepare_role("small"), prepare_role("target"), return_exceptions=True)
            for outcome in (small_ready, target_ready):
                if isinstance(outcome, BaseException) and not isinstance(outcome, BackendError):
                    raise outcome
            if isinstance(small_ready, BaseException):
                raise small_ready
            if isinstance(target_ready, BackendError):
                # the target is unreachable before we start: the policy decides, as mid-answer
                self._target_failed(run, target_ready)
            else:
                self._target_checked = True
        # The one decision about the reasoning, from the prompt actually sent; a grammar makes
        # the model write the constrained output at once.
        constrained = run.sampling.grammar is not None and self.small.supports_grammar
        run.starts_in_reasoning = (not constrained
                                   and policy.output_format.opened_by(run.prompts["small"]))
        await self._require_call(run, request)
        return run

    async def _require_call(self, run: _Run, request: ChatRequest) -> None:
        """A call ``tool_choice`` requires: a text model only reads the instruction, so the
        engine writes the call's opener itself, as the format's model writes it
        (``OutputFormat.call_opener``), and a server's grammar (where it takes one and it fits
        the format) keeps the rest JSON."""
        from . import prompts

        required, name = prompts.required_call(request.tool_choice, request.tools)
        if not required:
            return
        output_format = run.policy.output_format
        opener = output_format.call_opener
        if opener is None:
            # A response template that says nothing of how its calls begin (one handed over,
            # not a built-in): refused rather than left to the model's goodwill.
            raise ConfigError(
                f"tool_choice {request.tool_choice!r} cannot be enforced for the "
                f"{output_format.name!r} output format: its response template declares no "
                "specthink.call_opener (the built-ins do); use tool_choice 'auto'",
                field="tool_choice")
        run.call_opener = opener.text(name)
        run.call_after_reasoning = opener.after_reasoning
        run.call_closable = opener.hermes_json
        if not opener.hermes_json:
            # The servers' call grammars describe Hermes JSON (an arguments object, or a name
            # then '", "arguments": ' and one): they do not fit harmony's, XML, Gemma's or
            # DeepSeek's call bodies, whose closing text a grammar would also forbid. None is
            # sent; the model writes the rest of the call unconstrained.
            return
        roles = ROLES
        tools = request.tools or []
        grammars = await asyncio.gather(*(self.backends[role].call_grammar(tools, name)
                                          for role in roles), return_exceptions=True)
        for role, grammar in zip(roles, grammars, strict=True):
            if isinstance(grammar, BaseException) and not isinstance(grammar, BackendError):
                raise grammar
            run.call_grammars[role] = None if isinstance(grammar, BaseException) else grammar

    async def _prepare_role(self, run: _Run, role: Role, request: ChatRequest) -> None:
        """The prompt for ``role`` and a check of it against the server's limits."""
        from . import prompts

        backend = self.backends[role]
        try:
            # A server that cannot keep the format's special tokens says so before any
            # generation request (llama-cpp-python's), rather than fusing what they mark.
            check = getattr(backend, "check_keeps", None)
            template = self.output_format.template
            if check is not None and template is not None:
                await check(template.required_markers)
            chat = self._templates[role].with_template_kwargs(request.template_kwargs)
            run.prompts[role] = await prompts.render_prompt(
                chat, request.prompt_messages, request.prompt_tools, backend,
                tool_choice=request.tool_choice, tool_choice_applied=True)
            if self.check_prompt_length:
                await self._check_limits(run, role, len(run.stop))
        except BackendError as exc:
            _with_role(exc, role)  # the preparation's boundary (generation: _TimedStream)
            raise

    async def warm_up(self) -> None:
        """Ask now what the first call would ask before its first token: both servers' limits
        and model ids, and (with ``auto``) their templates, learnt from their renderings. A
        server (``specthink serve``) calls it at start so its first user waits no longer than
        any later one. Raises the ``BackendError`` of a server that cannot answer, or the
        ``ConfigError`` of a template that cannot be used; the first call then checks again."""
        request = ChatRequest.build(_WARM_UP_MESSAGES, max_new_tokens=1)
        run = _Run(prompts={"small": "", "target": ""}, budget_left=1, stop=(),
                   sampling=SamplingParams(), policy=TakeoverPolicy(self.rules),
                   routing_key=uuid.uuid4().hex, request=request)
        await asyncio.gather(*(self._prepare_role(run, role, request)
                               for role in ("small", "target")))
        self._target_checked = True

    async def _target_prepared(self, run: _Run) -> FallbackEvent | None:
        """Wait for the target's prompt and limits before its first request. A target that
        cannot serve is the ``on_target_error`` policy's business: the returned event says the
        small model goes on alone (the policy then hands no more over)."""
        self._start_target_preparation(run)  # a handoff before the small model's first token
        preparation, run.target_preparation = run.target_preparation, None
        if preparation is None:
            return None
        try:
            await preparation
        except BackendError as exc:
            return self._target_failed(run, exc)
        except ConfigError as exc:
            # e.g. a prompt too long for the target alone: it cannot take over in this call
            if self.on_target_error == "raise":
                raise
            return self._target_failed(run, BackendError(
                f"the target cannot take over in this conversation: {exc}",
                url=self.target.url, role="target"))
        return None

    @staticmethod
    def _start_target_preparation(run: _Run) -> None:
        prepare, run.prepare_target = run.prepare_target, None
        if prepare is not None:
            run.target_preparation = asyncio.ensure_future(prepare())

    @staticmethod
    def _end_preparation(run: _Run) -> None:
        """A call that never handed over does not wait for the target's preparation."""
        run.prepare_target = None
        preparation, run.target_preparation = run.target_preparation, None
        if preparation is None:
            return
        if preparation.done():
            if not preparation.cancelled():
                preparation.exception()  # retrieved: nothing was waiting for it
        else:
            preparation.cancel()

    def _room(self, run: _Run, role: Role, wanted: int) -> int:
        """``wanted`` tokens, cut so that prompt + output fits the server's max_total_tokens
        (TGI answers 422 otherwise)."""
        limit = run.total_limits.get(role)
        if limit is None:
            return wanted
        used = run.prompt_tokens[role] + run.stats.output_tokens + CONTEXT_MARGIN_TOKENS
        return min(wanted, limit - used)

    async def _check_limits(self, run: _Run, role: Role, stop_count: int) -> None:
        prompt = run.prompts[role]
        backend = self.backends[role]
        info = await backend.info()
        self._server_info[role] = info
        run.model_ids[role] = info.model_id
        if info.max_stop_sequences is not None and stop_count > info.max_stop_sequences:
            raise ConfigError(
                f"{stop_count} stop sequences given, but the {role} server "
                f"{redact_url(backend.url)} allows at most {info.max_stop_sequences}")
        if info.max_input_tokens is None and info.max_total_tokens is None:
            return
        # A token covers at least one byte (byte-level BPE; special tokens cover several), so
        # the UTF-8 length bounds the token count. Only prompts near a limit are tokenised by
        # the server: most conversations need no extra request.
        length = len(prompt.encode())
        if (info.max_input_tokens is not None
                and length > info.max_input_tokens * MAX_BYTES_PER_TOKEN):
            # The other way round no count is needed either: whatever the tokenizer, a prompt
            # of this many bytes has more tokens than the server takes.
            raise PromptTooLongError(
                f"the prompt has {length} bytes, so at least "
                f"{-(-length // MAX_BYTES_PER_TOKEN)} tokens, more than the {role} server's "
                f"max_input_tokens={info.max_input_tokens} ({redact_url(backend.url)})")
        fits_input = info.max_input_tokens is None or length <= info.max_input_tokens
        fits_total = (info.max_total_tokens is None
                      or length + run.budget_left <= info.max_total_tokens)
        if not (fits_input and fits_total):
            length = await backend.count_tokens(prompt)
            run.exact_prompt_tokens[role] = length
        run.prompt_tokens[role] = length
        if info.max_total_tokens is not None:
            run.total_limits[role] = info.max_total_tokens
        if info.max_input_tokens is not None and length > info.max_input_tokens:
            raise PromptTooLongError(
                f"the prompt has {length} tokens, more than the {role} server's "
                f"max_input_tokens={info.max_input_tokens} ({redact_url(backend.url)})")

    # ---- the loop: carrying out the policy's actions ----------------------------------------

    async def _drive(self, run: _Run) -> AsyncGenerator[Event, None]:
        policy = run.policy
        policy.start()
        part: _Part[Any] = _SmallPart(self, run)
        while not run.done:
            # A part lasts while the policy's handover is still the one it carries out.
            handover = policy.handover
            if handover is part.handover:
                writes = self._stream(run, part)
            elif handover is None:  # handed back: the small model writes on
                part = _SmallPart(self, run)
                continue
            else:  # a takeover, which begins with its opening
                part = _TargetPart(self, run, handover)
                writes = self._opening(run, handover)
            async with aclosing(writes) as stream:
                async for event in stream:
                    yield event
        for piece in self._close_opened_call(run):
            yield piece
        if not run.stats.input_tokens:
            # The server reports prompt tokens on a stream's last token, which a takeover cuts
            # (and llama.cpp's server never sends them when streaming): one /tokenize then.
            # Never a resumed request's count (prompt plus accepted text), never a byte bound.
            run.stats.input_tokens = run.exact_prompt_tokens.get("small", 0)
            if not run.stats.input_tokens:
                with contextlib.suppress(BackendError):
                    run.stats.input_tokens = await self.small.count_tokens(run.prompts["small"])
        for event in self._flush(run):
            yield event

    async def _opening(self, run: _Run, handover: Handover) -> AsyncGenerator[Event, None]:
        """What a takeover begins with: its event, rule 3's intervention text, and the target's
        preparation (a target that cannot serve is ``on_target_error``'s: the policy has then
        handed back)."""
        yield self._note_takeover(run, handover.rule, handover.discard)
        if isinstance(handover, Intervene):
            for piece in await self._intervention(run, handover):
                yield piece
            if run.done:
                return
        if (fallback := await self._target_prepared(run)) is not None:
            yield fallback

    async def _stream(self, run: _Run, part: _Part[A]) -> AsyncGenerator[Event, None]:
        """One request of ``part``'s model, read until the policy ends the part, the call ends,
        or the stream does; the one token loop of both models.

        Per token it costs the role's ``decide`` (bound once, here) and, for the policy's rarer
        answers, the role's ``answer``; a generator per request, not per token.
        """
        role = part.role
        if (room := self._room_or_finish(run, role, part.wanted())) <= 0:
            return
        policy = run.policy
        handover = part.handover
        decide = part.decide
        answer = part.answer
        accept = self._accept
        rule = part.rule
        received = 0
        finish_reason: str | None = None
        leaving = False
        events: Sequence[Event]
        try:
            async with self._open(role, run, room) as tokens:
                reports = run.reports_prompt_tokens
                async for token in tokens:
                    received += 1
                    finish_reason = token.finish_reason
                    if token.input_tokens and reports:
                        run.stats.input_tokens = token.input_tokens
                    if token.special:
                        continue
                    action = decide(token.text)
                    if action is ACCEPT:
                        events = accept(run, role, token.text, rule, 1)
                    elif action is HOLD:
                        events = ()
                    else:
                        events = answer(action, token.text)
                        rule = part.rule
                        leaving = policy.handover is not handover
                    for event in events:
                        yield event
                    if leaving or run.done or run.reopen:
                        break
                    if run.prepare_target is not None:
                        # The first token is handled (a probe may be open now): the target
                        # gets ready while the small model writes on.
                        self._start_target_preparation(run)
        except BackendError as exc:
            for event in self._broken(run, part, exc):
                yield event
            return
        if run.done or policy.handover is not handover:
            return
        if run.reopen:
            # The engine wrote into the text (a required call's opener): the part's next
            # request starts from it, the small model's held tokens asked again after it.
            run.reopen = False
            part.restarted()
            return
        for event in part.ended():
            yield event
        if run.done or policy.handover is not handover:
            return
        if run.reopen:
            run.reopen = False  # the held end of the reasoning: the call follows
            return
        self._stream_ended(run, finish_reason, received)

    # ---- what both models' writes share: room, resumes, the end of a stream ---------------

    def _room_or_finish(self, run: _Run, role: Role, wanted: int) -> int:
        """The tokens the next ``role`` request may ask for; none left ends the call
        (``length``)."""
        room = self._room(run, role, wanted)
        if room <= 0:
            run.finish("length")
        return room

    def _broken(self, run: _Run, part: _Part[Any], exc: BackendError) -> Sequence[Event]:
        """A stream broke. One that dropped after its first token is resumed from the accepted
        text (``part``'s next request), at most ``max_stream_resumes`` times in a part; any
        other failure, or one drop too many, is the part's (``_Part.failed``). A server's
        refused length ends the call (``length``) once it has written text, and is the caller's
        error when the prompt alone does not fit."""
        if isinstance(exc, ContextLimitError):
            if not _context_filled(run):
                raise exc
            run.finish("length")
            return ()
        if isinstance(exc, StreamDroppedError) and part.resumes < self.max_stream_resumes:
            part.resumes += 1
            run.stats.resumed_streams[part.role] += 1
            part.restarted()
            return ()
        return part.failed(exc)

    @staticmethod
    def _stream_ended(run: _Run, finish_reason: str | None, received: int) -> None:
        """A stream ended by itself: the model's end (or nothing written) ends the call, and so
        does the budget; the server's own length limit before ours means ask again."""
        if finish_reason in ("eos", "stop") or received == 0:
            run.finish("stop")
        elif run.budget_left <= 0:
            run.finish("length")
        elif finish_reason not in ("length", None):
            run.finish("stop")

    def _release(self, run: _Run, action: SmallAction) -> list[TextEvent]:
        """Accept the held text the policy released, up to its next decision (a handover is then
        the policy's ``handover``)."""
        events: list[TextEvent] = []
        while isinstance(action, Release):
            events.extend(self._accept(run, "small", action.text, None, action.tokens))
            if run.done or run.reopen:
                break
            action = action.then
        return events

    def _target_failed(self, run: _Run, exc: BackendError) -> FallbackEvent:
        """Apply ``on_target_error``: raise, or let the small model go on alone (``exc`` has
        its role from the boundary it crossed)."""
        if self.on_target_error == "raise":
            raise exc
        run.policy.target_failed()
        run.stats.fallback = True
        run.stats.fallback_error = str(exc)
        warnings.warn(f"target server failed, the small model continues alone: {exc}",
                      TargetFallbackWarning, stacklevel=3)
        fallback = FallbackEvent(offset=run.length, error=str(exc))
        run.events.append(fallback)
        return fallback

    async def _intervention(self, run: _Run, handover: Intervene) -> list[TextEvent]:
        """Rule 3's intervention text, accepted before the target's ``n3`` tokens (the policy
        has adapted its counters already)."""
        text = run.policy.rules.intervention_text
        tokens = self._intervention_tokens.get(text)
        if tokens is None:
            try:
                tokens = await self.target.count_tokens(text)
            except BackendError:
                tokens = max(1, len(text) // 4)
            self._intervention_tokens[text] = tokens
        return self._accept(run, "intervention", handover.text, handover.rule, tokens)

    def _note_takeover(self, run: _Run, rule: Rule, discarded: int) -> TakeoverEvent:
        run.stats.takeovers[rule.value] += 1
        run.stats.discarded_tokens += discarded
        event = TakeoverEvent(rule=rule, offset=run.length, discarded_tokens=discarded)
        run.events.append(event)
        return event

    # ---- accepting text: budget, stop sequences, reasoning ---------------------------------

    def _accept(self, run: _Run, source: Source, text: str, rule: Rule | None,
                tokens: int) -> list[TextEvent]:
        """Append accepted text; return what may be shown now.

        Text that could be the start of a caller's stop sequence is held until it is known not
        to be; a stop sequence cuts the text where it begins and ends the request.
        """
        if run.done or (not text and not tokens):
            return []
        stats = run.stats
        if source == "small":
            stats.small_tokens += tokens
        elif source == "target":
            stats.target_tokens += tokens
        else:
            stats.intervention_tokens += tokens
        run.budget_left -= tokens
        before = run.length
        recent = run.accepted.append(text)
        opener: list[TextEvent] = []
        if run.reasoning is None:
            run.reasoning = _opens_reasoning(run)
            if run.reasoning is None:  # only (part of) the opening tag so far
                run.undecided_tokens += tokens
            elif run.reasoning:
                stats.reasoning_tokens += run.undecided_tokens
            elif run.call_opener:
                # No reasoning first: the answer, so the call, begins here.
                run.accepted.truncate(before)
                text, opener = "", self._write_call_opener(run, "")
        if run.reasoning:
            stats.reasoning_tokens += tokens
            run.reasoning = run.policy.output_format.reasoning.close not in recent
            if not run.reasoning and run.call_opener:
                text, opener = self._open_required_call(run, before)
        pieces = [*([TextEvent(source, text, rule)] if text else []), *opener]
        if not run.stop:
            run.emitted = run.length
            run.events.extend(pieces)
            out = pieces
        else:
            run.unemitted.extend(pieces)
            out = self._emit_before_stops(run, before)
        if run.budget_left <= 0 and not run.done:
            run.finish("length")
            out.extend(self._flush(run))
        return out

    def _open_required_call(self, run: _Run, before: int) -> tuple[str, list[TextEvent]]:
        """The reasoning has just closed and a call is required: the answer is the call. The
        accepted text is cut right after the closing tag (what the model began to answer is
        dropped) and the opener follows; returns this piece's kept text and the opener."""
        text = run.text
        close = run.policy.output_format.reasoning.close
        end = text.index(close, max(0, before - run.accepted.keep)) + len(close)
        run.accepted.truncate(end)
        return text[before:end], self._write_call_opener(run, run.call_after_reasoning)

    @staticmethod
    def _write_call_opener(run: _Run, separator: str) -> list[TextEvent]:
        """Append the required call's opener (after ``separator``) to the accepted text; the
        open stream is then asked again from the new text (``run.reopen``)."""
        opener = separator + run.call_opener
        run.call_opener = ""
        run.reopen = True
        tokens = _estimate(opener)
        run.stats.intervention_tokens += tokens
        run.budget_left -= tokens
        run.call_at = run.length + len(separator)
        run.accepted.append(opener)
        return [TextEvent("intervention", opener, None)]

    def _close_opened_call(self, run: _Run) -> list[TextEvent]:
        """The model stopped right after the arguments of the Hermes JSON call the engine
        opened (a grammar ends there): close the call."""
        if run.call_at < 0 or not run.call_closable:
            return []
        text = run.text
        try:
            call = json.loads(text[text.index("{", run.call_at):] + "}")
        except ValueError:
            return []  # the model closed it (or left it broken: the caller sees the text)
        if not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
            return []
        closing = "}\n" + run.policy.output_format.tool_call.close
        run.accepted.append(closing)
        piece = TextEvent("intervention", closing, None)
        if run.stop:
            run.unemitted.append(piece)  # shown by the flush that ends the run
            return []
        run.emitted = run.length
        run.events.append(piece)
        return [piece]

    def _emit_before_stops(self, run: _Run, appended_at: int) -> list[TextEvent]:
        longest = max(len(s) for s in run.stop)
        recent = run.accepted.recent
        base = run.length - len(recent)  # where ``recent`` starts in the accepted text
        search_from = max(0, appended_at - longest + 1 - base)
        cut = min((at for s in run.stop if (at := recent.find(s, search_from)) >= 0),
                  default=-1)
        if cut >= 0:
            cut += base
            run.accepted.truncate(cut)
            run.finish("stop")
            return self._emit_until(run, cut)
        # ``recent`` holds at least the last ``longest - 1`` characters, all a stop sequence
        # can still begin in.
        return self._emit_until(run, run.length - held_back(recent, run.stop))

    def _emit_until(self, run: _Run, limit: int) -> list[TextEvent]:
        """Yield unemitted pieces up to character ``limit`` of the accepted text."""
        out: list[TextEvent] = []
        position = run.emitted
        while run.unemitted and position < limit:
            piece = run.unemitted[0]
            room = limit - position
            if len(piece.text) <= room:
                run.unemitted.pop(0)
                out.append(piece)
                position += len(piece.text)
            else:
                out.append(TextEvent(piece.source, piece.text[:room], piece.rule))
                run.unemitted[0] = TextEvent(piece.source, piece.text[room:], piece.rule)
                position = limit
        run.emitted = position
        run.events.extend(out)
        return out

    def _flush(self, run: _Run) -> list[TextEvent]:
        if not run.unemitted:
            return []
        return self._emit_until(run, run.length)

    # ---- requests ------------------------------------------------------------------------

    def _open(self, role: Role, run: _Run, max_new_tokens: int) -> _TimedStream:
        backend = self.backends[role]
        stats = run.stats

        observer = self._on_request

        def on_attempt(attempt: int) -> None:
            stats.requests[role] += 1
            if attempt > 1:
                stats.retries[role] += 1
            if observer is not None:
                observer(role, attempt, "generation")

        prompt = run.prompts[role] + run.text
        run.reopen = False  # a stream opened now starts from the text as it is
        # only the conversation's first small stream counts the prompt alone
        run.reports_prompt_tokens = (role == "small" and not run.length
                                     and not run.stats.input_tokens)
        sampling = run.sampling
        if sampling.grammar is not None and not backend.supports_grammar:
            sampling = dataclasses.replace(sampling, grammar=None)
        if run.call_at >= 0 and (grammar := run.call_grammars.get(role)) is not None:
            sampling = dataclasses.replace(sampling, grammar=grammar)  # the call's arguments

        def open_stream(tokens: int) -> AbstractAsyncContextManager[AsyncIterator[StreamToken]]:
            return backend.stream(prompt, max_new_tokens=max(1, tokens), sampling=sampling,
                                  on_attempt=on_attempt, routing_key=run.routing_key)

        async def with_fresh_limits() -> AbstractAsyncContextManager[AsyncIterator[StreamToken]]:
            # The server refused a length: its limits may have changed since /info was cached.
            await self._refresh_limits(run, role)
            room = self._room(run, role, max_new_tokens)
            if room <= 0:  # asking again would only be refused again
                what = ("the prompt and the text written so far fill" if _context_filled(run)
                        else "the prompt does not fit")
                raise ContextLimitError(f"{what} the {role} server's context of "
                                        f"{run.total_limits[role]} tokens", url=backend.url)
            return open_stream(room)

        return _TimedStream(open_stream(max_new_tokens), stats, role, with_fresh_limits)

    async def _refresh_limits(self, run: _Run, role: Role) -> None:
        info = await self.backends[role].info(refresh=True)  # inside the stream's boundary
        self._server_info[role] = info
        if info.max_total_tokens is not None:
            run.total_limits[role] = info.max_total_tokens
            if role not in run.exact_prompt_tokens:
                # A byte count bounds the prompt's tokens loosely: near a limit, ask.
                with contextlib.suppress(BackendError):
                    exact = await self.backends[role].count_tokens(run.prompts[role])
                    run.exact_prompt_tokens[role] = run.prompt_tokens[role] = exact
        else:
            run.total_limits.pop(role, None)


MAX_BYTES_PER_TOKEN = 1024
"""No token of a text covers more bytes than this, so a prompt has at least
``ceil(bytes / MAX_BYTES_PER_TOKEN)`` tokens. The longest ordinary token of 20 vocabularies
llama.cpp tests (GPT-2, Llama 2/3, Qwen2/3.5, Gemma 4, DeepSeek, Falcon, MPT, StarCoder,
Command R, ...) is 512 bytes (a run of spaces); twice that leaves room for vocabularies not
measured. A tighter lower bound does not exist without the tokenizer: one token per N bytes for
any N below the longest token is not guaranteed."""


def _estimate(text: str) -> int:
    """Tokens of text the engine writes itself, for the budget (no server counted them)."""
    return max(1, len(text) // 4)


def _context_filled(run: _Run) -> bool:
    """A server refused the length of a request that carried text written in this call: the
    conversation has filled its context, so the answer ends there (``length``)."""
    return run.stats.output_tokens > 0


def _opens_reasoning(run: _Run) -> bool | None:
    """Whether the output is reasoning from its start: the prompt opened it, or the text
    opens it; ``None`` while the text is only (a part of) the opening tag."""
    if run.starts_in_reasoning:
        return True
    opening = run.policy.output_format.reasoning.open
    head = run.text.lstrip()
    if head.startswith(opening):
        return True
    if not head or opening.startswith(head):
        return None
    return False


def _auxiliary_observer(observer: Callable[[Role, int, RequestKind], None],
                        role: Role) -> Callable[[int], None]:
    def on_attempt(attempt: int) -> None:
        observer(role, attempt, "auxiliary")

    return on_attempt


def _with_role(exc: BackendError, role: Role) -> None:
    """``exc`` tagged with the role of the server it came from: the one mapping of backend
    errors to roles, applied where the engine calls a backend (preparing a role's prompt, a
    generation stream), as httpx maps its transport's errors at one boundary."""
    exc.role = role


Reopen = Callable[[], Awaitable[AbstractAsyncContextManager[AsyncIterator[StreamToken]]]]


class _TimedStream:
    """Wraps a backend stream: counts the time spent waiting on the model, and is the
    boundary where a generation request's errors get their role (``_with_role``).

    A length limit refused before the first token (``ContextLimitError``) reopens the stream
    once through ``reopen``, which refreshes the server's limits first.

    A class rather than an async generator: it sits on every token's path, and an async
    generator's frame switches cost more than a plain ``__anext__`` call.
    """

    __slots__ = ("_context", "_iterator", "_reopen", "_role", "_started", "_stats", "_waits")

    def __init__(self, context: AbstractAsyncContextManager[AsyncIterator[StreamToken]],
                 stats: Statistics, role: Role, reopen: Reopen | None = None) -> None:
        self._context = context
        self._stats = stats
        self._role = role
        self._waits = stats.wait_seconds
        self._iterator: AsyncIterator[StreamToken] | None = None
        self._reopen = reopen
        self._started = False

    async def __aenter__(self) -> _TimedStream:
        started = time.perf_counter()
        try:
            try:
                self._iterator = (await self._context.__aenter__()).__aiter__()
            except ContextLimitError:
                if self._reopen is None:
                    raise
                await self._open_again()
        except BackendError as exc:
            _with_role(exc, self._role)
            raise
        finally:
            self._waits[self._role] += time.perf_counter() - started
        return self

    async def _open_again(self) -> None:
        assert self._reopen is not None
        reopen, self._reopen = self._reopen, None
        self._context = await reopen()
        self._iterator = (await self._context.__aenter__()).__aiter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        result: bool | None = await self._context.__aexit__(*exc_info)
        return result

    def __aiter__(self) -> _TimedStream:
        return self

    async def __anext__(self) -> StreamToken:
        assert self._iterator is not None
        started = time.perf_counter()
        try:
            try:
                token = await self._iterator.__anext__()
            except ContextLimitError:
                # TGI says it inside the 200 stream, before any token.
                if self._started or self._reopen is None:
                    raise
                await self._context.__aexit__(None, None, None)
                await self._open_again()
                token = await self._iterator.__anext__()
        except BackendError as exc:
            _with_role(exc, self._role)
            raise
        finally:
            self._waits[self._role] += time.perf_counter() - started
        self._started = True
        return token


def _counted_tools(request: ChatRequest) -> tuple[dict[str, Any], ...]:
    """The offered tools whose calls count, as OpenAI objects."""
    names = set(request.tool_names or ())
    return tuple(t for t in request.tools or ()
                 if isinstance(t.get("function"), dict) and t["function"].get("name") in names)
