"""The loopback server's own chat templates (what ``/chat_tokenize``, vLLM's ``/tokenize`` with
``messages`` and llama.cpp's ``/apply-template`` render), one per served model, and the token
strings and vocabulary behind vLLM's and llama.cpp's tokenizer endpoints.

A real server renders with the model's Jinja template; the named ones here are small Python
renderers of the same layouts (only ``role`` and ``content`` of each message are kept, as TGI 3.3
does), so that tests see each family's real markers: ChatML, a Qwen3 thinking template whose
generation prompt opens ``<think>``, DeepSeek-R1 (BOS, then ``<｜User｜>`` /
``<｜Assistant｜><think>\\n``) and Llama 3 (``<|begin_of_text|>`` and header blocks).
:class:`JinjaChatTemplate` serves a model's real Jinja template instead (vLLM's way: messages,
tools and ``chat_template_kwargs``), with the strings its tokenizer treats as special tokens and
those that stop generation.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import jinja2

from specthink.templates import environment
from specthink.testing.models import Tokenizer

__all__ = [
    "CHAT_TEMPLATES",
    "AnyServerTemplate",
    "JinjaChatTemplate",
    "ServerChatTemplate",
    "TemplateName",
    "TokenStrings",
    "Vocabulary",
    "template_for_model",
    "token_strings",
]

TemplateName = Literal["chatml", "qwen3", "deepseek-r1", "llama3"]
TokenStrings = Literal["byte-level", "sentencepiece"]
"""How vLLM's ``return_token_strs`` spells tokens: as a byte-level BPE vocabulary (GPT-2, Qwen,
Llama 3, DeepSeek) or as a SentencePiece one (Llama 2, Mistral v0.1: ``▁`` for a space, byte
tokens ``<0x0A>``)."""

Turns = list[tuple[str, str]]
Render = Callable[[Turns, str], str]
"""(role, text) turns and the rendered tool section ("" without tools) -> the prompt."""
RenderCall = Callable[[str, Any], str]
"""A tool call (name, arguments) as the family writes it in an assistant turn."""


def _hermes_call(name: str, arguments: Any) -> str:
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{call}\n</tool_call>"


def _llama3_call(name: str, arguments: Any) -> str:
    return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class ServerChatTemplate:
    """A chat template as the loopback server applies it."""

    name: TemplateName
    bos_token: str
    """The BOS text the template writes first, and the BOS the server's tokenizer prepends to a
    raw prompt ("" for models without one)."""
    _render: Render
    _call: RenderCall = _hermes_call
    special_tokens: tuple[str, ...] = ()
    """Markers the model writes as special tokens (none: these renderers' markers are text)."""
    stop_tokens: tuple[str, ...] = ()
    """Special tokens that end generation besides end-of-sequence."""

    def render(self, messages: Sequence[Mapping[str, Any]],
               tools: Sequence[Mapping[str, Any]] | None = None, *,
               tool_calls: bool = False, add_generation_prompt: bool = True,
               template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The prompt with the generation prompt, tools described Hermes-style, tool results
        in the family's layout. An assistant turn's ``tool_calls`` are written out only with
        ``tool_calls`` (vLLM and llama.cpp hand them to the template; TGI 3.3 keeps only role
        and content). These renderers have no switches: ``template_kwargs`` and
        ``add_generation_prompt`` change nothing."""
        turns = []
        for message in messages:
            role, text = str(message.get("role", "user")), _content_text(message.get("content"))
            calls = message.get("tool_calls") if tool_calls and role == "assistant" else None
            if calls:
                written = [self._call(*_name_and_arguments(call)) for call in calls]
                text = "\n".join([text, *written] if text else written)
            turns.append((role, text))
        return self._render(turns, _tool_section(tools) if tools else "")


def _name_and_arguments(call: Any) -> tuple[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    function = function if isinstance(function, Mapping) else {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):  # OpenAI's wire form; servers decode it for the template
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return str(function.get("name", "")), arguments


def _responses(turns: Turns) -> Turns:
    """Consecutive ``tool`` turns as one, each result in ``<tool_response>`` tags (Qwen's and the
    R1 distills' layout)."""
    out: Turns = []
    for role, text in turns:
        block = f"<tool_response>\n{text}\n</tool_response>" if role == "tool" else text
        if role == "tool" and out and out[-1][0] == "tool":
            out[-1] = ("tool", f"{out[-1][1]}\n{block}")
        else:
            out.append((role, block))
    return out


def _tool_section(tools: Sequence[Mapping[str, Any]]) -> str:
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\nFor each function call, return a json object with "
            "function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _system(turns: Turns, tool_section: str, default: str = "") -> tuple[str | None, Turns]:
    """The system text (with the tool section) and the remaining turns."""
    system: str | None = None
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    if tool_section:
        head = system if system is not None else default
        system = f"{head}\n\n{tool_section}" if head else tool_section
    return system, turns


def _chatml(generation_prompt: str) -> Render:
    def render(turns: Turns, tool_section: str) -> str:
        system, rest = _system(turns, tool_section, "You are a helpful assistant.")
        out = [] if system is None else [f"<|im_start|>system\n{system}<|im_end|>\n"]
        out.extend(f"<|im_start|>{'user' if role == 'tool' else role}\n{text}<|im_end|>\n"
                   for role, text in _responses(rest))
        out.append(generation_prompt)
        return "".join(out)

    return render


_R1_BOS = "<｜begin▁of▁sentence｜>"


def _deepseek_r1(turns: Turns, tool_section: str) -> str:
    system, rest = _system(turns, tool_section)
    out = [_R1_BOS, system or ""]
    for role, text in _responses(rest):
        if role == "assistant":
            out.append(f"<｜Assistant｜>{text.split('</think>')[-1]}<｜end▁of▁sentence｜>")
        else:
            out.append(f"<｜User｜>{text}")
    out.append("<｜Assistant｜><think>\n")
    return "".join(out)


_LLAMA3_BOS = "<|begin_of_text|>"


def _llama3(turns: Turns, tool_section: str) -> str:
    system, rest = _system(turns, tool_section)
    out = [_LLAMA3_BOS]
    if system is not None:
        rest = [("system", system), *rest]
    # Llama 3.1 hands tool results to the "ipython" role.
    out.extend(f"<|start_header_id|>{'ipython' if role == 'tool' else role}<|end_header_id|>"
               f"\n\n{text.strip()}<|eot_id|>" for role, text in rest)
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


@cache
def _compiled(source: str) -> jinja2.Template:
    # The environment transformers' apply_chat_template renders Hub templates in (vLLM renders
    # with it), which specthink's own client-side renderer uses too.
    return environment().from_string(source)


def _for_template(message: Mapping[str, Any]) -> dict[str, Any]:
    """A wire message as vLLM hands it to a Hugging Face template: a null content as ``""``
    (vLLM's ``chat_utils._parse_chat_message_content`` reads ``None`` as no parts, joined to
    ``""`` for templates that take a string), other keys set to null dropped, tool-call
    ``arguments`` decoded from their JSON string (templates iterate them as a dict), an
    assistant's reasoning under ``reasoning_content`` and ``thinking`` alike."""
    out = {k: v for k, v in message.items() if v is not None}
    out.setdefault("content", "")
    if out.get("tool_calls"):
        calls = []
        for call in out["tool_calls"]:
            function = dict(call.get("function") or {}) if isinstance(call, Mapping) else {}
            if isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except ValueError:
                    pass
            calls.append({**call, "function": function} if isinstance(call, Mapping) else call)
        out["tool_calls"] = calls
    reasoning = next((out[k] for k in ("reasoning_content", "reasoning", "thinking")
                      if isinstance(out.get(k), str)), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


@dataclass(frozen=True, slots=True)
class JinjaChatTemplate:
    """A served model's real chat template (the Jinja source of its tokenizer_config.json),
    rendered the way vLLM renders ``/tokenize`` and chat messages."""

    name: str
    source: str
    bos_token: str = ""
    """The BOS the template writes (``bos_token`` in it) and the tokenizer adds to a raw
    prompt."""
    eos_token: str = ""
    special_tokens: tuple[str, ...] = ()
    """Strings the tokenizer holds as special tokens (e.g. harmony's ``<|channel|>``): a
    model's output cuts them out as tokens of their own, and ``/v1/completions`` leaves them
    out of the text unless the request sets ``skip_special_tokens`` to false."""
    stop_tokens: tuple[str, ...] = ()
    """Special tokens that end generation (gpt-oss's ``<|return|>`` and ``<|call|>``): never
    in the text, as vLLM never detokenizes the token that stopped it."""

    def render(self, messages: Sequence[Mapping[str, Any]],
               tools: Sequence[Mapping[str, Any]] | None = None, *,
               tool_calls: bool = True, add_generation_prompt: bool = True,
               template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The prompt for ``messages`` and ``tools``, ``template_kwargs`` (vLLM's
        ``chat_template_kwargs``) passed to the template. Every message key reaches the
        template (``tool_calls`` is vLLM's; a TGI-protocol caller cannot send them)."""
        variables = {**(template_kwargs or {}), "bos_token": self.bos_token,
                     "eos_token": self.eos_token}
        return _compiled(self.source).render(
            **variables, messages=[_for_template(m) for m in messages],
            tools=list(tools) if tools else None, add_generation_prompt=add_generation_prompt)


AnyServerTemplate = ServerChatTemplate | JinjaChatTemplate
"""What a loopback server can serve as its model's chat template."""


CHAT_TEMPLATES: dict[TemplateName, ServerChatTemplate] = {
    "chatml": ServerChatTemplate("chatml", "", _chatml("<|im_start|>assistant\n")),
    # Qwen3's thinking checkpoints (QwQ, Qwen3-*-Thinking-2507) open the reasoning in the prompt.
    "qwen3": ServerChatTemplate("qwen3", "", _chatml("<|im_start|>assistant\n<think>\n")),
    "deepseek-r1": ServerChatTemplate("deepseek-r1", _R1_BOS, _deepseek_r1),
    "llama3": ServerChatTemplate("llama3", _LLAMA3_BOS, _llama3, _llama3_call),
}


def template_for_model(model_id: str) -> ServerChatTemplate:
    """The template a model id implies, as the model's own tokenizer_config would carry it:
    DeepSeek-R1 distills, Qwen3, Llama 3; anything else ChatML."""
    name = model_id.lower()
    if "deepseek" in name and "r1" in name:
        return CHAT_TEMPLATES["deepseek-r1"]
    if "qwen3" in name or "qwq" in name:
        return CHAT_TEMPLATES["qwen3"]
    if re.search(r"llama-?3", name):
        return CHAT_TEMPLATES["llama3"]
    return CHAT_TEMPLATES["chatml"]


def _content_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


# --------------------------------------------------------------------------- token strings


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which byte-level BPE vocabularies
    spell their tokens in (a space is ``Ġ``, a newline ``Ċ``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_SPECIAL = re.compile(Tokenizer._MARKER)


def token_strings(pieces: Sequence[str], spelling: TokenStrings) -> list[str]:
    """What ``tokenizer.convert_ids_to_tokens`` gives for these pieces: special tokens as they
    are, other tokens in the vocabulary's own spelling."""
    out = []
    for piece in pieces:
        if _SPECIAL.fullmatch(piece):
            out.append(piece)
        elif spelling == "byte-level":
            alphabet = _byte_alphabet()
            out.append("".join(alphabet[b] for b in piece.encode()))
        else:
            out.append("".join(ch if ch.isascii() and ch.isprintable() and ch != " " else
                               "▁" if ch == " " else
                               "".join(f"<0x{b:02X}>" for b in ch.encode())
                               for ch in piece))
    return out


class Vocabulary:
    """Token ids that map back to their text, for ``/detokenize``.

    An id is the tokenizer's ``token_id`` of the piece (the id the generation endpoints report),
    unless two pieces share one: then the later piece gets a fresh id, so that ids stay unique.
    """

    _FRESH = 1_000_000

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._pieces: dict[int, str] = {}

    def ids(self, pieces: Sequence[str]) -> list[int]:
        with self._lock:
            return [self._id(piece) for piece in pieces]

    def _id(self, piece: str) -> int:
        known = self._ids.get(piece)
        if known is not None:
            return known
        token_id = self.tokenizer.token_id(piece)
        if token_id in self._pieces:
            token_id = self._FRESH + len(self._ids)
        self._ids[piece] = token_id
        self._pieces[token_id] = piece
        return token_id

    def pieces(self, ids: Sequence[int]) -> list[str] | None:
        """The pieces of ``ids``, or ``None`` if one of them was never handed out."""
        with self._lock:
            found = [self._pieces.get(token_id) for token_id in ids]
        return None if any(piece is None for piece in found) else [p for p in found if p]
