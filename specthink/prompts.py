"""Chat templates: from OpenAI-style messages to the prompt text a completion server continues.

A template is chosen per backend (``resolve_template``): the server's own (TGI
``/chat_tokenize``), a built-in (``CHATML`` for Qwen2.5/SmolLM2-style models, ``DEEPSEEK_R1`` for
the R1 distills), or any Hugging Face Jinja chat template. Every path goes through
``render_prompt``, which validates the messages first and drops a leading BOS text when the
server adds BOS itself, so BOS is never sent twice.

The built-ins' Jinja sources are package data (``specthink/templates/*.jinja``); ``"auto"``
(:class:`~specthink.autotemplate.AutoTemplate`, importable from here too) learns a server's
template in :mod:`specthink.autotemplate`.

Tools are rendered in the Hermes/Qwen form: signatures inside ``<tools></tools>`` in the system
turn, calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, results as
``<tool_response>`` blocks in a user turn. ``specthink.tools.parse_tool_calls`` reads the calls
back out of the answer.
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import jinja2

from specthink._json import check_depth
from specthink.backends.base import ServerInfo
from specthink.errors import ConfigError, redact_url
from specthink.templates import builtin_source, environment

if TYPE_CHECKING:  # at run time, imported on first use (see __getattr__): it imports this module
    from specthink.autotemplate import AutoTemplate, LearnedTemplate

__all__ = [
    "CHATML",
    "COMMON_BOS_TOKENS",
    "DEEPSEEK_R1",
    "LLAMA3",
    "MISTRAL",
    "ROLES",
    "AutoTemplate",
    "ChatTemplate",
    "CheckedMessages",
    "CheckedTools",
    "JinjaTemplate",
    "LearnedTemplate",
    "ServerRenderedTemplate",
    "ServerTemplate",
    "TemplateBackend",
    "apply_tool_choice",
    "family_template",
    "render_prompt",
    "required_call",
    "resolve_template",
    "template_from_file",
    "template_kwargs_option",
    "tool_instruction",
    "validate_messages",
    "validate_tools",
]

ROLES = ("system", "user", "assistant", "tool")

COMMON_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>")
"""BOS texts stripped from a rendered prompt when the server adds BOS itself (Llama 2 and
Mistral, Llama 3, DeepSeek)."""


class TemplateBackend(Protocol):
    """The part of a backend a template needs (every ``specthink.backends.Backend`` has it)."""

    url: str
    adds_bos_token: bool
    keeps_tool_turns: bool

    async def render_chat(self, messages: Sequence[dict[str, Any]],
                          tools: Sequence[dict[str, Any]] | None = None, *,
                          tool_choice: str | dict[str, Any] | None = None,
                          chat_template_kwargs: Mapping[str, Any] | None = None,
                          ) -> str | None: ...

    async def info(self) -> ServerInfo: ...


# --- input validation -------------------------------------------------------------------------

def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check OpenAI-style chat messages and return normalised copies.

    Normalised means: ``content`` is a string (``None`` and lists of text parts become strings;
    an assistant turn that only calls tools keeps ``None``), and every ``tool_calls`` item has the
    OpenAI shape ``{"id", "type": "function", "function": {"name", "arguments"}}`` with
    ``arguments`` decoded to a dict when it is a JSON object string, as chat templates expect.

    Raises ``ConfigError`` naming the offending index for an empty list, a missing or unknown
    role, non-text content or a tool call without a function name.
    """
    if isinstance(messages, CheckedMessages):
        return messages  # checked once (a ChatRequest's): the templates take them as they are
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ConfigError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ConfigError("messages is empty: pass at least one message, "
                          "e.g. [{'role': 'user', 'content': 'Hello'}]")
    return CheckedMessages(_validate_message(index, message)
                           for index, message in enumerate(messages))


class CheckedMessages(list[dict[str, Any]]):
    """Messages :func:`validate_messages` returned: checking them again returns them as they
    are, so a request validated once is not validated again by every template on its way."""


class CheckedTools(list[dict[str, Any]]):
    """Tools :func:`validate_tools` returned (see :class:`CheckedMessages`)."""


