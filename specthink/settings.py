"""The pair's settings, declared once: which two servers, how to reach them, and how the engine
drives them. ``PairSettings(...).build()`` is the engine.

Every surface takes these fields from here: ``specthink_lc.ChatSpeculativeThinking`` and
``specthink_li.SpeculativeThinkingLLM`` inherit them (so their constructors take
``small_url=...``, ``target_url=...`` as before), ``specthink serve``'s ``ServeSettings``
extends them, and ``specthink ask`` builds one from its options. Missing values come from the
environment (``SPECTHINK_SMALL_URL``, ``SPECTHINK_TARGET_URL``, ``SPECTHINK_BACKEND``,
``SPECTHINK_SMALL_MODEL``, ``SPECTHINK_TARGET_MODEL``, ``SPECTHINK_RULES``,
``SPECTHINK_API_KEY``). A bad value whose check is the core's (an unknown backend kind or rules
preset, a missing URL) is a :class:`~specthink.errors.ConfigError` naming the choices, raised
when the settings are built, before any request.

A caller that needs one model alone (``specthink eval``'s single-model modes) makes its settings
with ``PairSettings.for_roles(["small"], ...)``: the other role's URL may then be missing, and
``build_backend(role)`` builds each role's backend apart.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, cast

from pydantic import (
    BaseModel,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails

from . import _constants
from ._constants import API_KEY_ENV, ROLES, Role
from .backends import BackendKind, create, discover, takes_option
from .errors import ConfigError
from .formats import OutputFormat
from .rules import TakeoverRules, known_preset

if TYPE_CHECKING:
    from .backends.base import Backend
    from .engine import SpeculativeThinker

__all__ = ["API_KEY_ENV", "ROLES", "PairSettings", "Role", "RulesSetting", "SettingsError",
           "TargetErrorPolicy"]

TargetErrorPolicy = Literal["fallback", "raise"]


_REQUIRED_URLS: ContextVar[frozenset[str]] = ContextVar("specthink_required_urls",
                                                        default=frozenset(ROLES))
"""The roles whose URL the settings being built require: both, except inside ``for_roles``."""

logger = logging.getLogger("specthink.settings")


def _rules_value(value: Any) -> TakeoverRules | str:
    if isinstance(value, TakeoverRules):
        return value
    if isinstance(value, dict):  # TakeoverRules as JSON (settings handed to worker processes)
        return TakeoverRules.model_validate(value)
    return known_preset(value)


def _rules_json(value: TakeoverRules | str) -> Any:
    return value if isinstance(value, str) else value.model_dump(mode="json")


RulesSetting = Annotated[TakeoverRules | str, PlainValidator(_rules_value),
                         PlainSerializer(_rules_json)]
"""A ``rules`` setting: ``TakeoverRules``, or a preset name checked against ``PRESETS`` (as
``BackendKind`` checks a protocol), so an unknown one is a ``ConfigError`` naming the presets."""


def _env(variable: str, default: str | None = None) -> Callable[[], Any]:
    return lambda: os.environ.get(variable) or default


def _env_secret() -> SecretStr | None:
    value = os.environ.get(_constants.API_KEY_ENV)
    return SecretStr(value) if value else None


class PairSettings(BaseModel):
    """The two servers and how the engine drives them (the one declaration of these fields).

    >>> settings = PairSettings(small_url="http://gpu0:8080", target_url="http://gpu1:8080")
    >>> thinker = settings.build()
    """

    small_url: str = Field(default_factory=_env(_constants.SMALL_URL_ENV, ""),
                           validate_default=True)
    """The small (speculative) model's server; default ``$SPECTHINK_SMALL_URL``. Required
    (empty only in settings made by ``for_roles`` without the small role)."""
    target_url: str = Field(default_factory=_env(_constants.TARGET_URL_ENV, ""),
                            validate_default=True)
    """The target model's server; default ``$SPECTHINK_TARGET_URL``; required as
    ``small_url``."""
    backend: BackendKind = Field(default_factory=_env(_constants.BACKEND_ENV, "tgi"),
                                 validate_default=True)
    """Wire protocol of both servers, one of ``specthink.backends.kinds()``: TGI's
    ``/generate_stream``, OpenAI ``/v1/completions`` (``openai``), Ollama's ``/api/generate``;
    default ``$SPECTHINK_BACKEND``, else ``tgi``."""
    small_model: str | None = Field(default_factory=_env(_constants.SMALL_MODEL_ENV))
    """Model name sent to an ``openai`` or ``ollama`` small server (default: the one it serves);
    default ``$SPECTHINK_SMALL_MODEL``."""
    target_model: str | None = Field(default_factory=_env(_constants.TARGET_MODEL_ENV))
    """Model name sent to an ``openai`` or ``ollama`` target server."""
    rules: RulesSetting = Field(default_factory=_env(_constants.RULES_ENV, "paper"),
                                validate_default=True)
    """Takeover rules: a preset name (``paper``, ``paper_instruct``, ...) or ``TakeoverRules``;
    default ``$SPECTHINK_RULES``, else ``paper``."""
    small_template: str = "auto"
    """Chat template of the small model: ``auto`` (the server's own where it renders one),
    ``server``, ``chatml``, ``deepseek-r1``, ``llama3``, ``mistral``, a Jinja template source or
    the path of a ``tokenizer_config.json``."""
    target_template: str = "auto"
    """Chat template of the target model, as ``small_template``."""
    response_template: str | None = None
    """How the models mark reasoning and tool calls: a built-in or family name (``gpt-oss``,
    ``qwen3-xml``, ``gemma-4``, ``mistral-reasoning``, ``think-hermes``, ...), ``auto`` (the
    family of ``small_model``), or the path of a tokenizer_config.json whose
    ``response_template`` applies. Default: the ``response_template`` of the small model's
    tokenizer_config.json given as ``small_template``, else the built-in of the family the
    model ids name, else ``think-hermes`` (``<think>`` reasoning, Hermes ``<tool_call>`` JSON
    calls) for unnamed models (TGI, llama.cpp) and instruct pairs; a model id of no known
    family is a ``ConfigError`` naming what to pass."""
    template_kwargs: dict[str, Any] | None = None
    """Variables for both models' chat templates (vLLM's ``chat_template_kwargs``), over the
    thinking switch of each model's family, which is on by default since speculative thinking
    needs reasoning (Gemma 4, Qwen3, Nemotron 3: ``{"enable_thinking": True}``); e.g.
    ``{"enable_thinking": False}`` to switch it off. They reach a server's renderer (vLLM's
    ``/tokenize``, llama.cpp's ``/apply-template``; TGI takes none) and client-side
    templates."""
    on_target_error: TargetErrorPolicy = "fallback"
    """If the target fails: ``fallback`` lets the small model finish alone, ``raise`` raises."""
    api_key: SecretStr | None = Field(default_factory=_env_secret, exclude=True, repr=False)
    """Bearer token for both servers; default ``$SPECTHINK_API_KEY``. Never shown, never
    serialised (LlamaIndex's callbacks log ``to_dict()``)."""
    timeout: float | None = Field(default=None, gt=0)
    """Read timeout: seconds a server may stay silent between two bytes; a long, healthy
    stream is never cut. Default 120 s (5 s to connect)."""
    max_retries: int = Field(default=_constants.DEFAULT_MAX_RETRIES, ge=0)
    """Retries of a request that failed before its first token (429, 503, refused)."""
    routing_headers: tuple[str, ...] | None = None
    """Headers that carry the call's routing key (default ``X-Session-ID``)."""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(exc) or exc from None
        self.pair_output_format()  # a bad response template fails here, before any request

    @classmethod
    def for_roles(cls, roles: Iterable[Role], /, **data: Any) -> Self:
        """Settings whose caller uses only ``roles``' servers (``specthink eval --mode small``
        needs no target): the URL of another role may be missing, and building its backend is
        then a ``ConfigError``. Every other setting is checked as by the constructor."""
        # Pydantic's constructor takes no validation context, and model_validate goes through
        # a model's own __init__: the roles reach the URL validator in a context variable, as
        # pydantic's documentation shows for context at initialisation.
        token = _REQUIRED_URLS.set(frozenset(roles))
        try:
            return cls(**data)
        finally:
            _REQUIRED_URLS.reset(token)

    @field_validator("small_url", "target_url")
    @classmethod
    def _url_given(cls, value: str, info: ValidationInfo) -> str:
        field = info.field_name or ""
        role = field.removesuffix("_url")
        if not value and role in _REQUIRED_URLS.get():
            variable = _constants.URL_ENV[role]
            raise ConfigError(f"no {field}: pass {field}= (or ${variable})", field=field)
        return value

    def pair_output_format(self) -> OutputFormat:
        """The pair's output format (see ``response_template``)."""
        from .formats.families import pair_output_format
        from .rules import resolve_rules

        return pair_output_format(
            self.response_template, small_model=self.small_model,
            target_model=self.target_model, small_template=self.small_template,
            writes_own_reasoning_opening=resolve_rules(self.rules).mode == "instruct")

    def role_template_kwargs(self, role: Role) -> dict[str, Any]:
        """The chat template variables of ``role``'s model: its family's thinking switch (the
        family its model id names, else the one ``response_template`` names), then
        ``template_kwargs`` over it."""
        from .formats.families import thinking_kwargs_for

        model = self.small_model if role == "small" else self.target_model
        return {**thinking_kwargs_for(model, self.response_template),
                **(self.template_kwargs or {})}

    def backend_options(self) -> dict[str, Any]:
        """The options both backends are built with (``specthink.backends.create``)."""
        options: dict[str, Any] = {"api_key": self.api_key, "max_retries": self.max_retries}
        if self.timeout is not None:
            options["read_timeout"] = self.timeout
        if self.routing_headers is not None:
            options["routing_headers"] = self.routing_headers
        return options

    def build_backend(self, role: Role) -> Backend:
        """``role``'s backend, from the core's one factory; a role whose URL these settings
        lack (see ``for_roles``) is a ``ConfigError``."""
        url, model = self._server(role)
        # A model name (which $SPECTHINK_<ROLE>_MODEL may set whatever the protocol) goes only
        # to a kind that takes one, as the commands do.
        named = takes_option(self.backend, "model")
        return create(self.backend, url, **self.backend_options(),
                      **({"model": model} if named else {}))

    def build_backends(self) -> tuple[Backend, Backend]:
        """Both servers' backends, from the core's one factory."""
        return self.build_backend("small"), self.build_backend("target")

    async def detect_backend(self, role: Role) -> Backend:
        """``role``'s backend for the protocol its server answers ``GET /info`` with
        (:func:`~specthink.backends.discover`: TGI, else OpenAI completions), whatever
        ``backend`` says; the commands' ``--backend auto``. It sends that one request."""
        url, model = self._server(role)
        return await discover(url, **self.backend_options(), model=model)

    def _server(self, role: Role) -> tuple[str, str | None]:
        """``role``'s URL and model name."""
        url, model = ((self.small_url, self.small_model) if role == "small"
                      else (self.target_url, self.target_model))
        if not url:
            field = f"{role}_url"
            raise ConfigError(f"no {field}: these settings were made without the {role} "
                              f"model's server; pass {field}=", field=field)
        return url, model

    def build(self, *, backends: tuple[Backend, Backend] | None = None) -> SpeculativeThinker:
        """The engine over ``backends`` (default: the ones these settings describe)."""
        from .engine import SpeculativeThinker

        small, target = backends if backends is not None else self.build_backends()
        server_rendered = [role for role, template in (("small", self.small_template),
                                                        ("target", self.target_template))
                           if template.strip().lower() in ("auto", "server")]
        if self.template_kwargs and self.backend == "tgi" and server_rendered:
            # TGI's /chat_tokenize takes no template kwargs: say so where the user set them.
            logger.warning(
                "template_kwargs %s cannot reach the %s model's template on TGI, which renders "
                "it and takes none; pass a client-side template (the model's "
                "tokenizer_config.json as %s) for them", self.template_kwargs,
                " and ".join(server_rendered),
                " / ".join(f"{role}_template" for role in server_rendered))
        return SpeculativeThinker(small=small, target=target, rules=self.rules,
                                  small_template=self.small_template,
                                  target_template=self.target_template,
                                  on_target_error=self.on_target_error,
                                  output_format=self.pair_output_format(),
                                  small_template_kwargs=self.role_template_kwargs("small"),
                                  target_template_kwargs=self.role_template_kwargs("target"))

    def pair_key(self) -> tuple[Any, ...]:
        """These settings' values: an engine built from them serves while the key is the same
        (a copy made with ``model_copy(update=...)`` shares private state)."""
        return tuple(repr(getattr(self, name)) if name == "rules" else getattr(self, name)
                     for name in PairSettings.model_fields)


class SettingsError(ValidationError, ConfigError):
    """Settings the core refused (an unknown rules preset or backend kind, a missing URL): a
    ``ConfigError`` naming the choices and its ``field``, and also the pydantic
    ``ValidationError`` that code validating a model (LangChain's, LlamaIndex's) expects."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Built by ``from_exception_data`` (pydantic's constructor); ``field`` and ``reason``
        # are set after.
        self.field: str | None = None
        self.reason = ""
        """The core's own message for each refused value, without pydantic's report around
        them: what a command prints."""


def _config_error(exc: ValidationError) -> ConfigError | None:
    """The error to raise for a pydantic error whose cause is the core's own ``ConfigError``,
    with the field it was found in; ``None`` for other errors (raised as they are)."""
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):
            refused = SettingsError.from_exception_data(
                exc.title, cast("list[InitErrorDetails]", exc.errors()))
            refused.field = cause.field or ".".join(str(part) for part in error["loc"]) or None
            refused.reason = "; ".join(_reason(each) for each in exc.errors())
            return refused
    return None


def _reason(error: ErrorDetails) -> str:
    """One refused value: the core's message where the check was the core's, else pydantic's
    message after the field's name."""
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return str(cause)
    return f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
