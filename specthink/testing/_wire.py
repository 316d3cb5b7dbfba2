"""The loopback server's wire format: TGI's and OpenAI's request bodies, TGI's validation and
the JSON both protocols answer with. Pure functions, apart from reading a request's body."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from specthink.testing._templates import CHAT_TEMPLATES
from specthink.testing.models import Tokenizer

__all__ = [
    "DONE",
    "EOS_ID",
    "EOS_TEXT",
    "GENERATION_PATHS",
    "NO_TOOL",
    "VERSION",
    "CompletionRequest",
    "GenerateRequest",
    "Invalid",
    "Job",
    "Parameters",
    "TGIFinish",
    "Token",
    "completion_answer",
    "completion_chunk",
    "completion_envelope",
    "completion_prompt",
    "error_body",
    "error_response",
    "generate_response",
    "json_line",
    "read_body",
    "read_chat_body",
    "render_chatml",
    "simple_tokens",
    "tgi_stream_event",
    "tools_for_choice",
    "validate",
]

EOS_TEXT = "</s>"
EOS_ID = 2
VERSION = "3.3.6"
"""The TGI version whose wire format this server follows."""

GENERATION_PATHS = ("/generate_stream", "/generate", "/v1/completions")

TGIFinish = Literal["eos_token", "length", "stop_sequence"]

Token = tuple[str, int, bool]
"""(text, id, special) of a generated token."""

DONE = b"data:[DONE]\n\n"
"""The end of an OpenAI stream."""

M = TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------- requests


class Invalid(Exception):
    """A request TGI would reject (its message follows TGI's validation.rs)."""

    def __init__(self, message: str, error_type: str = "validation") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


class Parameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = True
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: dict[str, Any] | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None

    @property
    def reported_seed(self) -> int | None:
        """The seed TGI reports: the one given, else 0 when sampling, else none."""
        sampling = self.do_sample or any(
            v is not None for v in (self.temperature, self.top_k, self.top_p, self.typical_p))
        return self.seed if self.seed is not None else (0 if sampling else None)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str | list[str]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stream: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True
    """vLLM's extension: false sends the prompt without the BOS the tokenizer adds."""
    skip_special_tokens: bool = True
    """vLLM's sampling parameter: false keeps special tokens in the text (not the stop token,
    which vLLM's detokenizer never decodes)."""
    preserved_tokens: list[str] | None = None
    """llama.cpp's: the special tokens whose text the answer keeps (see ``Job.preserved``)."""
    stream_options: dict[str, Any] | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def to_parameters(self) -> Parameters:
        """As TGI: temperature 0 means greedy, anything else samples; 100 tokens by default."""
        greedy = self.temperature == 0.0
        return Parameters(
            max_new_tokens=self.max_tokens if self.max_tokens is not None else 100,
            do_sample=not greedy, temperature=None if greedy else self.temperature,
            top_p=self.top_p, seed=self.seed, stop=self.stop or [],
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty)


async def read_body(request: Request, model: type[M]) -> M | JSONResponse:
    """The JSON body as ``model``, or TGI's 422 answer when it does not deserialize."""
    try:
        raw = await request.body()
        return model.model_validate_json(raw)
    except ValidationError as exc:
        return error_response(422, f"Failed to deserialize the JSON body into the target type: "
                                   f"{_first_error(exc)}", "validation")


def read_chat_body(raw: bytes) -> tuple[list[dict[str, Any]], list[Any] | None] | JSONResponse:
    """The messages and the tools to render of a ``/chat_tokenize`` body (``tool_choice``
    applied, see :func:`tools_for_choice`), or TGI's 422 answer."""
    try:
        body = json.loads(raw)
    except ValueError:
        return error_response(422, "Failed to parse the request body as JSON", "validation")
    messages = body.get("messages") if isinstance(body, dict) else None
    tools = body.get("tools") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return error_response(422, "Failed to deserialize the JSON body into the target type: "
                              "missing field `messages`", "validation")
    if tools is not None and not isinstance(tools, list):
        return error_response(422, "`tools` must be a list", "validation")
    assert isinstance(body, dict)
    try:
        return messages, tools_for_choice(tools, body.get("tool_choice", _ABSENT))
    except Invalid as exc:
        return error_response(422, exc.message, exc.error_type)


_ABSENT: Any = object()

NO_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "no_tool",
        "description": "Open ended response with no specific tool selected",
        "arguments": {"type": "object", "properties": {"content": {
            "type": "string", "description": "The response content"}}, "required": ["content"]},
    },
}
"""The pseudo-function TGI adds to the tools when ``tool_choice`` is ``"auto"``."""