def _validate_message(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ConfigError(f"{where} is a {type(message).__name__}; expected a dict with "
                          "'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        allowed = ", ".join(repr(r) for r in ROLES)
        got = "no role" if role is None else f"role {role!r}"
        raise ConfigError(f"{where} has {got}; allowed roles: {allowed}")
    normalised = dict(message)
    tool_calls = message.get("tool_calls")
    if role == "assistant" and tool_calls:
        normalised["tool_calls"] = _validate_tool_calls(where, tool_calls)
    else:
        normalised.pop("tool_calls", None)
    content = _text_content(where, message.get("content"))
    normalised["content"] = None if content is None and normalised.get("tool_calls") else (
        content or "")
    if role == "assistant":
        # An earlier turn's reasoning, under whichever name the caller's client uses, goes to
        # the template as reasoning_content: the name vLLM, llama.cpp and the Hub templates
        # that show it (Gemma 4, Qwen3.5, Nemotron 3) read.
        reasoning = next((message[key] for key in _REASONING_KEYS
                          if isinstance(message.get(key), str) and message[key]), None)
        for key in _REASONING_KEYS:
            normalised.pop(key, None)
        if reasoning is not None:
            normalised["reasoning_content"] = reasoning
    return normalised


_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
"""Where OpenAI-style clients put an assistant turn's reasoning (vLLM's and DeepSeek's field,
OpenRouter's and vLLM >= 0.10's, harmony templates')."""


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """A message as a client-side template sees it, as vLLM hands it to one: a call-only turn's
    null content as ``""`` (templates concatenate it: Qwen3, Granite, R1; gpt-oss tests ``in
    message.content``), other keys set to null left out, the reasoning also as ``thinking``, the
    field harmony templates read."""
    out = {key: value for key, value in message.items() if value is not None}
    out.setdefault("content", "")
    reasoning = out.get("reasoning_content")
    return {**out, "thinking": reasoning} if reasoning else out


def template_kwargs_option(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``render_chat``'s keyword for ``kwargs``: none when there are none, so a backend written
    before the template kwargs existed is still called as it expects."""
    return {"chat_template_kwargs": dict(kwargs)} if kwargs else {}


def _text_content(where: str, content: object) -> str | None:
    if content is None or isinstance(content, str):
        return content
    # OpenAI's list-of-parts form; only text parts can reach a text-completion model.
    if isinstance(content, list) and all(
            isinstance(part, Mapping) and part.get("type") == "text"
            and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise ConfigError(f"{where}.content is a {type(content).__name__}; expected a string "
                      "(or a list of {'type': 'text', 'text': ...} parts)")


def _validate_tool_calls(where: str, tool_calls: object) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list):
        raise ConfigError(f"{where}.tool_calls is a {type(tool_calls).__name__}; expected a list")
    calls = []
    for number, call in enumerate(tool_calls):
        if not isinstance(call, Mapping):
            raise ConfigError(f"{where}.tool_calls[{number}] is a {type(call).__name__}; "
                              "expected a dict")
        # The OpenAI shape nests name/arguments under "function"; LangChain's is flat.
        function = call.get("function", call)
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.tool_calls[{number}] has no function name")
        arguments = function.get("arguments", function.get("args", {}))
        calls.append({"id": str(call.get("id") or ""), "type": "function",
                      "function": {"name": name, "arguments": _decode_arguments(arguments)}})
    return calls


def _decode_arguments(arguments: object) -> object:
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments)
        except ValueError:
            return arguments
        return decoded if isinstance(decoded, dict) else arguments
    return {} if arguments is None else arguments


def validate_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Check tool definitions; return them in the OpenAI form, or ``None`` when there are none.

    Accepts ``{"type": "function", "function": {"name", "description", "parameters"}}`` and the
    bare function dict, which is wrapped.
    """
    if not tools:
        return None
    if isinstance(tools, CheckedTools):
        return tools
    return CheckedTools(_validate_tool(index, tool) for index, tool in enumerate(tools))


def _validate_tool(index: int, tool: object) -> dict[str, Any]:
    if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
        function = tool["function"]
        wrapped = dict(tool)
    elif isinstance(tool, Mapping):
        function = tool
        wrapped = {"type": "function", "function": dict(tool)}
    else:
        raise ConfigError(f"tools[{index}] is a {type(tool).__name__}; expected a dict")
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ConfigError(f"tools[{index}] has no function name")
    check_depth(tool, f"tools[{index}]")  # templates and json.dumps recurse through it
    return wrapped


def _tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(tool["function"]["name"]) for tool in tools]


# --- tool_choice -----------------------------------------------------------------------------

def tool_instruction(tool_choice: str | Mapping[str, Any] | None,
                     tools: Sequence[Mapping[str, Any]] | None) -> str | None:
    """The system sentence that asks for the ``tool_choice``, or ``None`` when none is needed.

    ``"auto"``/``None``/``"none"`` need none; ``"required"`` (alias ``"any"``) asks for one of the
    tools; a tool name, or OpenAI's ``{"type": "function", "function": {"name": ...}}``, asks for
    that tool. A name that is not among ``tools`` is a ``ConfigError`` listing the offered tools.
    """
    name = _chosen_name(tool_choice)
    if name in (None, "auto", "none"):
        return None
    offered = _tool_names(validate_tools(tools) or [])
    if not offered:
        raise ConfigError(f"tool_choice={name!r} needs tools, but no tools were given")
    if name in ("required", "any"):
        return "You must call one of the tools."
    if name not in offered:
        raise ConfigError(f"tool_choice names the tool {name!r}, which is not among the tools "
                          f"offered: {', '.join(offered)}")
    return f"You must call the tool {name}."


def _chosen_name(tool_choice: str | Mapping[str, Any] | None) -> str | None:
    if tool_choice is None or isinstance(tool_choice, str):
        return tool_choice
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else tool_choice.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"tool_choice {dict(tool_choice)!r} names no function; expected "
                          "{'type': 'function', 'function': {'name': ...}}")
    return name


def apply_tool_choice(messages: Sequence[Mapping[str, Any]],
                      tools: Sequence[Mapping[str, Any]] | None,
                      tool_choice: str | Mapping[str, Any] | None = "auto",
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Turn ``tool_choice`` into what a text model can see: the messages and tools to render.

    - ``"auto"``: unchanged;
    - ``"none"``: the tools are not rendered at all;
    - ``"required"``/``"any"``: an instruction to call one of the tools;
    - a tool name: only that tool is rendered, with an instruction to call it (TGI narrows the
      tools the same way).

    The instruction is appended to the leading system message, or becomes one.
    """
    valid_messages = validate_messages(messages)
    valid_tools = validate_tools(tools)
    name = _chosen_name(tool_choice)
    if name == "none":
        return valid_messages, None
    instruction = tool_instruction(tool_choice, valid_tools)
    if instruction is None or valid_tools is None:
        return valid_messages, valid_tools
    if name not in ("required", "any"):
        valid_tools = CheckedTools(
            tool for tool in valid_tools if tool["function"]["name"] == name)
    shaped = CheckedMessages(valid_messages)  # a copy: checked messages may be the caller's
    first = shaped[0]
    if first["role"] == "system":
        text = first["content"]
        shaped[0] = {**first, "content": f"{text}\n\n{instruction}" if text else instruction}
    else:
        shaped.insert(0, {"role": "system", "content": instruction})
    return shaped, valid_tools


def required_call(tool_choice: str | Mapping[str, Any] | None,
                  tools: Sequence[Mapping[str, Any]] | None) -> tuple[bool, str | None]:
    """``(required, name)``: whether ``tool_choice`` requires a call, and of which tool
    (``None``: any; a single offered tool is that tool). Checked as :func:`tool_instruction`."""
    if tool_instruction(tool_choice, tools) is None:
        return False, None
    name = _chosen_name(tool_choice)
    if name in ("required", "any"):
        offered = _tool_names(validate_tools(tools) or [])
        return True, offered[0] if len(offered) == 1 else None
    return True, name


def _wire_tool_choice(tool_choice: str | Mapping[str, Any] | None,
                      tools: Sequence[Mapping[str, Any]] | None) -> str | dict[str, Any] | None:
    """``tool_choice`` as OpenAI-style servers take it: ``"auto"``, ``"none"``, ``"required"``
    (LangChain's ``"any"``) or ``{"type": "function", "function": {"name": ...}}``."""
    if not tools or tool_choice is None:
        return None
    name = _chosen_name(tool_choice)
    if name in ("auto", "none"):
        return name
    if name in ("required", "any"):
        return "required"
    return {"type": "function", "function": {"name": name}}


# --- templates -------------------------------------------------------------------------------

class ChatTemplate(ABC):
    """Renders validated messages and tools into a prompt that ends with the generation prompt."""

    bos_token: str = ""
    """The BOS text this template writes first ("" if none); stripped when the server adds BOS."""
    template_kwargs: Mapping[str, Any] = MappingProxyType({})
    """Variables handed to the chat template beside the messages (a server renderer's
    ``chat_template_kwargs``), such as ``{"enable_thinking": True}``; set by
    :meth:`with_template_kwargs`."""

    def with_template_kwargs(self, kwargs: Mapping[str, Any] | None) -> ChatTemplate:
        """This template rendering with ``kwargs`` too (itself when there are none); a copy,
        so a template shared by several pairs keeps its own."""
        if not kwargs:
            return self
        changed = copy.copy(self)
        changed.template_kwargs = MappingProxyType({**self.template_kwargs, **kwargs})
        return changed

    @abstractmethod
    async def render(self, messages: Sequence[Mapping[str, Any]],
                     tools: Sequence[Mapping[str, Any]] | None,
                     backend: TemplateBackend) -> str:
        """The full prompt text, ending with the assistant's generation prompt."""


class ServerRenderedTemplate(ChatTemplate):
    """A template the server may apply itself, so it is told the caller's ``tool_choice``:
    ``messages`` and ``tools`` are already shaped by it (:func:`apply_tool_choice`), and the
    server must offer no escape it would not honour (TGI's ``no_tool``)."""

    @abstractmethod
    async def render(self, messages: Sequence[Mapping[str, Any]],
                     tools: Sequence[Mapping[str, Any]] | None, backend: TemplateBackend, *,
                     tool_choice: str | Mapping[str, Any] | None = None) -> str:
        """The full prompt text, ending with the assistant's generation prompt."""


class JinjaTemplate(ChatTemplate):
    """A Hugging Face style chat template (``tokenizer_config.json``'s ``chat_template``).

    Rendered in a sandbox as ``transformers`` does: ``trim_blocks``/``lstrip_blocks``,
    ``raise_exception``, a non-escaping ``tojson``, and the variables ``messages``, ``tools``,
    ``add_generation_prompt=True``, ``bos_token`` and ``eos_token``. ``variables`` adds more
    (e.g. ``{"enable_thinking": False}``).

    >>> template = JinjaTemplate("{% for m in messages %}[{{ m.role }}] {{ m.content }}\\n"
    ...                          "{% endfor %}[assistant] ")
    >>> template.render_text([{"role": "user", "content": "Hi"}])
    '[user] Hi\\n[assistant] '
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 variables: Mapping[str, Any] | None = None) -> None:
        try:
            self._template = environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"chat template does not compile: {exc.message} "
                              f"(line {exc.lineno})") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.variables = dict(variables or {})

    def render_text(self, messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt for ``messages`` and ``tools``; template errors become ``ConfigError``."""
        try:
            return self._template.render(
                **self.variables, **self.template_kwargs,
                messages=[_for_template(m) for m in validate_messages(messages)],
                tools=validate_tools(tools), add_generation_prompt=True,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except (jinja2.TemplateError, TypeError) as exc:
            raise ConfigError(f"chat template failed on these messages: {exc}") from exc

    async def render(self, messages: Sequence[Mapping[str, Any]],
                     tools: Sequence[Mapping[str, Any]] | None,
                     backend: TemplateBackend) -> str:
        return self.render_text(messages, tools)

    def __repr__(self) -> str:
        return f"JinjaTemplate(<{len(self.source)} characters>, bos_token={self.bos_token!r})"


class ServerTemplate(ServerRenderedTemplate):
    """The server's own chat template (TGI ``/chat_tokenize``, its ``templated_text``).

    TGI keeps only role and content of each message, so assistant ``tool_calls`` reach the
    template flattened; pick a client-side template for multi-turn tool conversations.
    """

    async def render(self, messages: Sequence[Mapping[str, Any]],
                     tools: Sequence[Mapping[str, Any]] | None, backend: TemplateBackend, *,
                     tool_choice: str | Mapping[str, Any] | None = None) -> str:
        text = await backend.render_chat(validate_messages(messages), validate_tools(tools),
                                         tool_choice=_wire_tool_choice(tool_choice, tools),
                                         **template_kwargs_option(self.template_kwargs))
        if text is None:
            raise ConfigError(
                f"the server {redact_url(backend.url)} cannot render chat templates; choose a "
                f"client-side template: {', '.join(repr(n) for n in _BUILTIN)}, a Jinja "
                "template source or the path of the model's tokenizer_config.json")
        return text

    def __repr__(self) -> str:
        return "ServerTemplate()"


CHATML = JinjaTemplate(builtin_source("chatml"), eos_token="<|im_end|>")
"""ChatML as Qwen2.5-Instruct lays it out, tools included (``<tools>`` in the system turn,
``<tool_call>`` blocks, ``<tool_response>`` in a user turn); SmolLM2 uses the same turns.
Unlike those templates it adds no default system prompt ("You are Qwen, ...", "You are a
helpful AI assistant named SmolLM, ..."); pass ``variables={"default_system": ...}`` to a
``JinjaTemplate(CHATML.source, ...)`` for one."""

DEEPSEEK_R1 = JinjaTemplate(builtin_source("deepseek-r1"), bos_token="<｜begin▁of▁sentence｜>",
                            eos_token="<｜end▁of▁sentence｜>")
"""The DeepSeek-R1-Distill template: BOS, the system text, ``<｜User｜>``/``<｜Assistant｜>``
turns, earlier answers without their reasoning, and the generation prompt
``<｜Assistant｜><think>\\n`` (so the output begins inside the reasoning). Tools use the Hermes
form in the system text, since the distills never learnt DeepSeek-V3's tool tokens."""

LLAMA3 = JinjaTemplate(builtin_source("llama3"), bos_token="<|begin_of_text|>",
                       eos_token="<|eot_id|>")
"""Llama 3 / 3.1 / 3.3 Instruct turns (``<|start_header_id|>role<|end_header_id|>``), each text
trimmed as Meta's template trims it; tools in the Hermes form in the system turn, results in an
``ipython`` turn. (3.1's template also writes knowledge and today's dates into the system turn;
this one does not.)"""

MISTRAL = JinjaTemplate(builtin_source("mistral"), bos_token="<s>", eos_token="</s>")
"""Mistral Instruct turns (``[INST] ... [/INST]``), the system text at the start of the first
user turn; tools in the Hermes form."""

_BUILTIN: dict[str, ChatTemplate] = {"chatml": CHATML, "deepseek-r1": DEEPSEEK_R1,
                                     "llama3": LLAMA3, "mistral": MISTRAL}

_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Most specific first: the R1 distills are Qwen and Llama models.
    ("deepseek-r1", ("deepseek-r1", "deepseek_r1", "r1-distill", "deepseekr1")),
    ("llama3", ("llama-3", "llama3", "llama_3")),
    ("mistral", ("mistral", "mixtral", "magistral", "ministral", "devstral")),
    ("chatml", ("qwen", "smollm", "hermes", "chatml", "openhermes", "yi-")),
)
"""Built-in template of a model family, found by a substring of the lower-cased model id."""


def family_template(model_id: str) -> str | None:
    """The built-in template name for ``model_id``, or ``None`` for an unknown family.

    >>> family_template("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    'deepseek-r1'
    >>> family_template("meta-llama/Llama-3.1-8B-Instruct")
    'llama3'
    >>> family_template("google/gemma-3-4b-it") is None
    True
    """
    lowered = model_id.lower()
    for name, needles in _FAMILIES:
        if any(needle in lowered for needle in needles):
            return name
    return None


def template_from_file(path: str | Path) -> JinjaTemplate:
    """A ``JinjaTemplate`` from a Hugging Face ``tokenizer_config.json`` (its ``chat_template``,
    ``bos_token`` and ``eos_token``), or from a ``.jinja`` file holding the template alone."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the chat template file {str(file)!r}: {exc}") from exc
    if file.suffix != ".json":
        return JinjaTemplate(text)
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{str(file)!r} is not JSON: {exc}") from exc
    source = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(source, list):  # several named templates: "default" is the chat one
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{str(file)!r} has no chat_template")
    return JinjaTemplate(source, bos_token=_special_text(config.get("bos_token")),
                         eos_token=_special_text(config.get("eos_token")))


def _special_text(token: object) -> str:
    if isinstance(token, dict):  # {"content": "<s>", "lstrip": false, ...}
        token = token.get("content")
    return token if isinstance(token, str) else ""


def resolve_template(spec: ChatTemplate | str | Path, role: str = "small") -> ChatTemplate:
    """The template ``spec`` names; checked at once, so a bad name fails before any request.

    ``spec`` is a ``ChatTemplate``; ``"auto"`` (:class:`AutoTemplate`); ``"server"``; a built-in
    name (``"chatml"``, ``"deepseek-r1"``, ``"llama3"``, ``"mistral"``); a Jinja template
    source; or the path of a ``tokenizer_config.json`` / ``.jinja`` file.
    """
    if isinstance(spec, ChatTemplate):
        return spec
    if isinstance(spec, Path):
        return template_from_file(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"chat template must be a ChatTemplate or a string, "
                          f"got {type(spec).__name__}")
    if "{%" in spec or "{{" in spec:
        return JinjaTemplate(spec)
    name = spec.strip().lower().replace("_", "-")
    if name == "auto":
        from specthink.autotemplate import AutoTemplate

        return AutoTemplate(role)
    if name == "server":
        return ServerTemplate()
    if name in _BUILTIN:
        return _BUILTIN[name]
    if name.endswith((".json", ".jinja", ".j2")) or "/" in name or "\\" in name:
        return template_from_file(spec.strip())
    raise ConfigError(f"unknown chat template {spec!r}; choose 'auto', 'server', "
                      f"{', '.join(repr(n) for n in _BUILTIN)}, a Jinja template source, or "
                      "the path of a tokenizer_config.json")


async def render_prompt(template: ChatTemplate, messages: Sequence[Mapping[str, Any]],
                        tools: Sequence[Mapping[str, Any]] | None, backend: TemplateBackend,
                        *, tool_choice: str | Mapping[str, Any] | None = "auto",
                        tool_choice_applied: bool = False) -> str:
    """Validate, apply ``tool_choice``, render, and drop a leading BOS the server would repeat.

    ``tool_choice_applied``: ``messages`` and ``tools`` are already shaped by
    :func:`apply_tool_choice` (a ``ChatRequest``'s ``prompt_messages`` and ``prompt_tools``);
    ``tool_choice`` then only tells a server-rendered template what was asked.
    """
    if tool_choice_applied:
        valid_messages, valid_tools = validate_messages(messages), validate_tools(tools)
    else:
        valid_messages, valid_tools = apply_tool_choice(messages, tools, tool_choice)
    if isinstance(template, ServerRenderedTemplate):
        prompt = await template.render(valid_messages, valid_tools, backend,
                                       tool_choice=tool_choice if valid_tools else None)
    else:
        prompt = await template.render(valid_messages, valid_tools, backend)
    if backend.adds_bos_token:
        for bos in (template.bos_token, *COMMON_BOS_TOKENS):
            if bos and prompt.startswith(bos):
                return prompt[len(bos):]
    return prompt


def __getattr__(name: str) -> Any:
    # AutoTemplate and LearnedTemplate live in specthink.autotemplate, which builds on this
    # module; they stay importable from here, where callers have always found them.
    if name in ("AutoTemplate", "LearnedTemplate"):
        from specthink import autotemplate

        return getattr(autotemplate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
