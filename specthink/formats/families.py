"""The model families specthink knows, and the response template of a role.

A role's template is the one its user hands over (a response template, a family name, or the
model's tokenizer_config.json whose ``response_template`` key applies), else the built-in of the
family its model id names (``data/<family>.json``, data like a checkpoint's own), else a
:class:`~specthink.errors.ConfigError` before any request saying what to pass.

>>> family_of("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B").name
'deepseek-r1'
>>> family_of("openai/gpt-oss-20b").name
'gpt-oss'
>>> family_of("Qwen/Qwen3.5-4B").template
'qwen3-xml'
>>> family_of("ibm-granite/granite-3.3-8b-instruct").thinking_kwargs
{'thinking': True}
>>> family_of("microsoft/Phi-4-reasoning-plus").template
'phi-4-reasoning'
>>> family_of("microsoft/Phi-4-mini-instruct") is None
True
>>> family_of("meta-llama/Llama-3.1-8B-Instruct") is None
True
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import THINK_HERMES, OutputFormat
from .response_template import ResponseTemplate, load_template

__all__ = ["FAMILIES", "Family", "builtin_template", "family_of", "output_format_for",
           "pair_output_format", "response_template_for", "template_names",
           "thinking_kwargs_for"]


@dataclass(frozen=True, slots=True)
class Family:
    """A model family: which ids belong to it and which built-in response template reads it."""

    name: str
    template: str
    """The built-in response template (``data/<template>.json``)."""
    ids: str
    """A regex searched in the lower-cased model id."""
    thinking_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """``chat_template_kwargs`` that switch its chat template's thinking on."""

    def matches(self, model_id: str) -> bool:
        return re.search(self.ids, model_id.lower()) is not None


_THINKING_ON = {"enable_thinking": True}

FAMILIES: tuple[Family, ...] = (
    # Most specific first: R1-0528 is an R1, Qwen3.5 and Qwen3-Coder are Qwen3s, the R1
    # distills are Qwen and Llama models.
    Family("deepseek-r1-0528", "deepseek-r1-0528", r"r1-0528"),
    Family("deepseek-v3.1", "deepseek-v3.1", r"deepseek-v3[.\-_]1", {"thinking": True}),
    Family("deepseek-r1", "deepseek-r1", r"deepseek-r1|deepseek_r1|r1-distill|deepseekr1",
           _THINKING_ON),
    Family("gpt-oss", "gpt-oss", r"gpt-oss|gpt_oss"),
    Family("qwen3.5", "qwen3-xml", r"qwen3\.?5|qwen3_5", _THINKING_ON),
    Family("qwen3-coder", "qwen3-xml", r"qwen3-coder|qwen3_coder"),
    # Nemotron 3 reads as Qwen3.5 but writes one newline between </think> and a call.
    Family("nemotron-3", "nemotron-3", r"nemotron-3|nemotron3", _THINKING_ON),
    Family("qwq", "qwen3", r"qwq", _THINKING_ON),
    Family("qwen3", "qwen3", r"qwen3", _THINKING_ON),
    Family("smollm3", "qwen3", r"smollm3", _THINKING_ON),
    Family("gemma-4", "gemma-4", r"gemma-?4|gemma_4", _THINKING_ON),
    Family("mistral-reasoning", "mistral-reasoning", r"magistral|ministral-3\b.*reasoning"),
    # Granite 3.3 only: Granite 4.0 / 4.1 templates have no thinking switch and call in Hermes
    # <tool_call> blocks, another format.
    Family("granite-3.3", "granite", r"granite[-_]?3\.3", {"thinking": True}),
    # Phi-4-reasoning and -plus only: its template always asks for <think> (no switch) after a
    # "<|im_sep|>" generation prompt. Phi-4 and Phi-4-mini(-instruct) do not reason;
    # Phi-4-mini(-flash)-reasoning and Phi-4-reasoning-vision have other templates.
    Family("phi-4-reasoning", "phi-4-reasoning", r"phi[-_]?4[-_]reasoning(?![-_]vision)"),
)
"""Searched in order; the first family whose ``ids`` match a model id is its family."""


