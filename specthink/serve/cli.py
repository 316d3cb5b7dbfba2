"""The ``serve`` command: ``specthink serve --small URL --target URL [...]``.

Registered on the ``specthink`` app by :func:`register`; it needs only typer to be listed, and
the ``server`` extra (starlette, uvicorn, prometheus-client) to run, which it says when missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from typing import Annotated

import typer
from pydantic import SecretStr, ValidationError

from specthink._cli_options import (
    ResponseTemplate,
    TemplateKwargs,
    backend_option,
    model_option,
    preset_name,
    stderr,
    template_kwargs_value,
    url_option,
)
from specthink.errors import ConfigError, redact_url
from specthink.serve.settings import (
    ENV_CLIENT_KEYS,
    ENV_UPSTREAM_KEY,
    ReasoningField,
    ServeSettings,
    parse_keys,
)

__all__ = ["INSTALL_HINT", "register", "serve"]

INSTALL_HINT = "specthink serve needs the `server` extra: pip install 'specthink[server]'"
APP_FACTORY = "specthink.serve.app:app_from_environment"


def _settings(**values: object) -> ServeSettings:
    try:
        return ServeSettings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise typer.BadParameter(f"{where}: {first['msg']}") from None
    except ConfigError as exc:  # a response template that cannot be read, checked at once
        raise typer.BadParameter(str(exc)) from None


def serve(
    small: Annotated[str, url_option("small", help="The small model's server.")],
    target: Annotated[str, url_option("target", help="The target model's server.")],
    backend: Annotated[str, backend_option(
        help="Wire protocol of both servers (openai: /v1/completions).", auto=False)] = "tgi",
    host: Annotated[str, typer.Option(
        envvar="SPECTHINK_SERVE_HOST", help="Interface to bind (127.0.0.1 unless told).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="SPECTHINK_SERVE_PORT")] = 8000,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", show_default=False,
        help="A key clients must send as Authorization: Bearer (repeatable; default "
             f"${ENV_CLIENT_KEYS}, comma-separated). None: the server is open.")] = None,
    model_name: Annotated[str, typer.Option(
        envvar="SPECTHINK_SERVE_MODEL_NAME", help="The model id clients ask for.")]
    = "specthink",
    rules: Annotated[str, typer.Option(
        envvar="SPECTHINK_RULES", callback=preset_name,
        help="Default takeover rules preset (a request may choose another).")] = "paper",
    small_template: Annotated[str, typer.Option(
        help="Chat template of the small model (auto, server, chatml, deepseek-r1).")]
    = "auto",
    target_template: Annotated[str, typer.Option(
        help="Chat template of the target model.")] = "auto",
    response_template: ResponseTemplate = None,
    template_kwargs: TemplateKwargs = None,
    max_tokens: Annotated[int, typer.Option(
        envvar="SPECTHINK_SERVE_MAX_TOKENS",
        help="Default and upper bound of a request's max_tokens.")] = 4096,
    workers: Annotated[int, typer.Option(
        envvar="SPECTHINK_SERVE_WORKERS", min=1, help="Worker processes (uvicorn).")] = 1,
    max_concurrency: Annotated[int | None, typer.Option(
        envvar="SPECTHINK_SERVE_MAX_CONCURRENCY", min=1,
        help="Chat requests in flight per worker; more are answered 429.")] = None,
    reasoning_field: Annotated[ReasoningField, typer.Option(
        envvar="SPECTHINK_SERVE_REASONING_FIELD",
        help="Where the reasoning goes: both, reasoning_content or reasoning.")] = "both",
    on_target_error: Annotated[str, typer.Option(
        envvar="SPECTHINK_ON_TARGET_ERROR",
        help="fallback (the small model finishes alone) or raise (502/503).")] = "fallback",
    drain_timeout: Annotated[float, typer.Option(
        envvar="SPECTHINK_SERVE_DRAIN_TIMEOUT",
        help="Seconds in-flight requests may take to finish after SIGTERM.")] = 30.0,
    max_body_bytes: Annotated[int, typer.Option(
        envvar="SPECTHINK_SERVE_MAX_BODY_BYTES", help="Larger request bodies get 413.")]
    = 4 * 1024 * 1024,
    max_header_bytes: Annotated[int, typer.Option(
        envvar="SPECTHINK_SERVE_MAX_HEADER_BYTES",
        help="Larger request heads (request line and headers) get 431.")] = 64 * 1024,
    header_timeout: Annotated[float, typer.Option(
        envvar="SPECTHINK_SERVE_HEADER_TIMEOUT",
        help="Seconds a client may take to send a request head (then 408).")] = 20.0,
    responses_store: Annotated[int, typer.Option(
        envvar="SPECTHINK_SERVE_RESPONSES_STORE", min=0,
        help="Responses API answers each worker keeps for previous_response_id (0: none).")]
    = 1024,
    responses_ttl: Annotated[float, typer.Option(
        envvar="SPECTHINK_SERVE_RESPONSES_TTL",
        help="Seconds a kept Responses API answer stays readable.")] = 3600.0,
    small_model: Annotated[str | None, model_option(
        "small", help="Model name sent to an OpenAI-compatible small server.")] = None,
    target_model: Annotated[str | None, model_option(
        "target", help="Model name sent to an OpenAI-compatible target server.")] = None,
) -> None:
    """Serve speculative thinking as an OpenAI-compatible API: /v1/chat/completions and
    /v1/responses (streamed or not), /v1/models, /health and /metrics."""
    try:
        import uvicorn

        from specthink.serve import _http
        from specthink.serve.app import create_app, header_limits
    except ImportError:
        stderr().print(INSTALL_HINT, markup=False)
        raise typer.Exit(1) from None
    keys = api_key or list(parse_keys(os.environ.get(ENV_CLIENT_KEYS, "")))
    upstream = os.environ.get(ENV_UPSTREAM_KEY) or None
    settings = _settings(
        small_url=small, target_url=target, backend=backend, small_model=small_model,
        target_model=target_model, api_key=SecretStr(upstream) if upstream else None,
        api_keys=tuple(SecretStr(key) for key in keys), model_name=model_name, rules=rules,
        small_template=small_template, target_template=target_template,
        response_template=response_template,
        template_kwargs=template_kwargs_value(template_kwargs), max_tokens=max_tokens,
        max_concurrency=max_concurrency,
        reasoning_field=reasoning_field, on_target_error=on_target_error,
        max_body_bytes=max_body_bytes, drain_timeout=drain_timeout,
        max_header_bytes=max_header_bytes, header_timeout=header_timeout,
        responses_store=responses_store, responses_ttl=responses_ttl)
    console = stderr()
    runtime = event_loop_and_parser()
    console.print(f"specthink serve: http://{host}:{port}/v1 serves {model_name!r} "
                  f"(small {redact_url(small)}, target {redact_url(target)}, {backend}; "
                  f"{workers} worker(s); "
                  f"{runtime['loop']}, {runtime['http']})")
    if settings.open:
        console.print("[bold yellow]warning:[/] no API key set (--api-key or "
                      f"{ENV_CLIENT_KEYS}): every client is served", soft_wrap=True)
    options: dict[str, object] = {
        "host": host, "port": port, "timeout_graceful_shutdown": drain_timeout,
        "log_level": "info", "lifespan": "on", **runtime,
        "http": _http.protocol_path(runtime["http"])}
    _http.configure(header_limits(settings))
    if workers == 1:
        uvicorn.run(create_app(settings, freeze_heap=True), **options)  # type: ignore[arg-type]
        return
    # Worker processes rebuild the settings from the environment; metrics go through files
    # that /metrics in any worker sums up.
    os.environ.update(settings.to_environment())
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    made = metrics_dir is None
    if metrics_dir is None:
        metrics_dir = tempfile.mkdtemp(prefix="specthink-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run(APP_FACTORY, factory=True, workers=workers, **options)  # type: ignore[arg-type]
    finally:
        if made:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def event_loop_and_parser() -> dict[str, str]:
    """uvicorn's ``loop`` and ``http``: uvloop and httptools where installed (the ``server``
    extra brings both; under a burst of 256 streams they cut the time to first token the
    server adds about fourfold, docs/benchmarks/serve.md), else asyncio's loop and h11."""
    return {"loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            "http": "httptools" if importlib.util.find_spec("httptools") else "h11"}


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the ``specthink`` application."""
    app.command("serve")(serve)
