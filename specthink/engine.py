"""The speculative-thinking engine: one async state machine driving two backends.

The small model writes from ``prompt + text_so_far``. Every token it writes is watched for the
delimiter; after a trigger point, the next ``probe_tokens`` small tokens are held back (never shown)
until they are known to be neutral. A keyword in a probe window closes the small model's stream at
once (the server cancels on disconnect), throws the probe away and lets the target write. The
rules themselves live in :mod:`specthink.rules`; this module only sequences them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ._sync import _LoopThread, close_on_sync_loop, run_sync
from .backends.base import Backend, SamplingParams, StreamToken
from .errors import (
    BackendError,
    ConfigError,
    PromptTooLongError,
    StreamDroppedError,
    TargetFallbackWarning,
)
from .rules import TakeoverRules
from .trace import (
    REASONING_START,
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

__all__ = ["SpeculativeThinker", "close_on_sync_loop", "run_sync"]

Role = Literal["small", "target"]
TargetErrorPolicy = Literal["fallback", "raise"]
T = TypeVar("T")

DEFAULT_MAX_NEW_TOKENS = 4096
CONTEXT_MARGIN_TOKENS = 8
"""Slack for re-tokenising accepted text, which may take a few more tokens than were generated."""


@dataclass(slots=True)
class _Window:
    """An open probe window: held-back tokens from ``start`` on belong to it."""

    start: int
    pending_delimiter: str
    """Small-run text since the last delimiter, as it was when the window opened."""


@dataclass(slots=True)
class _Run:
    """The state of one request: accepted text, budget, counters and statistics."""

    prompts: dict[Role, str]
    budget_left: int
    stop: tuple[str, ...]
    sampling: SamplingParams
    reflection_count: int
    reflection_threshold: int
    n3: int
    stats: Statistics = field(default_factory=Statistics)
    prompt_tokens: dict[Role, int] = field(default_factory=lambda: {"small": 0, "target": 0})
    total_limits: dict[Role, int] = field(default_factory=dict)
    """Each server's max_total_tokens (prompt + generated), where it said."""
    text: str = ""
    emitted: int = 0
    """Characters of ``text`` already yielded; the rest may be the start of a stop sequence."""
    unemitted: list[TextEvent] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    target_ok: bool = True
    in_scope: bool = True
    model_ids: dict[str, str] = field(default_factory=dict)
    starts_in_reasoning: bool = False
    """The small prompt opened the reasoning and no grammar constrains the output."""
    routing_key: str = ""
    """Sent with every generation request of this call (``routing_headers``)."""
    target_preparation: asyncio.Future[None] | None = None
    """The target's prompt and limits, prepared beside the small model's first stream."""
    reasoning: bool | None = None
    """Inside a reasoning section: the prompt or the text opened ``<think>`` and it has not
    closed yet (``None`` until the first accepted text tells)."""
    done: bool = False
    next_rule: Rule | None = None

    def finish(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.stats.finish_reason = reason


@dataclass(slots=True)
class _WindowOutcome:
    events: list[Event]
    takeover_at: int | None = None
    """Held index of the window whose probe holds a keyword (everything from there is dropped)."""


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
    ) -> None:
        if on_target_error not in ("fallback", "raise"):
            raise ConfigError(
                f"on_target_error must be 'fallback' or 'raise', got {on_target_error!r}")
        if max_stream_resumes < 0:
            raise ConfigError(f"max_stream_resumes must be >= 0, got {max_stream_resumes}")
        self.small = small
        self.target = target
        self.rules = TakeoverRules.preset(rules) if isinstance(rules, str) else rules
        from . import prompts  # imported late: prompts pulls in jinja2

        self.small_template = small_template
        self.target_template = target_template
        # Resolved once: a bad template name or file fails here, before any request.
        self._templates: dict[Role, prompts.ChatTemplate] = {
            "small": prompts.resolve_template(small_template, "small"),
            "target": prompts.resolve_template(target_template, "target")}
        self.on_target_error: TargetErrorPolicy = on_target_error
        self.max_stream_resumes = max_stream_resumes
        self.check_prompt_length = check_prompt_length
        self._intervention_tokens: int | None = None
        self._target_checked = False
        """The target's template and limits were checked once; later calls prepare its prompt
        beside the small model's first stream."""

    def __repr__(self) -> str:
        return (f"SpeculativeThinker(small={self.small!r}, target={self.target!r}, "
                f"on_target_error={self.on_target_error!r})")

    @property
    def backends(self) -> dict[Role, Backend]:
        return {"small": self.small, "target": self.target}

    async def aclose(self) -> None:
        """Close both backends' HTTP clients (the ones they opened themselves)."""
        await asyncio.gather(self.small.aclose(), self.target.aclose())

    # ---- public API ----------------------------------------------------------------------

    async def agenerate(self, messages: Sequence[dict[str, Any]], **params: Any) -> Result:
        """Run the whole loop and return the accepted text, the events and the statistics."""
        async for event in self.astream(messages, **params):
            if isinstance(event, FinishEvent):
                return event.result
        raise AssertionError("astream ended without a FinishEvent")  # pragma: no cover

    async def astream(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        sampling: SamplingParams | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        session_id: str | None = None,
    ) -> AsyncIterator[Event]:
        """Stream events as text is accepted; the last event is a :class:`FinishEvent`.

        ``session_id`` (the caller's conversation or user session) is the routing key sent
        with every generation request of the call, so a router keeps the conversation on the
        replica that holds its prefix; without one, each call gets a fresh random key.
        """
        run = await self._prepare(messages, max_new_tokens=max_new_tokens, stop=stop,
                                  sampling=sampling, tools=tools, tool_choice=tool_choice,
                                  session_id=session_id)
        # Yielded with the first event the loop produces, so a call that fails before it
        # writes anything yields nothing at all.
        start: StartEvent | None = StartEvent(
            starts_in_reasoning=run.starts_in_reasoning, reasoning_end=self.rules.thinking_end,
            routing_key=run.routing_key)
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
        models = {role: run.model_ids.get(role) or self.backends[role].url
                  for role in ("small", "target")}
        result = Result(text=run.text, events=tuple(run.events), stats=run.stats,
                        starts_in_reasoning=run.starts_in_reasoning,
                        reasoning_end=self.rules.thinking_end, models=models)
        yield FinishEvent(result)

    def generate(self, messages: Sequence[dict[str, Any]], **params: Any) -> Result:
        """Blocking ``agenerate``; works where an event loop already runs (notebooks)."""
        return run_sync(self.agenerate(messages, **params))

    def stream(self, messages: Sequence[dict[str, Any]], **params: Any) -> Iterator[Event]:
        """Blocking ``astream``; leaving the loop early cancels the request and closes streams."""
        return _LoopThread.get().iterate(self.astream(messages, **params))

    # ---- preparation: everything that can fail before a generation request -----------------

    async def _prepare(self, messages: Sequence[dict[str, Any]], *, max_new_tokens: int | None,
                       stop: Sequence[str] | None, sampling: SamplingParams | None,
                       tools: Sequence[dict[str, Any]] | None, tool_choice: Any,
                       session_id: str | None) -> _Run:
        from . import prompts

        budget = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        stops = tuple(stop or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise ConfigError(f"stop sequences must be non-empty strings, got {list(stops)!r}")
        checked = prompts.validate_messages(messages)
        if tools is not None or tool_choice is not None:
            prompts.apply_tool_choice(checked, tools, tool_choice)  # a bad choice fails here
        rules = self.rules
        run = _Run(prompts={"small": "", "target": ""}, budget_left=budget, stop=stops,
                   sampling=sampling or SamplingParams(),
                   reflection_count=0, reflection_threshold=rules.reflection_threshold,
                   n3=rules.n3, routing_key=_routing_key(session_id))

        async def prepare_role(role: Role) -> None:
            backend = self.backends[role]
            try:
                run.prompts[role] = await prompts.render_prompt(
                    self._templates[role], checked, tools, backend, tool_choice=tool_choice)
                if self.check_prompt_length:
                    await self._check_limits(run, role, len(stops))
            except BackendError as exc:
                exc.role = role
                raise

        target = asyncio.ensure_future(prepare_role("target"))
        if self._target_checked:
            # Off the critical path: the small model's first request needs only its own
            # prompt; the target's is awaited at the first handoff (``_target_prepared``).
            try:
                await prepare_role("small")
            except BaseException:
                target.cancel()
                await asyncio.gather(target, return_exceptions=True)
                raise
            run.target_preparation = target
        else:
            # The first call checks the target's configuration (its template, its limits)
            # before any generation request, side by side with the small model's.
            small_ready, target_ready = await asyncio.gather(
                prepare_role("small"), target, return_exceptions=True)
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
                                   and run.prompts["small"].rstrip().endswith(REASONING_START))
        return run

    async def _target_prepared(self, run: _Run) -> FallbackEvent | None:
        """Wait for the target's prompt and limits before its first request. A target that
        cannot serve is the ``on_target_error`` policy's business: the returned event says the
        small model goes on alone (``run.target_ok`` is then false)."""
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
                url=self.target.url))
        return None

    @staticmethod
    def _end_preparation(run: _Run) -> None:
        """A call that never handed over does not wait for the target's preparation."""
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
        try:
            info = await backend.info()
        except BackendError as exc:
            exc.role = role
            raise
        run.model_ids[role] = info.model_id
        if info.max_stop_sequences is not None and stop_count > info.max_stop_sequences:
            raise ConfigError(
                f"{stop_count} stop sequences given, but the {role} server {backend.url} allows "
                f"at most {info.max_stop_sequences}")
        if info.max_input_tokens is None and info.max_total_tokens is None:
            return
        # A token covers at least one byte (byte-level BPE; special tokens cover several), so
        # the UTF-8 length bounds the token count. Only prompts near a limit are tokenised by
        # the server: most conversations need no extra request.
        length = len(prompt.encode())
        fits_input = info.max_input_tokens is None or length <= info.max_input_tokens
        fits_total = (info.max_total_tokens is None
                      or length + run.budget_left <= info.max_total_tokens)
        if not (fits_input and fits_total):
            length = await backend.count_tokens(prompt)
        run.prompt_tokens[role] = length
        if info.max_total_tokens is not None:
            run.total_limits[role] = info.max_total_tokens
        if info.max_input_tokens is not None and length > info.max_input_tokens:
            raise PromptTooLongError(
                f"the prompt has {length} tokens, more than the {role} server's "
                f"max_input_tokens={info.max_input_tokens} ({backend.url})")

    # ---- the loop ------------------------------------------------------------------------

    async def _drive(self, run: _Run) -> AsyncGenerator[Event, None]:
        rules = self.rules
        if rules.mode == "instruct" and rules.begin_tokens and self._triggers_active(run):
            yield self._note_takeover(run, Rule.BEGIN, discarded=0)
            begin = self._target_writes(run, Rule.BEGIN, rules.begin_tokens)
            async with aclosing(begin) as stream:
                async for event in stream:
                    yield event
        while not run.done:
            run.next_rule = None
            async with aclosing(self._small_writes(run)) as stream:
                async for event in stream:
                    yield event
            rule = run.next_rule
            if run.done or rule is None:
                break
            if rule is Rule.EXCESSIVE_REFLECTION:
                async with aclosing(self._intervene(run)) as stream:
                    async for event in stream:
                        yield event
            else:
                async with aclosing(self._target_writes(run, rule, rules.n1)) as stream:
                    async for event in stream:
                        yield event
        if not run.done:
            run.finish("stop")
        if not run.stats.input_tokens:
            # The server reports prompt tokens on a stream's last token, which a takeover cuts
            # (and llama.cpp's server never sends them when streaming).
            run.stats.input_tokens = run.prompt_tokens["small"]
            if not run.stats.input_tokens:
                with contextlib.suppress(BackendError):
                    run.stats.input_tokens = await self.small.count_tokens(run.prompts["small"])
        for event in self._flush(run):
            yield event

    def _triggers_active(self, run: _Run) -> bool:
        # A grammar restarts with every request, so a handoff inside constrained output would
        # break it: constrained answers are written by the small model alone.
        return run.target_ok and run.in_scope and run.sampling.grammar is None

    async def _small_writes(self, run: _Run) -> AsyncGenerator[Event, None]:
        """The small model writes until end-of-sequence, the budget, or a takeover decision."""
        rules = self.rules
        delimiter = rules.delimiter
        tail_len = len(delimiter) - 1
        instruct = rules.mode == "instruct"
        held: list[str] = []
        windows: list[_Window] = []
        pending = ""  # small-run text since the last delimiter (its tail is all that matters)
        resumes = 0
        while not run.done:
            decided: Rule | None = None
            discarded = 0
            got_tokens = 0
            finish_reason: str | None = None
            room = self._room(run, "small", run.budget_left)
            if room <= 0:
                run.finish("length")
                break
            try:
                async with self._open("small", run, room) as tokens:
                    async for token in tokens:
                        got_tokens += 1
                        if token.input_tokens and not run.stats.input_tokens:
                            run.stats.input_tokens = token.input_tokens
                        finish_reason = token.finish_reason
                        if token.special:
                            continue
                        text = token.text
                        if windows:
                            held.append(text)
                            outcome = self._resolve_windows(run, held, windows, complete=False)
                            for event in outcome.events:
                                yield event
                            if outcome.takeover_at is not None:
                                discarded = len(held) - outcome.takeover_at
                                decided = Rule.AFFIRM_REFLECT
                                break
                        else:
                            for event in self._accept(run, "small", text, None, 1):
                                yield event
                        if run.done:
                            break
                        # trigger detection on the small model's own text
                        combined = pending + text
                        cut = combined.rfind(delimiter)
                        after = combined[cut + len(delimiter):] if cut >= 0 else combined
                        pending = after[-tail_len:] if tail_len else ""
                        if cut >= 0 and self._triggers_active(run):
                            if instruct:
                                decided = Rule.EVERY_TRIGGER
                                break
                            if (rules.excessive_reflection_takeover and not windows
                                    and run.reflection_count >= run.reflection_threshold):
                                decided = Rule.EXCESSIVE_REFLECTION
                                break
                            if rules.reflection_takeover:
                                windows.append(_Window(len(held), pending))
                eos = finish_reason in ("eos", "stop")
            except StreamDroppedError as exc:
                exc.role = "small"
                resumes += 1
                if resumes > self.max_stream_resumes:
                    raise
                run.stats.resumed_streams["small"] += 1
                # Held tokens were never accepted: go back to the earliest open window, whose
                # tokens the resumed stream will write again.
                if windows:
                    pending = windows[0].pending_delimiter
                    del windows[1:]
                    windows[0].start = 0
                    held.clear()
                continue
            if decided is not None:
                if decided is Rule.AFFIRM_REFLECT:
                    run.stats.discarded_tokens += discarded
                yield self._note_takeover(run, decided, discarded)
                run.next_rule = decided
                return
            # The stream ended: open windows close with what they hold.
            if windows:
                outcome = self._resolve_windows(run, held, windows, complete=True)
                for event in outcome.events:
                    yield event
                if outcome.takeover_at is not None:
                    discarded = len(held) - outcome.takeover_at
                    run.stats.discarded_tokens += discarded
                    yield self._note_takeover(run, Rule.AFFIRM_REFLECT, discarded)
                    run.next_rule = Rule.AFFIRM_REFLECT
                    return
                for event in self._accept(run, "small", "".join(held), None, len(held)):
                    yield event
                held.clear()
                windows.clear()
            if run.done:
                break
            if eos or got_tokens == 0:
                run.finish("stop")
            elif run.budget_left <= 0:
                run.finish("length")
            elif finish_reason not in ("length", None):
                run.finish("stop")
            # else: the server stopped at its own limit before ours; ask again from here

    def _resolve_windows(self, run: _Run, held: list[str], windows: list[_Window], *,
                         complete: bool) -> _WindowOutcome:
        """Decide open windows in order: the earliest whose probe holds a keyword wins.

        Held tokens before the earliest open window are released; ``held`` and ``windows`` are
        shifted so that the earliest open window starts at 0 again.
        """
        rules = self.rules
        probe = rules.probe_tokens
        events: list[Event] = []
        while windows:
            first = windows[0]
            end = first.start + probe
            window_complete = complete or len(held) >= end
            if rules.has_keyword("".join(held[first.start:end]), complete=window_complete):
                return _WindowOutcome(events, first.start)
            if not window_complete:
                break
            windows.pop(0)
            release = windows[0].start if windows else len(held)
            if release:
                events.extend(self._accept(run, "small", "".join(held[:release]), None, release))
                del held[:release]
                for window in windows:
                    window.start -= release
            if run.done:
                windows.clear()
                held.clear()
                break
        return _WindowOutcome(events)

    async def _target_writes(self, run: _Run, rule: Rule,
                             first: int) -> AsyncGenerator[Event, None]:
        """The target writes ``first`` tokens; after a rule-1 style takeover it may go on for
        ``n2`` more (rule 2) when its own text holds a verify word. One request serves both."""
        if (fallback := await self._target_prepared(run)) is not None:
            yield fallback
        if not run.target_ok:
            return
        rules = self.rules
        counts_reflection = rule in (Rule.AFFIRM_REFLECT, Rule.EVERY_TRIGGER)
        may_verify = counts_reflection and rules.verify_takeover
        wanted = first + (rules.n2 if may_verify else 0)
        got = 0
        first_parts: list[str] = []
        current = rule
        resumes = 0
        try:
            while not run.done and got < wanted and run.budget_left > 0:
                eos = False
                received = 0
                room = self._room(run, "target", min(wanted - got, run.budget_left))
                if room <= 0:
                    run.finish("length")
                    return
                async with self._open("target", run, room) as tokens:
                    try:
                        async for token in tokens:
                            received += 1
                            if token.finish_reason in ("eos", "stop"):
                                eos = True
                            if token.special:
                                continue
                            for event in self._accept(run, "target", token.text, current, 1):
                                yield event
                            got += 1
                            if got <= first:
                                first_parts.append(token.text)
                            if run.done:
                                return
                            if got == first and current is rule:
                                written = "".join(first_parts)
                                if counts_reflection and rules.score(written) < 0:
                                    run.reflection_count += 1
                                if may_verify and rules.has_verify(written):
                                    current = Rule.VERIFY
                                    yield self._note_takeover(run, Rule.VERIFY, 0)
                                else:
                                    return
                            if got >= wanted:
                                return
                    except StreamDroppedError as exc:
                        exc.role = "target"
                        resumes += 1
                        if resumes > self.max_stream_resumes:
                            raise
                        run.stats.resumed_streams["target"] += 1
                        continue
                if eos or received == 0:
                    run.finish("stop")
                elif run.budget_left <= 0:
                    run.finish("length")
        except BackendError as exc:
            yield self._target_failed(run, exc)

    def _target_failed(self, run: _Run, exc: BackendError) -> FallbackEvent:
        """Apply ``on_target_error``: raise, or let the small model go on alone."""
        exc.role = "target"
        if self.on_target_error == "raise":
            raise exc
        run.target_ok = False
        run.stats.fallback = True
        run.stats.fallback_error = str(exc)
        warnings.warn(f"target server failed, the small model continues alone: {exc}",
                      TargetFallbackWarning, stacklevel=3)
        fallback = FallbackEvent(offset=len(run.text), error=str(exc))
        run.events.append(fallback)
        return fallback

    async def _intervene(self, run: _Run) -> AsyncGenerator[Event, None]:
        """Rule 3: the intervention text, then ``n3`` target tokens; the counters adapt."""
        rules = self.rules
        if self._intervention_tokens is None:
            try:
                self._intervention_tokens = await self.target.count_tokens(
                    rules.intervention_text)
            except BackendError:
                self._intervention_tokens = max(1, len(rules.intervention_text) // 4)
        for piece in self._accept(run, "intervention", rules.intervention_text,
                                  Rule.EXCESSIVE_REFLECTION, self._intervention_tokens):
            yield piece
        if not run.done:
            rule3 = self._target_writes(run, Rule.EXCESSIVE_REFLECTION, run.n3)
            async with aclosing(rule3) as stream:
                async for event in stream:
                    yield event
        run.reflection_count = 0
        run.n3 = min(run.n3 + rules.n3_step, rules.n3_max)
        run.reflection_threshold = min(run.reflection_threshold + rules.threshold_step,
                                       rules.threshold_max)

    def _note_takeover(self, run: _Run, rule: Rule, discarded: int) -> TakeoverEvent:
        run.stats.takeovers[rule.value] += 1
        event = TakeoverEvent(rule=rule, offset=len(run.text), discarded_tokens=discarded)
        run.events.append(event)
        return event

    # ---- accepting text: budget, stop sequences, scope -------------------------------------

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
        before = len(run.text)
        run.text += text
        end = self.rules.thinking_end
        if run.reasoning is None:
            run.reasoning = (run.starts_in_reasoning
                             or run.text.lstrip().startswith(REASONING_START))
        if run.reasoning or (run.in_scope and self.rules.scope == "thinking"):
            closed = end in run.text[max(0, before - len(end)):]
            if run.reasoning:
                stats.reasoning_tokens += tokens
                run.reasoning = not closed
            if closed and self.rules.scope == "thinking":
                run.in_scope = False
        piece = TextEvent(source, text, rule)
        if not run.stop:
            run.emitted = len(run.text)
            run.events.append(piece)
            out = [piece]
        else:
            run.unemitted.append(piece)
            out = self._release_checked(run, before)
        if run.budget_left <= 0 and not run.done:
            run.finish("length")
            out.extend(self._flush(run))
        return out

    def _release_checked(self, run: _Run, appended_at: int) -> list[TextEvent]:
        longest = max(len(s) for s in run.stop)
        search_from = max(0, appended_at - longest + 1)
        cut = min((at for s in run.stop if (at := run.text.find(s, search_from)) >= 0),
                  default=-1)
        if cut >= 0:
            run.text = run.text[:cut]
            run.finish("stop")
            return self._emit_until(run, cut)
        safe = len(run.text)
        for s in run.stop:
            for size in range(min(len(s) - 1, len(run.text)), 0, -1):
                if run.text.endswith(s[:size]):
                    safe = min(safe, len(run.text) - size)
                    break
        return self._emit_until(run, safe)

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
        return self._emit_until(run, len(run.text))

    # ---- requests ------------------------------------------------------------------------

    def _open(self, role: Role, run: _Run, max_new_tokens: int) -> _TimedStream:
        backend = self.backends[role]
        stats = run.stats

        def on_attempt(attempt: int) -> None:
            stats.requests[role] += 1
            if attempt > 1:
                stats.retries[role] += 1

        prompt = run.prompts[role] + run.text
        sampling = run.sampling
        if sampling.grammar is not None and not backend.supports_grammar:
            sampling = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                      top_k=sampling.top_k, seed=sampling.seed,
                                      repetition_penalty=sampling.repetition_penalty)
        context = backend.stream(prompt, max_new_tokens=max(1, max_new_tokens),
                                 sampling=sampling, on_attempt=on_attempt)
        return _TimedStream(context, stats, role)


