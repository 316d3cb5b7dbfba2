"""``"auto"`` chat templates: the server's own, learnt once per server as a client-side
built-in where one renders exactly as the server does.

Everything ``auto`` knows about one server is one :class:`ServerKnowledge` record, kept per
backend for as long as the backend lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from specthink.errors import BackendError, ConfigError, redact_url
from specthink.prompts import (
    _BUILTIN,
    CHATML,
    ChatTemplate,
    JinjaTemplate,
    ServerRenderedTemplate,
    TemplateBackend,
    _wire_tool_choice,
    family_template,
    template_kwargs_option,
    validate_messages,
    validate_tools,
)
from specthink.trace import REASONING_START

__all__ = ["AutoTemplate", "LearnedTemplate", "ServerKnowledge"]

# The name users configure logging by since learning began in specthink.prompts.
logger = logging.getLogger("specthink.prompts")

PROBE_CONVERSATIONS: tuple[tuple[dict[str, Any], ...], ...] = (
    ({"role": "user", "content": "  Probe: what is 7 \u00d7 6?\n"},),
    ({"role": "system", "content": "Answer in one line.  "},
     {"role": "user", "content": " First question?"},
     {"role": "assistant", "content": "<think>\nA thought.\n</think>\n\nThe first answer.\n"},
     {"role": "user", "content": "Second question,\n\nin two paragraphs. "}),
)
"""What a server renders once per backend to learn whether a built-in template writes exactly
its prompts: no system turn (where a default system prompt shows), every other role, an
earlier answer with its reasoning (which templates drop), padded and multi-line text (which
some trim)."""

LEARNING_ATTEMPTS = 3
"""Probes a backend gets before ``auto`` stops trying to learn its template (a server that
keeps failing them is rendered by the server, as before)."""


@dataclass(frozen=True, slots=True)
class LearnedTemplate:
    """A client-side template that rendered exactly as a server does, learnt by
    :class:`AutoTemplate`: ``template`` followed by ``opener`` (the reasoning tag a thinking
    model's generation prompt adds, or ""), without its BOS text where the server's renderings
    leave it out (vLLM's and llama.cpp's, whose servers add BOS themselves)."""

    name: str
    template: JinjaTemplate
    opener: str = ""
    keeps_bos: bool = True

    def render_text(self, messages: Sequence[Mapping[str, Any]]) -> str:
        text = self.template.render_text(messages) + self.opener
        bos = self.template.bos_token
        return text if self.keeps_bos or not bos else text.removeprefix(bos)


@dataclass(slots=True)
class ServerKnowledge:
    """What ``auto`` knows of one backend's server."""

    opener: str | None = None
    """What its generation prompt opens ("" or ``<think>\\n``), as its own renderings showed
    (``None``: none seen yet): a property of its template, learnt without a request of its
    own."""
    known: bool = False
    """Learning is over: :attr:`learnt` is the answer for good."""
    learnt: LearnedTemplate | None = None
    """The built-in that renders as its server does (``None``: none, or not known yet)."""
    attempts: int = 0
    """Learnings started (each renders the probes once)."""
    learning: asyncio.Future[None] | None = None
    """Done when the learning under way ends, however it ends; concurrent first calls wait on
    it rather than each render on the server."""


def _candidates(no_system_rendering: str) -> list[LearnedTemplate]:
    """The built-ins, with and without an opened reasoning and BOS text, and ChatML with the
    default system prompt the server wrote where the conversation had none (Qwen2.5's,
    SmolLM2's)."""
    templates: list[tuple[str, JinjaTemplate]] = [
        (name, template) for name, template in _BUILTIN.items()
        if isinstance(template, JinjaTemplate)]
    head = "<|im_start|>system\n"
    if no_system_rendering.startswith(head) and "<|im_end|>" in no_system_rendering:
        default_system = no_system_rendering[len(head):no_system_rendering.index("<|im_end|>")]
        templates.append(("chatml with its default system prompt", JinjaTemplate(
            CHATML.source, eos_token=CHATML.eos_token,
            variables={"default_system": default_system})))
    return [LearnedTemplate(name, template, opener, keeps_bos)
            for name, template in templates for opener in ("", f"{REASONING_START}\n")
            for keeps_bos in ((True, False) if template.bos_token else (True,))]


def _same_rendering(candidate: LearnedTemplate, messages: Sequence[Mapping[str, Any]],
                    rendered: str) -> bool:
    try:
        return candidate.render_text(messages) == rendered
    except ConfigError:
        return False


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as seen: a probe nobody awaits any more (its conversation
    failed or was cancelled) must not make asyncio report an exception never retrieved."""
    if not future.cancelled():
        future.exception()


class AutoTemplate(ServerRenderedTemplate):
    """``"auto"``: the server's own template wherever it renders one; else the built-in
    template of the model's family, read from the model id; else a ``ConfigError`` before any
    generation request, saying which template to pass.

    The server's template costs a request per conversation, so the first conversation of a
    backend also has it render :data:`PROBE_CONVERSATIONS` (beside its own rendering): a
    built-in that writes exactly what the server wrote for all of them (BOS, default system
    prompt, dropped reasoning, trimmed text and generation prompt alike) is learnt, and later
    conversations without tools are rendered client-side with it, no request at all.
    Conversations that arrive while the first one learns wait for that learning (a cold burst
    renders once on the server, not once per call); if it learns nothing they render on the
    server, and a learning that fails never fails a call. One that no built-in reproduces
    stays the server's business, as do tools and tool turns (TGI adds its own tool prompt).

    A server that renders its template but keeps only role and content of each message (TGI)
    gets the family template for tool turns, whose calls and results it would flatten (its
    own rendering where the family is unknown), ending as the server's generation prompt
    does: where that opens the reasoning and the family's does not (QwQ and the Qwen3
    thinking checkpoints are ChatML models whose template ends with ``<think>\\n``), the tag
    is added, since such a model never writes it and its reasoning would read as answer. What
    the server's prompt opens is learnt from its earlier renderings (an agent's first turn),
    else read from the model id ("thinking", "qwq"), as on a server that renders nothing.
    """

    def __init__(self, role: str = "small", *, learn: bool = True) -> None:
        self.role = role
        self.learn = learn
        """Learn a client-side equivalent of the server's template (``False``: the server
        renders every conversation)."""
        self._servers: weakref.WeakKeyDictionary[Any, ServerKnowledge] = (
            weakref.WeakKeyDictionary())
        """One record per backend, dropped with the backend."""

    def knowledge(self, backend: TemplateBackend) -> ServerKnowledge | None:
        """The record of ``backend``'s server (``None`` for a backend that cannot be a weak
        key: nothing is learnt for it)."""
        try:
            record = self._servers.get(backend)
            if record is None:
                record = self._servers[backend] = ServerKnowledge()
        except TypeError:
            return None
        return record

    def learnt(self, backend: TemplateBackend) -> LearnedTemplate | None:
        """The client-side template learnt for ``backend``'s server, if any."""
        with contextlib.suppress(TypeError):
            record = self._servers.get(backend)
            return record.learnt if record is not None else None
        return None

    async def render(self, messages: Sequence[Mapping[str, Any]],
                     tools: Sequence[Mapping[str, Any]] | None, backend: TemplateBackend, *,
                     tool_choice: str | Mapping[str, Any] | None = None) -> str:
        tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        plain = not tools and not tool_turns
        # Learnt from renderings without template kwargs, a built-in stands for the server's
        # template only where none are passed.
        learns = plain and self.learn and not self.template_kwargs
        record = self.knowledge(backend) if learns else None
        if record is not None:
            await self._wait_for_learning(record)
            if record.learnt is not None:
                return record.learnt.render_text(messages)
        flattens = tool_turns and not backend.keeps_tool_turns
        if flattens:
            model_id = (await backend.info()).model_id
            family = family_template(model_id)
            if family is not None:
                prompt = await self._builtin(family).render(messages, tools, backend)
                return prompt + self._reasoning_opener(family, prompt, backend, model_id)
            # No better rendering is known: the server's, with its tool turns flattened.
        # One request: a server that renders nothing answers None (detected once per backend).
        probing = self._start_learning(record, backend) if record is not None else None
        try:
            text = await backend.render_chat(validate_messages(messages), validate_tools(tools),
                                             tool_choice=_wire_tool_choice(tool_choice, tools),
                                             **template_kwargs_option(self.template_kwargs))
        except BaseException:
            if probing is not None and record is not None:
                probing.cancel()
                self._end_learning(record)
            raise
        if probing is not None and record is not None:
            await self._finish_learning(record, backend, probing, messages, text)
        if text is not None:
            self._learn_opener(backend, text)
            return text
        model_id = (await backend.info()).model_id
        family = family_template(model_id)
        if family is None:
            option = f"{self.role}_template" if self.role in ("small", "target") else "template"
            raise ConfigError(
                f"the {self.role} server {redact_url(backend.url)} renders no chat template and "
                f"the model {model_id!r} is of no family specthink knows; pass {option}= one of "
                f"{', '.join(repr(n) for n in _BUILTIN)}, a Jinja template source, or the path "
                "of the model's tokenizer_config.json")
        prompt = await self._builtin(family).render(messages, tools, backend)
        return prompt + self._reasoning_opener(family, prompt, backend, model_id)

    def _builtin(self, family: str) -> ChatTemplate:
        return _BUILTIN[family].with_template_kwargs(self.template_kwargs)

    @staticmethod
    async def _wait_for_learning(record: ServerKnowledge) -> None:
        """Wait for a learning under way on this event loop. Shielded: a waiter cancelled by
        its caller cancels neither the learning nor the other waiters' wait."""
        learning = record.learning
        # Another event loop's learning cannot be awaited here: this call renders meanwhile.
        if (learning is not None and not learning.done()
                and learning.get_loop() is asyncio.get_running_loop()):
            await asyncio.shield(learning)

    @staticmethod
    def _start_learning(record: ServerKnowledge,
                        backend: TemplateBackend) -> asyncio.Future[list[str | None]] | None:
        """The probe renderings, started beside a conversation's own while nothing is known,
        no other conversation is learning and attempts remain."""
        if record.learning is not None and record.learning.get_loop().is_closed():
            record.learning = None  # its loop ended before it could: it will never end
        if (record.known or record.learning is not None
                or record.attempts >= LEARNING_ATTEMPTS):
            return None
        record.attempts += 1
        record.learning = asyncio.get_running_loop().create_future()
        probing = asyncio.gather(*(backend.render_chat(list(conversation))
                                   for conversation in PROBE_CONVERSATIONS))
        probing.add_done_callback(_retrieve)
        return probing

    @staticmethod
    def _end_learning(record: ServerKnowledge) -> None:
        """Release the conversations waiting for this learning, however it ended."""
        learning, record.learning = record.learning, None
        if learning is not None and not learning.done():
            learning.set_result(None)

    async def _finish_learning(self, record: ServerKnowledge, backend: TemplateBackend,
                               probing: asyncio.Future[list[str | None]],
                               messages: Sequence[Mapping[str, Any]], text: str | None) -> None:
        try:
            if text is None:  # nothing rendered on the server: nothing to learn
                probing.cancel()
                record.known, record.learnt = True, None
                return
            try:
                probes = await probing
            except Exception as exc:  # learning is an optimisation: it never fails a call
                level = logging.DEBUG if isinstance(exc, BackendError) else logging.WARNING
                logger.log(level, "%s: the template probe failed (%r); the server renders",
                           redact_url(backend.url), exc)
                return
            renderings: list[tuple[Sequence[Mapping[str, Any]], str | None]] = [
                *zip(PROBE_CONVERSATIONS, probes, strict=True), (messages, text)]
            no_system = probes[0] or ""
            learnt = next((candidate for candidate in _candidates(no_system)
                           if all(rendered is not None
                                  and _same_rendering(candidate, conversation, rendered)
                                  for conversation, rendered in renderings)), None)
            record.known, record.learnt = True, learnt
            if learnt is not None:
                logger.info("%s renders its chat template as the built-in %s does: later "
                            "conversations without tools are rendered client-side",
                            redact_url(backend.url), learnt.name)
        finally:
            self._end_learning(record)

    def _learn_opener(self, backend: TemplateBackend, rendered: str) -> None:
        tail = rendered[rendered.rfind(REASONING_START):] if REASONING_START in rendered else ""
        record = self.knowledge(backend)
        if record is not None:  # a backend that cannot be a weak key: not kept
            record.opener = tail if tail.rstrip() == REASONING_START else ""

    def _reasoning_opener(self, family: str, family_text: str, backend: TemplateBackend,
                          model_id: str) -> str:
        """The reasoning tag the server's generation prompt opens and ``family_text``'s does
        not: as the server's own renderings showed, else as the model id suggests (QwQ and
        the Qwen3 "Thinking" checkpoints; thinking models of other families tag otherwise)."""
        if family_text.rstrip().endswith(REASONING_START):
            return ""
        record = self.knowledge(backend)
        if record is not None and record.opener is not None:
            return record.opener
        lowered = model_id.lower()
        thinking = family == "chatml" and (
            "thinking" in lowered or ("qwq" in lowered and "preview" not in lowered))
        return f"{REASONING_START}\n" if thinking else ""

    def __repr__(self) -> str:
        return "AutoTemplate()" if self.learn else "AutoTemplate(learn=False)"
