"""One chat request, checked once: what every surface (the engine's own API, LangChain, LlamaIndex,
``specthink serve``) builds from its caller's arguments and hands to the engine.

``ChatRequest.build(messages, tools=..., tool_choice=..., ...)`` validates every field
synchronously and raises a :class:`~specthink.errors.ConfigError` whose ``field`` names the bad
one, before any server is asked; the engine then validates nothing again. The request carries
what the rest of the call needs, decided here only: the normalised messages, the tools offered
and the names whose calls count (none when there are no tools or ``tool_choice`` is
``"none"``), the call limit (``parallel_tool_calls=False`` keeps one), the prompt's view of
``tool_choice`` and ``response_format`` (an instruction in the system turn) and the grammar a
``response_format`` asks for (never with tools: a grammar over the whole output would make them
uncallable).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from . import prompts
from ._constants import DEFAULT_MAX_NEW_TOKENS
from .backends.base import SamplingParams
from .errors import ConfigError
from .rules import TakeoverRules
from .structured import grammar_for, json_instruction, with_system_text

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "ChatRequest", "RulesSpec"]

RulesSpec = TakeoverRules | str | Mapping[str, Any]
"""A preset name, ``TakeoverRules``, or a dict of fields overriding the engine's rules."""

T = TypeVar("T")


def _checked(field: str, check: Callable[[], T]) -> T:
    """Run ``check``; a ``ConfigError`` it raises is tagged with ``field``."""
    try:
        return check()
    except ConfigError as exc:
        if exc.field is None:
            exc.field = field
        raise


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One checked chat request, ready for ``SpeculativeThinker.astream(request)``.

    Build it with :meth:`build`; the fields are its normalised, validated form.
    """

    messages: list[dict[str, Any]]
    """The conversation, normalised (``prompts.validate_messages``)."""
    tools: list[dict[str, Any]] | None
    """The tools offered, in the OpenAI form; ``None`` when none."""
    tool_choice: str | dict[str, Any] | None
    prompt_messages: list[dict[str, Any]]
    """What the chat templates render: ``messages`` with the ``tool_choice`` and
    ``response_format`` instructions in the system turn."""
    prompt_tools: list[dict[str, Any]] | None
    """The tools the templates render (``tool_choice`` may narrow or hide them)."""
    tool_names: tuple[str, ...] | None
    """Names of the tools whose calls count; ``None``: no tools, or ``tool_choice="none"``
    (then ``<tool_call>`` text stays text)."""
    max_tool_calls: int | None
    """``1`` with ``parallel_tool_calls=False``; else no limit."""
    max_new_tokens: int
    """Tokens the call may generate, both models together."""
    stop: tuple[str, ...]
    sampling: SamplingParams
    grammar: dict[str, Any] | None
    """The grammar ``response_format`` asks for; the engine applies it where both servers
    take one (``sampling.grammar``, set by the caller, is applied as given)."""
    session_id: str | None
    """The routing key of every generation request of the call (``None``: a fresh one)."""
    rules: TakeoverRules | None
    """Rules for this call only; ``None``: the engine's own."""
    template_kwargs: dict[str, Any] | None = None
    """Chat template variables for this call only (vLLM's per-request
    ``chat_template_kwargs``), over the pair's own (``PairSettings.template_kwargs`` over each
    family's thinking switch)."""

    @classmethod
    def build(
        cls,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: Mapping[str, Any] | None = None,
        stop: str | Sequence[str] | None = None,
        max_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        session_id: str | None = None,
        rules: RulesSpec | None = None,
        base_rules: TakeoverRules | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> ChatRequest:
        """Check every field and build the request; a bad one is a ``ConfigError`` whose
        ``field`` names it (``messages``, ``tools``, ``tool_choice``, ``parallel_tool_calls``,
        ``response_format``, ``stop``, ``max_new_tokens``, ``sampling``, ``session_id``,
        ``rules``, ``rules.<name>`` or ``template_kwargs``).

        ``rules`` as a dict overrides fields of ``base_rules`` (default: the ``paper`` preset;
        ``specthink serve`` passes its configured rules).
        """
        checked = _checked("messages", lambda: prompts.validate_messages(messages))
        offered = _checked("tools", lambda: prompts.validate_tools(tools))
        choice: str | dict[str, Any] | None = (
            dict(tool_choice) if isinstance(tool_choice, Mapping) else tool_choice)
        if choice is not None and not isinstance(choice, str | dict):
            raise ConfigError(f"tool_choice must be a string or a dict, got {choice!r}",
                              field="tool_choice")
        prompt_messages, prompt_tools = _checked(
            "tool_choice", lambda: prompts.apply_tool_choice(checked, offered, choice))
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise ConfigError(f"parallel_tool_calls must be a bool, got {parallel_tool_calls!r}",
                              field="parallel_tool_calls")
        grammar = None
        if response_format is not None:
            if not isinstance(response_format, Mapping):
                raise ConfigError(f"response_format must be a dict, got {response_format!r}",
                                  field="response_format")
            grammar = _checked("response_format", lambda: grammar_for(response_format))
            instruction = json_instruction(response_format)
            if instruction:
                prompt_messages = with_system_text(prompt_messages, instruction)
            if offered:
                grammar = None
        budget = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}",
                              field="max_new_tokens")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise ConfigError(f"stop sequences must be non-empty strings, got {list(stops)!r}",
                              field="stop")
        if sampling is None:
            sampling = SamplingParams()
        elif not isinstance(sampling, SamplingParams):
            raise ConfigError(f"sampling must be a SamplingParams, got {sampling!r}",
                              field="sampling")
        if session_id is not None and (not isinstance(session_id, str)
                                       or not session_id.strip()):
            raise ConfigError(f"session_id must be a non-empty string, got {session_id!r}",
                              field="session_id")
        if template_kwargs is not None and (not isinstance(template_kwargs, Mapping) or any(
                not isinstance(key, str) for key in template_kwargs)):
            raise ConfigError(f"template_kwargs must be a dict of variable names, got "
                              f"{template_kwargs!r}", field="template_kwargs")
        # Tools are offered unless tool_choice hid them ("none"): then their calls do not count.
        names = (tuple(str(tool["function"]["name"]) for tool in offered)
                 if offered and prompt_tools is not None else None)
        return cls(
            messages=checked, tools=offered, tool_choice=choice,
            prompt_messages=prompt_messages, prompt_tools=prompt_tools, tool_names=names,
            max_tool_calls=1 if parallel_tool_calls is False else None,
            max_new_tokens=budget, stop=stops, sampling=sampling, grammar=grammar,
            session_id=session_id,
            rules=None if rules is None else _rules(rules, base_rules),
            template_kwargs=dict(template_kwargs) if template_kwargs else None)


def _rules(rules: RulesSpec, base: TakeoverRules | None) -> TakeoverRules:
    if isinstance(rules, TakeoverRules):
        return rules
    if isinstance(rules, str):
        return TakeoverRules.preset(rules)
    if not isinstance(rules, Mapping):
        raise ConfigError(f"rules must be a preset name, a TakeoverRules or a dict of its "
                          f"fields, got {rules!r}", field="rules")
    base = base or TakeoverRules.paper()
    try:
        return TakeoverRules.model_validate({**base.model_dump(), **rules})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"rules.{where}: {first['msg']}" if where else
                          f"rules: {first['msg']}",
                          field=f"rules.{where}" if where else "rules") from None