def _routing_key(session_id: str | None) -> str:
    if session_id is None:
        return uuid.uuid4().hex
    if not isinstance(session_id, str) or not session_id.strip():
        raise ConfigError(f"session_id must be a non-empty string, got {session_id!r}")
    return session_id


class _TimedStream:
    """Wraps a backend stream: counts the time spent waiting on the model and tags errors.

    A class rather than an async generator: it sits on every token's path, and an async
    generator's frame switches cost more than a plain ``__anext__`` call.
    """

    __slots__ = ("_context", "_iterator", "_role", "_stats", "_waits")

    def __init__(self, context: Any, stats: Statistics, role: Role) -> None:
        self._context = context
        self._stats = stats
        self._role = role
        self._waits = stats.wait_seconds
        self._iterator: AsyncIterator[StreamToken] | None = None

    async def __aenter__(self) -> _TimedStream:
        started = time.perf_counter()
        try:
            self._iterator = (await self._context.__aenter__()).__aiter__()
        except BackendError as exc:
            exc.role = self._role
            raise
        finally:
            self._waits[self._role] += time.perf_counter() - started
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        result: bool | None = await self._context.__aexit__(*exc_info)
        return result

    def __aiter__(self) -> _TimedStream:
        return self

    async def __anext__(self) -> StreamToken:
        assert self._iterator is not None
        started = time.perf_counter()
        try:
            return await self._iterator.__anext__()
        except BackendError as exc:
            exc.role = self._role
            raise
        finally:
            self._waits[self._role] += time.perf_counter() - started