def tools_for_choice(tools: list[Any] | None, tool_choice: Any = _ABSENT) -> list[Any] | None:
    """The tools TGI renders for ``tool_choice`` (router ``ToolGrammar::apply``).

    ``"auto"`` adds :data:`NO_TOOL`; ``"required"`` keeps the tools; ``"none"`` or ``null``
    renders none; a name (a plain string, or ``{"type": "function", "function": {"name"}}``)
    keeps that tool only, and a name not among the tools is a 422 ``tool_error``. Anything else
    does not deserialize (422 ``validation``). Without a ``tool_choice`` the tools are rendered
    as given: TGI would treat that as ``"auto"`` and offer ``no_tool`` too, which the older
    tests of this server do not expect.
    """
    if tool_choice is _ABSENT or not tools:
        return tools
    if tool_choice is None or tool_choice == "none":
        return None
    if tool_choice == "auto":
        return [*tools, NO_TOOL]
    if tool_choice == "required":
        return tools
    name: object = tool_choice
    if not isinstance(tool_choice, str):
        function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        kind = tool_choice.get("type", "function") if isinstance(tool_choice, dict) else None
        if not isinstance(name, str) or kind != "function":
            raise Invalid("Failed to deserialize the JSON body into the target type: "
                          "tool_choice: data did not match any variant of untagged enum "
                          "ToolTypeDeserializer", "validation")
    chosen = [tool for tool in tools if isinstance(tool, dict)
              and isinstance(tool.get("function"), dict) and tool["function"].get("name") == name]
    if not chosen:
        raise Invalid(f"Tool error: Tool with name {name} not found", "tool_error")
    return chosen[:1]