def template_names() -> tuple[str, ...]:
    """The built-in response templates, by name."""
    return tuple(sorted({f.template for f in FAMILIES}))


@cache
def _builtin(name: str) -> ResponseTemplate:
    text = resources.files(__package__).joinpath(f"data/{name}.json").read_text("utf-8")
    return load_template(json.loads(text))


def builtin_template(name: str) -> ResponseTemplate:
    """A built-in response template by its name (see :func:`template_names`) or a family's."""
    key = name.strip().lower()
    family = next((f for f in FAMILIES if f.name == key), None)
    key = family.template if family is not None else key
    if key not in template_names():
        raise ConfigError(f"unknown response template {name!r}; built-ins are "
                          f"{', '.join(template_names())}")
    return _builtin(key)


def family_of(model_id: str) -> Family | None:
    """The family a model id names, or ``None``."""
    return next((f for f in FAMILIES if f.matches(model_id)), None)


def thinking_kwargs_for(model: str | None,
                        response_template: object = None) -> dict[str, Any]:
    """The chat template kwargs that switch thinking on for ``model``: its family's, else those
    of the family a ``response_template`` name names (a family's or a built-in's name, as
    :func:`builtin_template` takes it); none for a model of no known family.

    >>> thinking_kwargs_for("google/gemma-4-31B-it")
    {'enable_thinking': True}
    >>> thinking_kwargs_for("my-org/finetune", "gemma-4")
    {'enable_thinking': True}
    >>> thinking_kwargs_for("openai/gpt-oss-20b")
    {}
    """
    family = family_of(model) if model else None
    if family is None and isinstance(response_template, str):
        key = response_template.strip().lower()
        family = next((f for f in FAMILIES if f.name == key), None) or next(
            (f for f in FAMILIES if f.template == key), None)
    return dict(family.thinking_kwargs) if family is not None else {}


def _from_config(config: Mapping[str, Any], origin: str) -> ResponseTemplate | None:
    """A response template given as itself, or inside a tokenizer_config.json."""
    if "fields" in config:
        return load_template(config)
    inner = config.get("response_template")
    if inner is None:
        return None
    if not isinstance(inner, Mapping):
        raise ConfigError(f"the response_template of {origin} is not an object")
    return load_template(inner)


def response_template_for(model: str | None,
                          given: Mapping[str, Any] | str | Path | ResponseTemplate | None = None,
                          *, role: str = "small") -> ResponseTemplate:
    """The response template of a role, decided before any request.

    ``given`` is what the user handed over: a :class:`ResponseTemplate` or its dict; a
    tokenizer_config.json (a dict or its path), whose ``response_template`` applies when it has
    one; or a built-in's or family's name. Without one that applies, the family of ``model``
    decides; an unknown family is a :class:`ConfigError` naming what to pass.
    """
    if isinstance(given, ResponseTemplate):
        return given
    origin = f"the {role} model's template"
    if isinstance(given, str) and not given.strip().lower().endswith(".json") \
            and "/" not in given and "\\" not in given:
        return builtin_template(given)
    if isinstance(given, (str, Path)):
        path = Path(given).expanduser()
        origin = repr(str(path))
        try:
            given = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the {role} model's tokenizer_config.json "
                              f"{origin}: {exc}") from exc
        if not isinstance(given, Mapping):
            raise ConfigError(f"{origin} does not hold a JSON object")
    if given is not None:
        found = _from_config(given, origin)
        if found is not None:
            return found
    family = family_of(model) if model else None
    if family is not None:
        return _builtin(family.template)
    known = ", ".join(f.name for f in FAMILIES)
    raise ConfigError(
        f"no response template for the {role} model {model or '(no model id)'!r}: it is not a "
        f"family specthink knows ({known}) and its template has no response_template. Pass "
        f"response_template= for the {role} model: one of {', '.join(template_names())}, a "
        "response template dict, or the path of a tokenizer_config.json that has one")


