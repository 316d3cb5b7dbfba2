"""What the ``specthink`` commands share (extra ``cli``): the options that several commands
declare alike, the opening of a pair's backends (``--backend auto`` included), the stderr
console and the check of a rules preset name.

``specthink.cli`` imports this module only when typer is installed. Command modules that
``specthink.cli`` registers (``specthink.evaluation.cli``) import it instead of ``specthink.cli``,
which imports them while it builds its app.

The ``*_option`` functions return the ``typer.Option`` to put in an ``Annotated`` parameter;
``help`` is left out where a command declares the option without one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from specthink import _constants
from specthink._constants import Role
from specthink.backends import Backend, create, discover, kind_of, kinds, takes_option
from specthink.errors import BackendError, ConfigError
from specthink.rules import PRESETS, known_preset

if TYPE_CHECKING:
    from specthink.settings import PairSettings

__all__ = [
    "AUTO",
    "ApiKey",
    "LocalSmallPort",
    "LocalStateDir",
    "LocalTargetPort",
    "ResponseTemplate",
    "SmallModel",
    "SmallTemplate",
    "TargetModel",
    "TargetTemplate",
    "TemplateKwargs",
    "api_key_option",
    "backend_option",
    "error_text",
    "model_option",
    "open_backend",
    "open_backends",
    "preset_name",
    "stderr",
    "template_kwargs_value",
    "template_option",
    "url_option",
]


AUTO = "auto"
"""``--backend auto``: the server's answer to ``GET /info`` picks the protocol."""


def url_option(role: Role, help: str | None = None) -> Any:
    """``--small`` / ``--target``: the role's server URL, or ``SPECTHINK_<ROLE>_URL``."""
    return typer.Option(f"--{role}", envvar=_constants.URL_ENV[role], show_envvar=True,
                        help=help)


def backend_option(help: str | None = None, *, auto: bool = True) -> Any:
    """``--backend``: the wire protocol of both servers, or ``SPECTHINK_BACKEND``; one of the
    factory's :func:`~specthink.backends.kinds` (and ``auto`` where the command detects it), so
    a bad one is a usage error naming them and a new protocol module is a choice at once."""
    choices = [AUTO, *kinds()] if auto else kinds()

    def known(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"{value!r} is not a backend; choose one of "
                                     f"{', '.join(choices)}")
        return value

    return typer.Option("--backend", envvar=_constants.BACKEND_ENV, help=help, callback=known,
                        metavar=f"[{'|'.join(choices)}]")


def model_option(role: Role, help: str | None = None) -> Any:
    """``--small-model`` / ``--target-model``: the model name an OpenAI-compatible server is
    sent, or ``SPECTHINK_<ROLE>_MODEL``."""
    return typer.Option(f"--{role}-model", envvar=_constants.MODEL_ENV[role], help=help)


def template_option(role: Role) -> Any:
    """``--small-template`` / ``--target-template``."""
    return typer.Option(f"--{role}-template",
                        help=f"Chat template of the {role} model (overrides --template).")


def api_key_option(help: str | None = None) -> Any:
    """``--api-key``, or ``SPECTHINK_API_KEY``; never shown as a default."""
    return typer.Option("--api-key", envvar=_constants.API_KEY_ENV, show_default=False,
                        help=help)