def completion_prompt(body: CompletionRequest) -> str | JSONResponse:
    """The one prompt of a ``/v1/completions`` body, or the 422 answer TGI gives."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if body.suffix is not None:
        return error_response(422, "Suffix is not supported and can be achieved by "
                              "preprocessing the prompt.", "suffix not supported")
    if len(prompts) != 1:
        return error_response(422, "the loopback server serves exactly one prompt per request",
                              "batch size exceeded")
    return prompts[0]


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ())) or "body"
    return f"{where}: {error.get('msg', 'invalid')}"


def validate(inputs: str, params: Parameters, *, streaming: bool,
             tokenize: Callable[[str], list[int]], max_input_tokens: int,
             max_total_tokens: int, max_stop_sequences: int) -> tuple[list[int], int]:
    """TGI's validation (router/src/validation.rs), in its order and with its messages.

    Returns the prompt's token ids and ``max_new_tokens``; raises :class:`Invalid`.
    """
    if streaming and (params.best_of or 1) != 1:
        raise Invalid("`best_of` != 1 is not supported when streaming tokens")
    if streaming and params.decoder_input_details:
        raise Invalid("`decoder_input_details` == true is not supported when streaming "
                      "tokens")
    if params.temperature is not None and params.temperature <= 0:
        raise Invalid("`temperature` must be strictly positive")
    if params.repetition_penalty is not None and params.repetition_penalty <= 0:
        raise Invalid("`repetition_penalty` must be strictly positive")
    if params.frequency_penalty is not None and not -2.0 <= params.frequency_penalty <= 2.0:
        raise Invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if params.top_p is not None and not 0.0 < params.top_p < 1.0:
        raise Invalid("`top_p` must be > 0.0 and < 1.0")
    if params.typical_p is not None and not 0.0 < params.typical_p < 1.0:
        raise Invalid("`typical_p` must be > 0.0 and < 1.0")
    if params.top_k is not None and params.top_k <= 0:
        raise Invalid("`top_k` must be strictly positive")
    if params.max_new_tokens is not None and params.max_new_tokens <= 0:
        raise Invalid("`max_new_tokens` must be strictly positive")
    if len(params.stop) > max_stop_sequences:
        raise Invalid(f"`stop` supports up to {max_stop_sequences} stop sequences. "
                      f"Given: {len(params.stop)}")
    if not inputs:
        raise Invalid("`inputs` cannot be empty")
    prompt_ids = tokenize(inputs)
    input_length = len(prompt_ids)
    max_new_tokens = params.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(max(max_total_tokens - input_length, 0), 1024)
    if input_length + max_new_tokens > max_total_tokens:
        raise Invalid(f"`inputs` tokens + `max_new_tokens` must be <= "
                      f"{max_total_tokens}. Given: {input_length} `inputs` tokens and "
                      f"{max_new_tokens} `max_new_tokens`")
    if input_length > max_input_tokens:
        raise Invalid(f"`inputs` must have less than {max_input_tokens} tokens. "
                      f"Given: {input_length}")
    return prompt_ids, max_new_tokens


LLAMA_CPP_RENDERED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})
"""gpt-oss's special tokens that llama.cpp always writes as text: ``llama_vocab::impl::load``
(src/llama-vocab.cpp) makes them user-defined tokens ("quick hack for gpt-oss"), so they are
rendered without ``preserved_tokens``; ``<|end|>``, ``<|return|>`` and ``<|call|>`` are not."""


@dataclass(slots=True)
class Job:
    """A validated generation: the prompt's token ids and the tokens the model will write."""

    prompt: str
    prompt_ids: list[int]
    tokens: list[Token]
    """(text, id, special) for each token to send."""
    finish: TGIFinish
    max_new_tokens: int
    seed: int | None
    details: bool = True

    keep_special: bool = False
    """Special tokens stay in the text (vLLM's ``skip_special_tokens: false``); the token that
    stopped the generation never does."""
    preserved: frozenset[str] = frozenset()
    """The special tokens llama.cpp's server writes as text (llama-cpp-python's: only the
    gpt-oss ones its libllama renders): those a request names in
    ``preserved_tokens`` (tools/server ``server_task::params_from_json_cmpl``; the
    ``accept_special_token`` of ``update_slots`` then detokenizes them with
    ``special=true``), the stop token too when named (``process_token`` sends its text, then
    checks for the end of generation), and gpt-oss's :data:`LLAMA_CPP_RENDERED`."""

    def shown(self, index: int) -> str:
        """The text token ``index`` adds to the output."""
        return self.shown_token(self.tokens[index], index == len(self.tokens) - 1)

    def shown_token(self, token: Token, last: bool) -> str:
        """The text ``token`` adds to the output (``last``: it is the generation's last)."""
        text, _, special = token
        if not special or text in self.preserved:
            return text
        stopped_here = last and self.finish == "eos_token"
        return text if self.keep_special and not stopped_here else ""

    @property
    def text(self) -> str:
        """The generated text (special tokens left out unless ``keep_special``)."""
        return "".join(self.shown(i) for i in range(len(self.tokens)))


# --------------------------------------------------------------------------- answers


def json_line(payload: Any) -> bytes:
    # TGI (axum) writes "data:" with no space, compact JSON, and a blank line after each event.
    return b"data:" + json.dumps(payload, ensure_ascii=False,
                                 separators=(",", ":")).encode() + b"\n\n"


def error_body(message: str, error_type: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


def error_response(status: int, message: str, error_type: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type), status_code=status,
                        headers=dict(headers or {}))


