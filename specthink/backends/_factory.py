"""The one way to build a backend from settings: :func:`create` (a named wire protocol) and
:func:`discover` (the protocol the server answers with), both validated by
:class:`BackendOptions`. The adapters, ``specthink ask``, ``specthink eval`` and ``specthink
bench`` build their backends here, so every option means the same everywhere."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from typing import Annotated, Any, Literal

import httpx
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    SecretStr,
    ValidationError,
    field_validator,
)

from specthink import _constants
from specthink.backends._httpbackend import (
    DEFAULT_ROUTING_HEADERS,
    validate_headers,
    validate_routing_headers,
)
from specthink.backends.base import Backend
from specthink.errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    ConfigError,
)

__all__ = ["BackendKind", "BackendOptions", "backend_class", "create", "discover", "kind_of",
           "kinds", "known_kind", "takes_option"]

_NOT_PROTOCOLS = frozenset({"base"})


def kinds() -> list[str]:
    """The wire protocols :func:`create` knows: each public module of ``specthink.backends``
    (``tgi``, ``openai``, ...) is one, and names its backend class ``BACKEND``. A new protocol
    is one new module."""
    import specthink.backends as package

    return sorted(info.name for info in pkgutil.iter_modules(package.__path__)
                  if not info.name.startswith("_") and info.name not in _NOT_PROTOCOLS)


def known_kind(kind: object) -> str:
    """``kind`` when it is one of :func:`kinds`; else a ``ConfigError`` naming them (also a
    ``ValueError``, so a pydantic field checked with it reports the same message)."""
    known = kinds()
    if not isinstance(kind, str) or kind not in known:
        raise ConfigError(f"unknown backend kind {kind!r}; choose one of {', '.join(known)}")
    return kind


BackendKind = Annotated[str, AfterValidator(known_kind)]
"""A wire protocol's name as a pydantic field: any of :func:`kinds`, checked when the model is
built (the adapters' and ``specthink serve``'s ``backend``), so a new protocol module is
accepted everywhere without another list of names."""


class BackendOptions(BaseModel):
    """The settings of a backend, whatever protocol it speaks.

    Timeouts have one meaning everywhere: ``connect_timeout`` bounds opening a connection and
    ``read_timeout`` the silence between two bytes (``None``: wait for ever). There is no total
    timeout, so a long, healthy stream is never cut.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    connect_timeout: PositiveFloat = _constants.DEFAULT_CONNECT_TIMEOUT
    """Seconds to open a TCP (and TLS) connection."""
    read_timeout: PositiveFloat | None = _constants.DEFAULT_READ_TIMEOUT
    """Seconds between two bytes of an answer before it counts as stalled."""
    max_retries: NonNegativeInt = _constants.DEFAULT_MAX_RETRIES
    """Retries of a request that failed before its first token (429, 503, refused)."""
    retry_backoff: NonNegativeFloat = _constants.RETRY_INITIAL_BACKOFF
    retry_max_backoff: NonNegativeFloat = _constants.RETRY_MAX_BACKOFF
    retry_deadline: NonNegativeFloat | None = _constants.RETRY_DEADLINE
    """No retry starts later than this many seconds after the first attempt."""
    api_key: SecretStr | None = None
    """Sent as ``Authorization: Bearer``; default ``$SPECTHINK_API_KEY``. Never shown."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers on every request."""
    routing_headers: tuple[str, ...] = DEFAULT_ROUTING_HEADERS
    """Headers that carry a call's routing key (see ``docs/scale-out.md``)."""
    transport: Literal["lean", "httpx"] = "lean"
    """``lean``: specthink's own HTTP/1.1 transport (the least client CPU per request, see
    ``docs/architecture.md``); ``httpx``: httpx's (httpcore). A proxy from the environment, or
    a ``client`` passed in, always goes through httpx."""
    client: httpx.AsyncClient | None = None
    """An httpx client to send every request through; it is left open by ``aclose``."""
    model: str | None = None
    """Model name sent to an OpenAI-compatible server (default: the first of ``/v1/models``)."""

    @field_validator("headers", mode="before")
    @classmethod
    def _valid_headers(cls, value: Any) -> dict[str, str]:
        return validate_headers(value)

    @field_validator("routing_headers", mode="before")
    @classmethod
    def _valid_routing_headers(cls, value: Any) -> tuple[str, ...]:
        return validate_routing_headers(value)

    def keywords(self) -> dict[str, Any]:
        """The backend constructor's keyword arguments (``model`` only when set)."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        fields["api_key"] = self.api_key.get_secret_value() if self.api_key else None
        if self.model is None:
            del fields["model"]
        return fields


def options(**values: Any) -> BackendOptions:
    """``BackendOptions(**values)``, with a bad value or an unknown name a ``ConfigError``."""
    try:
        return BackendOptions(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'options'}: {error['msg']}"
            for error in exc.errors())
        raise ConfigError(f"invalid backend options: {problems}") from None


def backend_class(kind: str) -> type[Any]:
    """The class of wire protocol ``kind``; an unknown kind is a ``ConfigError`` naming them."""
    cls: type[Any] = importlib.import_module(f"specthink.backends.{known_kind(kind)}").BACKEND
    return cls


def _keywords(cls: type[Any]) -> set[str]:
    """The keywords ``cls(url, ...)`` takes: its named parameters, and the keys of the
    ``TypedDict`` of an ``**options: Unpack[...]`` (the backends' ``HTTPOptions``)."""
    names: set[str] = set()
    for param in inspect.signature(cls, eval_str=True).parameters.values():
        if param.kind is param.VAR_KEYWORD:
            for typed in typing.get_args(param.annotation):
                names.update(getattr(typed, "__required_keys__", ()),
                             getattr(typed, "__optional_keys__", ()))
        else:
            names.add(param.name)
    return names


def takes_option(kind: str, name: str) -> bool:
    """Whether backends of ``kind`` take option ``name`` (``model``: only servers that name
    the model they serve, so a caller holding one for every kind knows where to pass it)."""
    return name in _keywords(backend_class(kind))


def kind_of(backend: Backend) -> str | None:
    """The kind ``backend`` was built for (``None``: not a class of :func:`kinds`)."""
    return next((kind for kind in kinds() if isinstance(backend, backend_class(kind))), None)


def create(kind: str, url: str, **values: Any) -> Backend:
    """A backend for the server at ``url`` speaking ``kind`` (one of :func:`kinds`).

    ``values`` are :class:`BackendOptions` fields; anything else is a ``ConfigError``, raised
    before any request. Nothing is sent until the backend is used.
    """
    cls = backend_class(kind)
    settings = options(**values)
    keywords = settings.keywords()
    accepted = _keywords(cls)
    for name in keywords:
        if name not in accepted:
            raise ConfigError(f"the {kind} backend takes no {name!r} option")
    backend: Backend = cls(url, **keywords)
    return backend


async def discover(url: str, **values: Any) -> Backend:
    """The backend for the protocol the server at ``url`` speaks: TGI when ``GET /info`` names
    a ``model_id``, else OpenAI-compatible completions (``model`` applies only then). TGI's
    ``/info`` stays cached in the backend, so the detection costs no request later.

    A server that cannot be reached, times out, is overloaded or answers 5xx raises: it is not
    thereby OpenAI-compatible.
    """
    tgi = create("tgi", url, **{k: v for k, v in values.items() if k != "model"})
    try:
        await tgi.info()
    except BackendError as exc:
        await tgi.aclose()
        if isinstance(exc, BackendConnectionError):
            raise BackendConnectionError(f"cannot reach the server: {exc.message}",
                                         url=exc.url) from exc
        if isinstance(exc, BackendTimeoutError) or (
                isinstance(exc, BackendStatusError)
                and (exc.status_code == 429 or exc.status_code >= 500)):
            raise
        return create("openai", url, **values)
    except BaseException:
        await tgi.aclose()
        raise
    return tgi