def output_format_for(given: Mapping[str, Any] | str | Path | ResponseTemplate | None,
                      model: str | None = None, *, role: str = "small") -> OutputFormat:
    """The output format a pair reads its models' text with: ``None`` or ``"think-hermes"`` is
    ``<think>`` + Hermes calls; ``"auto"`` the built-in of ``model``'s family (a
    ``ConfigError`` naming what to pass when the family is unknown); anything else as
    :func:`response_template_for` takes it."""
    if given is None or (isinstance(given, str) and given.strip().lower() == THINK_HERMES.name):
        return THINK_HERMES
    if isinstance(given, str) and given.strip().lower() == "auto":
        template = response_template_for(model, None, role=role)
        family = family_of(model or "")
        return OutputFormat.from_template(template, family.name if family else "auto")
    name = given.strip() if isinstance(given, str) else "response-template"
    return OutputFormat.from_template(response_template_for(model, given, role=role), name)


def _tokenizer_config_template(template: str | None) -> ResponseTemplate | None:
    """The ``response_template`` of a chat template given as a tokenizer_config.json path, if
    it has one (a Jinja source, a built-in chat template's name or ``auto`` have none)."""
    if template is None or not template.strip().lower().endswith(".json"):
        return None
    path = Path(template).expanduser()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the chat template's own loading says what is wrong with the file
    return _from_config(config, repr(str(path))) if isinstance(config, Mapping) else None


def pair_output_format(given: Mapping[str, Any] | str | Path | ResponseTemplate | None, *,
                       small_model: str | None = None, target_model: str | None = None,
                       small_template: str | None = None,
                       writes_own_reasoning_opening: bool = False) -> OutputFormat:
    """The output format of a pair, decided once before any request.

    ``given`` (the ``response_template`` setting) wins, as :func:`output_format_for` takes it.
    Without it: the ``response_template`` of the small model's tokenizer_config.json (given as
    its chat template), else the built-in of the family the small (else the target) model id
    names (two ids of families that write different formats are a :class:`ConfigError`), else
    ``<think>`` + Hermes calls (:data:`~specthink.formats.THINK_HERMES`) where that is known to
    be right: no model id at all (TGI and llama.cpp serve one model, unnamed), or
    an instruct pair whose reasoning specthink opens itself
    (``writes_own_reasoning_opening``, the ``paper_instruct`` rules). A model id of no known
    family is a :class:`ConfigError` naming what to pass: read with the wrong format, its
    reasoning would be the answer and its calls text.

    >>> pair_output_format(None, small_model="openai/gpt-oss-20b").name
    'gpt-oss'
    >>> pair_output_format(None).name
    'think-hermes'
    """
    if given is not None:
        return output_format_for(given, small_model)
    from_config = _tokenizer_config_template(small_template)
    if from_config is not None:
        return OutputFormat.from_template(from_config, "tokenizer_config.json")
    families = [(model, family) for model in (small_model, target_model)
                if model and (family := family_of(model)) is not None]
    if len({family.template for _, family in families}) > 1:
        # The target continues the small model's text mid-reasoning: one format for both.
        (small, small_family), (target, target_family) = families
        raise ConfigError(
            f"the small model {small!r} ({small_family.name}) and the target {target!r} "
            f"({target_family.name}) write different formats, and each continues the other's "
            "text: pair two models of one family, or pass response_template to say which "
            "format both write", field="response_template")
    if families:
        family = families[0][1]
        return OutputFormat.from_template(_builtin(family.template), family.name)
    named = [model for model in (small_model, target_model) if model]
    if not named or writes_own_reasoning_opening:
        return THINK_HERMES
    known = ", ".join(f.name for f in FAMILIES)
    raise ConfigError(
        f"no response template for the pair ({' / '.join(map(repr, named))}): no model id names "
        f"a family specthink knows ({known}). Pass response_template: one of "
        f"{', '.join(template_names())}, {THINK_HERMES.name} (<think> reasoning, Hermes "
        "<tool_call> JSON calls), a response template dict, or the path of the small model's "
        "tokenizer_config.json that has one",
        field="response_template")