def tgi_stream_event(job: Job, index: int, token: Token, last: bool, *,
                     full_text: bool) -> bytes:
    """One ``/generate_stream`` event; the last one carries the text and the details."""
    text, token_id, special = token
    event: dict[str, Any] = {
        "index": index + 1,
        "token": {"id": token_id, "text": text, "logprob": 0.0, "special": special},
        "top_tokens": [],
        "generated_text": None,
        "details": None,
    }
    if last:
        event["generated_text"] = job.prompt + job.text if full_text else job.text
        if job.details:
            event["details"] = {"finish_reason": job.finish,
                                "generated_tokens": len(job.tokens),
                                "input_length": len(job.prompt_ids), "seed": job.seed}
    return json_line(event)


def generate_response(job: Job, params: Parameters, tokenizer: Tokenizer) -> JSONResponse:
    """The ``/generate`` answer, with TGI's token count headers."""
    text = job.prompt + job.text if params.return_full_text else job.text
    answer: dict[str, Any] = {"generated_text": text}
    if job.details or params.decoder_input_details:
        prefill = []
        if params.decoder_input_details:
            prefill = [{"id": i, "text": t, "logprob": None}
                       for t, i in zip(tokenizer.tokenize(job.prompt), job.prompt_ids,
                                       strict=True)]
        answer["details"] = {
            "finish_reason": job.finish,
            "generated_tokens": len(job.tokens),
            "seed": job.seed,
            "prefill": prefill,
            "tokens": [{"id": i, "text": t, "logprob": 0.0, "special": s}
                       for t, i, s in job.tokens],
        }
    return JSONResponse(answer, headers={"x-prompt-tokens": str(len(job.prompt_ids)),
                                         "x-generated-tokens": str(len(job.tokens))})


def completion_envelope(model_id: str, created: int) -> dict[str, Any]:
    """What every ``/v1/completions`` answer and chunk starts with."""
    return {"object": "text_completion", "id": "", "created": created, "model": model_id,
            "system_fingerprint": f"{VERSION}-native"}


def completion_answer(envelope: Mapping[str, Any], job: Job) -> dict[str, Any]:
    """A non-streamed ``/v1/completions`` answer."""
    return {
        **envelope,
        "choices": [{"index": 0, "text": job.text, "logprobs": None,
                     "finish_reason": "stop" if job.finish == "eos_token" else job.finish}],
        "usage": _usage(len(job.prompt_ids), len(job.tokens)),
    }


def completion_chunk(envelope: Mapping[str, Any], job: Job, token: Token, last: bool) -> bytes:
    """One streamed ``/v1/completions`` chunk; the last one carries the usage and ``[DONE]``."""
    # TGI sends the final token's text as is (e.g. "</s>") with its own finish reason
    # ("eos_token"), and an empty finish reason before.
    choice = {"index": 0, "text": token[0], "logprobs": None,
              "finish_reason": job.finish if last else ""}
    chunk: dict[str, Any] = {**envelope, "choices": [choice]}
    if last:
        chunk["usage"] = _usage(len(job.prompt_ids), len(job.tokens))
    data = json_line(chunk)
    return data + DONE if last else data


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def simple_tokens(tokenizer: Tokenizer, text: str) -> list[dict[str, Any]]:
    """TGI's ``/tokenize`` answer: each token's id, text and character span."""
    out = []
    position = 0
    for piece in tokenizer.tokenize(text):
        start = text.find(piece, position)
        start = position if start < 0 else start
        position = start + len(piece)
        out.append({"id": tokenizer.token_id(piece), "text": piece, "start": start,
                    "stop": position})
    return out


def render_chatml(messages: Sequence[Mapping[str, Any]],
                  tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """ChatML with the generation prompt; tools go into the system turn, Hermes/Qwen style.

    Like TGI 3.3, only ``role`` and ``content`` of each message are kept.
    """
    return CHAT_TEMPLATES["chatml"].render(messages, tools)
