"""The built-in chat templates as Jinja files (package data), and the environment every chat
template renders in.

``chatml.jinja``, ``deepseek-r1.jinja``, ``llama3.jinja`` and ``mistral.jinja`` are whole
templates; ``hermes_tools.jinja`` (the tool signatures of the system turn) and
``hermes_tool_calls.jinja`` (an assistant turn's ``<tool_call>`` blocks) are the Hermes/Qwen
pieces they share, included where Qwen2.5's template writes them.
"""

from __future__ import annotations

import json
from datetime import datetime
from importlib import resources
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["BUILTIN_NAMES", "GenerationBlock", "builtin_source", "environment"]

BUILTIN_NAMES = ("chatml", "deepseek-r1", "llama3", "mistral")
"""The whole templates shipped here, by the name ``resolve_template`` accepts."""


def builtin_source(name: str) -> str:
    """The Jinja source of the built-in template ``name`` (one of :data:`BUILTIN_NAMES`)."""
    if name not in BUILTIN_NAMES:
        raise KeyError(name)
    return resources.files(__name__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers replaces Jinja's tojson, which HTML-escapes "<", ">", "&" and "'": a prompt
    # must carry the JSON exactly as the model saw it in training.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, which templates trained for
    ``return_assistant_tokens_mask`` wrap an assistant's text in (Phi-4's and Phi-4-reasoning's,
    SmolLM's): transformers' renderer (``AssistantTracker``, vLLM's too) renders the body as
    written, so a prompt here does the same; the mask it tracks is training's business."""

    tags = {"generation"}  # noqa: RUF012 - jinja2.ext.Extension declares it a plain set

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return str(caller())


def environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers' ``apply_chat_template`` uses (``{% generation %}``
    included), so Hub templates render alike, with this package's files to include. The files
    never change while running: no modification check per render."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, GenerationBlock],
        loader=jinja2.PackageLoader(__name__, "."), auto_reload=False)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