def template_kwargs_value(text: str | None) -> dict[str, Any] | None:
    """``--template-kwargs``' JSON object; anything else is a usage error saying so."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--template-kwargs") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("a JSON object, e.g. '{\"enable_thinking\": false}'",
                                 param_hint="--template-kwargs")
    return value


# ---- declared alike by `ask`, `serve` and `eval` -----------------------------------------

ResponseTemplate = Annotated[str | None, typer.Option(
    "--response-template",
    help="How the models mark reasoning and tool calls: a built-in or family name (gpt-oss, "
         "qwen3-xml, gemma-4, mistral-reasoning, ...), auto (the family of --small-model), or "
         "the path of a tokenizer_config.json with a response_template. Default: the family "
         "the model ids name; think-hermes (<think> reasoning, Hermes <tool_call> JSON calls) "
         "for unnamed models and instruct pairs; an unknown model id is refused, naming what "
         "to pass.")]
TemplateKwargs = Annotated[str | None, typer.Option(
    "--template-kwargs", show_default=False,
    help="A JSON object of chat template variables for both models (vLLM's "
         "chat_template_kwargs), over each family's thinking switch, which is on by default: "
         "'{\"enable_thinking\": false}' switches it off.")]

SmallTemplate = Annotated[str | None, template_option("small")]
TargetTemplate = Annotated[str | None, template_option("target")]
SmallModel = Annotated[str | None, model_option(
    "small", help="Model name sent to an OpenAI-compatible small server.")]
TargetModel = Annotated[str | None, model_option(
    "target", help="Model name sent to an OpenAI-compatible target server.")]
ApiKey = Annotated[str | None, api_key_option(
    help="Sent to both servers as Authorization: Bearer.")]

# ---- declared alike by `local down` and `local status` -----------------------------------

LocalSmallPort = Annotated[int | None, typer.Option(
    "--small-port", envvar=_constants.LOCAL_SMALL_PORT_ENV)]
LocalTargetPort = Annotated[int | None, typer.Option(
    "--target-port", envvar=_constants.LOCAL_TARGET_PORT_ENV)]
LocalStateDir = Annotated[Path | None, typer.Option(
    "--state-dir", envvar=_constants.STATE_DIR_ENV, file_okay=False)]


async def open_backend(url: str, kind: str, *, api_key: str | None,
                       model: str | None) -> Backend:
    """The backend ``--backend`` names (``auto``: :func:`~specthink.backends.discover`). The
    model name, which ``SPECTHINK_<ROLE>_MODEL`` may set whatever the protocol, goes only to a
    kind that takes one."""
    if kind == AUTO:
        return await discover(url, api_key=api_key, model=model)
    return create(kind, url, api_key=api_key,
                  model=model if takes_option(kind, "model") else None)


async def open_backends(pair: PairSettings, roles: Sequence[Role], *,
                        detect: bool) -> tuple[PairSettings, dict[Role, Backend]]:
    """The roles' backends, built by the pair's settings; with ``detect`` (``--backend auto``)
    each server's answer to ``GET /info`` picks its protocol, concurrently, and the settings
    returned carry the small model's (the first role's). A failing role's error names it, and
    the other backends are closed."""

    async def one(role: Role) -> Backend:
        try:
            return await pair.detect_backend(role) if detect else pair.build_backend(role)
        except BackendError as exc:
            exc.role = role
            raise

    made = await asyncio.gather(*(one(role) for role in roles), return_exceptions=True)
    opened = {role: outcome for role, outcome in zip(roles, made, strict=True)
              if not isinstance(outcome, BaseException)}
    failed = [outcome for outcome in made if isinstance(outcome, BaseException)]
    if failed:
        await asyncio.gather(*(backend.aclose() for backend in opened.values()))
        raise failed[0]
    if detect and opened:
        first = next(iter(opened.values()))
        pair = pair.model_copy(update={"backend": kind_of(first) or pair.backend})
    return pair, opened


def error_text(error: BaseException) -> str:
    """What a command prints for ``error``: refused settings as the core's message for each
    (not pydantic's report around them), anything else as itself."""
    from specthink.settings import SettingsError

    return error.reason if isinstance(error, SettingsError) and error.reason else str(error)


def stderr() -> Console:
    """Where progress, legends, tables and errors go (stdout is for results)."""
    return Console(stderr=True, highlight=False)


def preset_name(value: str | None) -> str | None:
    """Typer callback: ``value`` unless it names no rules preset."""
    if value is None:
        return None
    try:
        return known_preset(value)  # the core's one check of a preset name
    except ConfigError:
        raise typer.BadParameter(
            f"{value!r} is not a preset; choose one of {', '.join(PRESETS)}") from None
