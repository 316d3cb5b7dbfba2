"""Chat templates: from OpenAI-style messages to the prompt text a completion server continues.

A template is chosen per backend (``resolve_template``): the server's own (TGI
``/chat_tokenize``), a built-in (``CHATML`` for Qwen2.5/SmolLM2-style models, ``DEEPSEEK_R1`` for
the R1 distills), or any Hugging Face Jinja chat template. Every path goes through
``render_prompt``, which validates the messages first and drops a leading BOS text when the
server adds BOS itself, so BOS is never sent twice.

Tools are rendered in the Hermes/Qwen form: signatures inside ``<tools></tools>`` in the system
turn, calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, results as
``<tool_response>`` blocks in a user turn. ``specthink.tools.parse_tool_calls`` reads the calls
back out of the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Protocol

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from specthink.backends.base import ServerInfo
from specthink.errors import BackendError, ConfigError
from specthink.trace import REASONING_START

__all__ = [
    "CHATML",
    "COMMON_BOS_TOKENS",
    "DEEPSEEK_R1",
    "LLAMA3",
    "MISTRAL",
    "ROLES",
    "AutoTemplate",
    "ChatTemplate",
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
    "tool_instruction",
    "validate_messages",
    "validate_tools",
]

logger = logging.getLogger("specthink.prompts")

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
                          tool_choice: str | dict[str, Any] | None = None) -> str | None: ...

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
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ConfigError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ConfigError("messages is empty: pass at least one message, "
                          "e.g. [{'role': 'user', 'content': 'Hello'}]")
    return [_validate_message(index, message) for index, message in enumerate(messages)]


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
    return normalised


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
    out = []
    for index, tool in enumerate(tools):
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
        out.append(wrapped)
    return out


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
        valid_tools = [tool for tool in valid_tools if tool["function"]["name"] == name]
    first = valid_messages[0]
    if first["role"] == "system":
        text = first["content"]
        first["content"] = f"{text}\n\n{instruction}" if text else instruction
    else:
        valid_messages.insert(0, {"role": "system", "content": instruction})
    return valid_messages, valid_tools


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


def _environment() -> ImmutableSandboxedEnvironment:
    # The environment transformers' apply_chat_template uses, so Hub templates render alike.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


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
            self._template = _environment().from_string(source)
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
                **self.variables, messages=validate_messages(messages),
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
                                         tool_choice=_wire_tool_choice(tool_choice, tools))
        if text is None:
            raise ConfigError(
                f"the server {backend.url} cannot render chat templates; choose a client-side "
                f"template: {', '.join(repr(n) for n in _BUILTIN)}, a Jinja template source or "
                "the path of the model's tokenizer_config.json")
        return text

    def __repr__(self) -> str:
        return "ServerTemplate()"


# The Hermes tool section and tool-call layout of Qwen2.5's chat template, shared by both
# built-ins. Jinja reads the "\n" escapes, hence raw strings.
_TOOLS_SECTION = r"""
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>" }}
"""  # noqa: E501

_TOOL_CALLS = r"""
        {%- for tool_call in message.tool_calls %}
            {%- if content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' + tool_call.function.name + '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
"""

_CHATML_SOURCE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- elif default_system %}
        {{- default_system + '\n\n' }}
    {%- endif %}
""" + _TOOLS_SECTION + r"""
    {{- '<|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- elif default_system %}
    {{- '<|im_start|>system\n' + default_system + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content or '' %}
        {{- '<|im_start|>assistant\n' + content }}
""" + _TOOL_CALLS + r"""
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501

_DEEPSEEK_R1_SOURCE = r"""
{%- set ns = namespace(system='') %}
{%- for message in messages if message.role == 'system' %}
    {%- set ns.system = ns.system + ('\n\n' if ns.system else '') + message.content %}
{%- endfor %}
{{- bos_token + ns.system }}
{%- if tools %}
    {%- if ns.system %}
        {{- '\n\n' }}
    {%- endif %}
""" + _TOOLS_SECTION + r"""
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {{- '<｜User｜>' + message.content }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content or '' %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {{- '<｜Assistant｜>' + content }}
""" + _TOOL_CALLS + r"""
        {{- '<｜end▁of▁sentence｜>' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<｜User｜>' }}
        {%- else %}
            {{- '\n' }}
        {%- endif %}
        {{- '<tool_response>\n' + message.content + '\n</tool_response>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<｜Assistant｜><think>\n' }}
{%- endif %}
"""

_LLAMA3_SOURCE = r"""
{%- set ns = namespace(system='') %}
{%- for message in messages if message.role == 'system' %}
    {%- set ns.system = ns.system + ('\n\n' if ns.system else '') + message.content | trim %}
{%- endfor %}
{{- bos_token }}
{%- if ns.system or tools %}
    {{- '<|start_header_id|>system<|end_header_id|>\n\n' + ns.system }}
    {%- if tools %}
        {%- if ns.system %}
            {{- '\n\n' }}
        {%- endif %}
""" + _TOOLS_SECTION + r"""
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {{- '<|start_header_id|>user<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = (message.content or '') | trim %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' + content }}
""" + _TOOL_CALLS + r"""
        {{- '<|eot_id|>' }}
    {%- elif message.role == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n<tool_response>\n' + message.content + '\n</tool_response><|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501

_MISTRAL_SOURCE = r"""
{%- set ns = namespace(system='', pending=False) %}
{%- for message in messages if message.role == 'system' %}
    {%- set ns.system = ns.system + ('\n\n' if ns.system else '') + message.content %}
{%- endfor %}
{%- if tools %}
    {%- set ns.system = ns.system + ('\n\n' if ns.system else '') %}
{%- endif %}
{{- bos_token }}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {{- '[INST] ' }}
        {%- if loop.first or (ns.system and not ns.pending) %}
            {%- if tools and not ns.pending %}
""" + _TOOLS_SECTION + r"""
                {{- '\n\n' }}
            {%- endif %}
            {%- if ns.system and not ns.pending %}
                {{- ns.system.rstrip() + '\n\n' }}
            {%- endif %}
            {%- set ns.pending = True %}
        {%- endif %}
        {{- message.content + ' [/INST]' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content or '' %}
        {{- ' ' + content }}
""" + _TOOL_CALLS + r"""
        {{- eos_token }}
    {%- elif message.role == 'tool' %}
        {{- '[INST] <tool_response>\n' + message.content + '\n</tool_response> [/INST]' }}
    {%- endif %}
{%- endfor %}
"""

CHATML = JinjaTemplate(_CHATML_SOURCE, eos_token="<|im_end|>")
"""ChatML as Qwen2.5-Instruct lays it out, tools included (``<tools>`` in the system turn,
``<tool_call>`` blocks, ``<tool_response>`` in a user turn); SmolLM2 uses the same turns.
Unlike those templates it adds no default system prompt ("You are Qwen, ...", "You are a
helpful AI assistant named SmolLM, ..."); pass ``variables={"default_system": ...}`` to a
``JinjaTemplate(CHATML.source, ...)`` for one."""

DEEPSEEK_R1 = JinjaTemplate(_DEEPSEEK_R1_SOURCE, bos_token="<｜begin▁of▁sentence｜>",
                            eos_token="<｜end▁of▁sentence｜>")
"""The DeepSeek-R1-Distill template: BOS, the system text, ``<｜User｜>``/``<｜Assistant｜>``
turns, earlier answers without their reasoning, and the generation prompt
``<｜Assistant｜><think>\\n`` (so the output begins inside the reasoning). Tools use the Hermes
form in the system text, since the distills never learnt DeepSeek-V3's tool tokens."""

LLAMA3 = JinjaTemplate(_LLAMA3_SOURCE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
"""Llama 3 / 3.1 / 3.3 Instruct turns (``<|start_header_id|>role<|end_header_id|>``), each text
trimmed as Meta's template trims it; tools in the Hermes form in the system turn, results in an
``ipython`` turn. (3.1's template also writes knowledge and today's dates into the system turn;
this one does not.)"""

MISTRAL = JinjaTemplate(_MISTRAL_SOURCE, bos_token="<s>", eos_token="</s>")
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


_PROBE_CONVERSATIONS: tuple[tuple[dict[str, Any], ...], ...] = (
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

_LEARNING_ATTEMPTS = 3
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


class AutoTemplate(ServerRenderedTemplate):
    """``"auto"``: the server's own template wherever it renders one; else the built-in
    template of the model's family, read from the model id; else a ``ConfigError`` before any
    generation request, saying which template to pass.

    The server's template costs a request per conversation, so the first conversation of a
    backend also has it render :data:`_PROBE_CONVERSATIONS` (beside its own rendering): a
    built-in that writes exactly what the server wrote for all of them (BOS, default system
    prompt, dropped reasoning, trimmed text and generation prompt alike) is learnt, and later
    conversations without tools are rendered client-side with it, no request at all. One that
    no built-in reproduces stays the server's business, as do tools and tool turns (TGI adds
    its own tool prompt).

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
        self._openers: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        """What each server's generation prompt opens ("" or ``<think>\\n``), as its own
        renderings showed: a property of its template, learnt without a request of its own."""
        self._learnt: weakref.WeakKeyDictionary[Any, LearnedTemplate | None] = (
            weakref.WeakKeyDictionary())
        """Per backend: the built-in that renders as its server does, ``None`` for none; absent
        while not known."""
        self._attempts: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._probing: weakref.WeakSet[Any] = weakref.WeakSet()

    def learnt(self, backend: TemplateBackend) -> LearnedTemplate | None:
        """The client-side template learnt for ``backend``'s server, if any."""
        with contextlib.suppress(TypeError):
            return self._learnt.get(backend)
        return None

    async def render(self, messages: Sequence[Mapping[str, Any]],
                     tools: Sequence[Mapping[str, Any]] | None, backend: TemplateBackend, *,
                     tool_choice: str | Mapping[str, Any] | None = None) -> str:
        tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        plain = not tools and not tool_turns
        if plain and (learnt := self.learnt(backend)) is not None:
            return learnt.render_text(messages)
        flattens = tool_turns and not backend.keeps_tool_turns
        if flattens:
            model_id = (await backend.info()).model_id
            family = family_template(model_id)
            if family is not None:
                prompt = await _BUILTIN[family].render(messages, tools, backend)
                return prompt + self._reasoning_opener(family, prompt, backend, model_id)
            # No better rendering is known: the server's, with its tool turns flattened.
        # One request: a server that renders nothing answers None (detected once per backend).
        probing = self._start_learning(backend) if plain else None
        try:
            text = await backend.render_chat(validate_messages(messages), validate_tools(tools),
                                             tool_choice=_wire_tool_choice(tool_choice, tools))
        except BaseException:
            if probing is not None:
                probing.cancel()
                self._probing.discard(backend)
            raise
        if probing is not None:
            await self._finish_learning(backend, probing, messages, text)
        if text is not None:
            self._learn_opener(backend, text)
            return text
        model_id = (await backend.info()).model_id
        family = family_template(model_id)
        if family is None:
            option = f"{self.role}_template" if self.role in ("small", "target") else "template"
            raise ConfigError(
                f"the {self.role} server {backend.url} renders no chat template and the model "
                f"{model_id!r} is of no family specthink knows; pass {option}= one of "
                f"{', '.join(repr(n) for n in _BUILTIN)}, a Jinja template source, or the path "
                "of the model's tokenizer_config.json")
        prompt = await _BUILTIN[family].render(messages, tools, backend)
        return prompt + self._reasoning_opener(family, prompt, backend, model_id)

    def _start_learning(self, backend: TemplateBackend) -> asyncio.Future[list[str | None]] | None:
        """The probe renderings, started beside a conversation's own when nothing is known yet
        and no other conversation is already probing (those render on the server meanwhile)."""
        try:
            if (not self.learn or backend in self._learnt or backend in self._probing
                    or self._attempts.get(backend, 0) >= _LEARNING_ATTEMPTS):
                return None
            self._probing.add(backend)
            self._attempts[backend] = self._attempts.get(backend, 0) + 1
        except TypeError:  # a backend that cannot be a weak key learns nothing
            return None
        return asyncio.ensure_future(asyncio.gather(*(
            backend.render_chat(list(conversation)) for conversation in _PROBE_CONVERSATIONS)))

    async def _finish_learning(self, backend: TemplateBackend,
                               probing: asyncio.Future[list[str | None]],
                               messages: Sequence[Mapping[str, Any]], text: str | None) -> None:
        try:
            if text is None:  # nothing rendered on the server: nothing to learn
                probing.cancel()
                self._learnt[backend] = None
                return
            try:
                probes = await probing
            except Exception as exc:  # learning is an optimisation: it never fails a call
                level = logging.DEBUG if isinstance(exc, BackendError) else logging.WARNING
                logger.log(level, "%s: the template probe failed (%r); the server renders",
                           backend.url, exc)
                return
            renderings: list[tuple[Sequence[Mapping[str, Any]], str | None]] = [
                *zip(_PROBE_CONVERSATIONS, probes, strict=True), (messages, text)]
            no_system = probes[0] or ""
            learnt = next((candidate for candidate in _candidates(no_system)
                           if all(rendered is not None
                                  and _same_rendering(candidate, conversation, rendered)
                                  for conversation, rendered in renderings)), None)
            self._learnt[backend] = learnt
            if learnt is not None:
                logger.info("%s renders its chat template as the built-in %s does: later "
                            "conversations without tools are rendered client-side", backend.url,
                            learnt.name)
        finally:
            self._probing.discard(backend)

    def _learn_opener(self, backend: TemplateBackend, rendered: str) -> None:
        tail = rendered[rendered.rfind(REASONING_START):] if REASONING_START in rendered else ""
        with contextlib.suppress(TypeError):  # a backend that cannot be a weak key: not kept
            self._openers[backend] = tail if tail.rstrip() == REASONING_START else ""

    def _reasoning_opener(self, family: str, family_text: str, backend: TemplateBackend,
                          model_id: str) -> str:
        """The reasoning tag the server's generation prompt opens and ``family_text``'s does
        not: as the server's own renderings showed, else as the model id suggests (QwQ and
        the Qwen3 "Thinking" checkpoints; thinking models of other families tag otherwise)."""
        if family_text.rstrip().endswith(REASONING_START):
            return ""
        with contextlib.suppress(TypeError):
            known = self._openers.get(backend)
            if known is not None:
                return known
        lowered = model_id.lower()
        thinking = family == "chatml" and (
            "thinking" in lowered or ("qwq" in lowered and "preview" not in lowered))
        return f"{REASONING_START}\n" if thinking else ""

    def __repr__(self) -> str:
        return "AutoTemplate()" if self.learn else "AutoTemplate(learn=False)"


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
                        *, tool_choice: str | Mapping[str, Any] | None = "auto") -> str:
    """Validate, apply ``tool_choice``, render, and drop a leading BOS the server would repeat."""
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
