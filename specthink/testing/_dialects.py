"""The non-TGI servers' own endpoints, as the loopback server speaks them: vLLM's ``/tokenize``
and ``/detokenize`` (``vllm/entrypoints/serve/tokenize/protocol.py``: TokenizeCompletionRequest,
TokenizeChatRequest, DetokenizeRequest), llama.cpp's ``/tokenize``, ``/detokenize``,
``/apply-template`` and ``/props`` (``tools/server/README.md``), llama-cpp-python's
``/extras/tokenize`` family, and each one's ``/v1/models`` listing. Pure functions from a decoded
body to ``(status, answer)``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from specthink.testing._generation import special_pieces
from specthink.testing._templates import AnyServerTemplate, TokenStrings, Vocabulary, token_strings
from specthink.testing._wire import LLAMA_CPP_RENDERED, Job, Token
from specthink.testing.models import Tokenizer

__all__ = [
    "FLAVORS",
    "Answer",
    "Flavor",
    "Served",
    "llamacpp_apply_template",
    "llamacpp_detokenize",
    "llamacpp_props",
    "llamacpp_tokenize",
    "models_answer",
    "openai_completion_answer",
    "openai_completion_chunk",
    "openai_envelope",
    "openai_error_event",
    "python_detokenize",
    "python_tokenize",
    "vllm_detokenize",
    "vllm_error",
    "vllm_tokenize",
]

Flavor = Literal["tgi", "vllm", "llamacpp", "llama-cpp-python"]
FLAVORS: tuple[Flavor, ...] = ("tgi", "vllm", "llamacpp", "llama-cpp-python")

Answer = tuple[int, Any]
"""(HTTP status, JSON answer)."""


@dataclass(frozen=True, slots=True)
class Served:
    """What the endpoints need to know about the served model."""

    model_id: str
    template: AnyServerTemplate
    tokenizer: Tokenizer
    vocabulary: Vocabulary
    max_model_len: int
    token_strings: TokenStrings = "byte-level"

    def pieces(self, text: str, *, add_bos: bool) -> list[str]:
        """The text's tokens, BOS first when the tokenizer adds it (``add_special_tokens``)."""
        bos = self.template.bos_token
        return ([bos] if add_bos and bos else []) + self.tokenizer.tokenize(text)


# --------------------------------------------------------------------------- vLLM


def vllm_error(status: int, message: str, error_type: str = "BadRequestError") -> Answer:
    """vLLM's error answer (``ErrorResponse``: ``{"error": {message, type, param, code}}``)."""
    return status, {"error": {"message": message, "type": error_type, "param": None,
                              "code": status}}


def _schema_error(messages: list[dict[str, Any]]) -> str | None:
    """What OpenAI's message schema (vLLM's ChatCompletionMessageParam, llama.cpp's
    oaicompat parser) rejects here: a tool call whose ``arguments`` is not a JSON string."""
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
                return f"messages.{index}.tool_calls.function.arguments: Input should be a string"
    return None


def _flag(body: dict[str, Any], name: str, default: bool) -> bool | None:
    value = body.get(name, default)
    return value if isinstance(value, bool) else None


def _check_model(body: dict[str, Any], served: Served) -> Answer | None:
    model = body.get("model")
    if model is not None and model != served.model_id:
        return vllm_error(404, f"The model `{model}` does not exist.", "NotFoundError")
    return None


def vllm_tokenize(body: Any, served: Served) -> Answer:
    """``POST /tokenize``: a ``prompt`` (BOS added unless ``add_special_tokens`` is false) or
    ``messages`` through the chat template (no BOS added on top by default, since the template
    writes it), ``tools`` and ``chat_template_kwargs`` handed to it (vLLM's
    TokenizeChatRequest); ``return_token_strs`` adds each token's string."""
    if not isinstance(body, dict) or not ("prompt" in body or "messages" in body):
        # vLLM answers request validation errors with 400, not FastAPI's 422.
        return vllm_error(400, "1 validation error: Field required: `prompt` or `messages`")
    wrong = _check_model(body, served)
    if wrong is not None:
        return wrong
    chat = "messages" in body
    add_special = _flag(body, "add_special_tokens", not chat)
    want_strs = _flag(body, "return_token_strs", False)
    if add_special is None or want_strs is None:
        return vllm_error(400, "`add_special_tokens` and `return_token_strs` are booleans")
    if chat:
        messages, tools = body.get("messages"), body.get("tools")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return vllm_error(400, "`messages` must be a list of messages")
        wrong_schema = _schema_error(messages)
        if wrong_schema is not None:
            return vllm_error(400, wrong_schema)
        if tools is not None and not isinstance(tools, list):
            return vllm_error(400, "`tools` must be a list")
        generation_prompt = _flag(body, "add_generation_prompt", True)
        if generation_prompt and body.get("continue_final_message"):
            return vllm_error(400, "Cannot set both `continue_final_message` and "
                                   "`add_generation_prompt` to True.")
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            return vllm_error(400, "`chat_template_kwargs` must be an object")
        text = served.template.render(messages, tools, tool_calls=True,
                                      add_generation_prompt=generation_prompt is not False,
                                      template_kwargs=kwargs)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return vllm_error(400, "`prompt` must be a string")
        text = prompt
    pieces = served.pieces(text, add_bos=add_special)
    ids = served.vocabulary.ids(pieces)
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": served.max_model_len,
                              "tokens": ids, "token_strs": None}
    if want_strs:
        answer["token_strs"] = token_strings(pieces, served.token_strings)
    return 200, answer


def _ids(body: Any) -> list[int] | None:
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        return None
    return tokens


def vllm_detokenize(body: Any, served: Served) -> Answer:
    """``POST /detokenize``: ``{"tokens": [ids]}`` -> ``{"prompt": text}``, special tokens kept
    (vLLM decodes with the tokenizer's defaults, which skip none)."""
    ids = _ids(body)
    if ids is None:
        return vllm_error(400, "`tokens` must be a list of non-negative token ids")
    wrong = _check_model(body, served)
    if wrong is not None:
        return wrong
    pieces = served.vocabulary.pieces(ids)
    if pieces is None:
        return vllm_error(400, "token id out of range")
    return 200, {"prompt": "".join(pieces)}


# --------------------------------------------------------------------------- llama.cpp


def llamacpp_tokenize(body: Any, served: Served) -> Answer:
    """``POST /tokenize``: ``content`` (no BOS unless ``add_special``), ``with_pieces`` for
    ``{"id", "piece"}`` objects; a body without ``content`` gets an empty list, as llama.cpp."""
    if not isinstance(body, dict):
        return 500, {"error": {"code": 500, "message": "invalid JSON", "type": "server_error"}}
    content = body.get("content")
    if not isinstance(content, str):
        return 200, {"tokens": []}
    pieces = served.pieces(content, add_bos=bool(body.get("add_special", False)))
    ids = served.vocabulary.ids(pieces)
    if body.get("with_pieces"):
        return 200, {"tokens": [{"id": i, "piece": p} for i, p in zip(ids, pieces, strict=True)]}
    return 200, {"tokens": ids}


def llamacpp_detokenize(body: Any, served: Served) -> Answer:
    """``POST /detokenize``: ``{"tokens"}`` -> ``{"content"}``."""
    ids = _ids(body) or []
    pieces = served.vocabulary.pieces(ids)
    if pieces is None:
        return 500, {"error": {"code": 500, "message": "invalid token id",
                               "type": "server_error"}}
    return 200, {"content": "".join(pieces)}


def llamacpp_apply_template(body: Any, served: Served) -> Answer:
    """``POST /apply-template``: ``{"messages", "tools"?, "chat_template_kwargs"?}`` ->
    ``{"prompt"}``. The body is parsed as llama.cpp's chat endpoint parses it
    (``oaicompat_chat_params_parse``, whose ``chat_template_kwargs`` reach the template); as
    its ``common_chat_templates_apply``, a leading BOS text is cut when the vocabulary adds BOS
    itself (``add_bos``), so that the prompt can go to ``/completion`` as it is."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return 400, {"error": {"code": 400, "message": "'messages' is required",
                               "type": "invalid_request_error"}}
    wrong_schema = _schema_error(messages)
    if wrong_schema is not None:
        return 500, {"error": {"code": 500, "message": wrong_schema, "type": "server_error"}}
    tools = body.get("tools")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        return 400, {"error": {"code": 400, "message": "chat_template_kwargs must be an object",
                               "type": "invalid_request_error"}}
    prompt = served.template.render(messages, tools if isinstance(tools, list) else None,
                                    tool_calls=True, template_kwargs=kwargs)
    bos = served.template.bos_token
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos):]
    return 200, {"prompt": prompt}


def llamacpp_props(served: Served, total_slots: int) -> dict[str, Any]:
    """``GET /props``: the part of llama.cpp's answer that describes the model."""
    return {
        "default_generation_settings": {"n_ctx": served.max_model_len, "params": {}},
        "total_slots": total_slots,
        "model_path": f"/models/{served.model_id}.gguf",
        "chat_template": f"(the loopback server's {served.template.name} template)",
        "bos_token": served.template.bos_token,
        "eos_token": "</s>",
        "build_info": "specthink-loopback",
    }


# --------------------------------------------------------------------------- llama-cpp-python


def python_tokenize(body: Any, served: Served, *, count: bool = False) -> Answer:
    """``POST /extras/tokenize`` (``{"input"}`` -> ``{"tokens"}``, BOS added) and
    ``/extras/tokenize/count`` (-> ``{"count"}``)."""
    text = body.get("input") if isinstance(body, dict) else None
    if not isinstance(text, str):
        return 422, {"detail": [{"loc": ["body", "input"], "msg": "Field required",
                                 "type": "missing"}]}
    # llama_cpp/server/app.py tokenizes with special=True: a special token's text is one token.
    bos = served.template.bos_token
    pieces = ([bos] if bos else []) + [piece for piece, _ in special_pieces(
        served.tokenizer, text, served.template.special_tokens)]
    ids = served.vocabulary.ids(pieces)
    return 200, ({"count": len(ids)} if count else {"tokens": ids})


def python_detokenize(body: Any, served: Served) -> Answer:
    """``POST /extras/detokenize``: ``{"tokens"}`` -> ``{"text"}``, without the special tokens'
    (and BOS's) text: ``Llama.detokenize`` renders with ``special=False``, as its
    ``/v1/completions`` does (but for gpt-oss's :data:`LLAMA_CPP_RENDERED`: libllama's)."""
    pieces = served.vocabulary.pieces(_ids(body) or [])
    if pieces is None:
        return 500, {"detail": "invalid token id"}
    dropped = {*served.template.special_tokens, served.template.bos_token} - LLAMA_CPP_RENDERED
    return 200, {"text": "".join(p for p in pieces if p not in dropped)}


# --------------------------------------------------------------------------- /v1/models


def models_answer(flavor: Flavor, served: Served, total_slots: int) -> dict[str, Any]:
    """``GET /v1/models`` as each server lists its one model."""
    model_id = served.model_id
    if flavor == "vllm":  # ModelCard, with the context length
        card: dict[str, Any] = {
            "id": model_id, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": model_id, "parent": None, "max_model_len": served.max_model_len,
            "permission": [{"id": "modelperm-loopback", "object": "model_permission",
                            "created": 0, "allow_create_engine": False,
                            "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": False, "allow_view": True,
                            "allow_fine_tuning": False, "organization": "*", "group": None,
                            "is_blocking": False}]}
        return {"object": "list", "data": [card]}
    if flavor == "llamacpp":
        meta = {"vocab_type": 2, "n_vocab": 50_010, "n_ctx_train": served.max_model_len,
                "n_embd": 1536, "n_params": 1_500_000_000, "size": 1_000_000_000}
        return {"object": "list",
                "models": [{"name": model_id, "model": model_id, "type": "model",
                            "capabilities": ["completion"], "details": {"format": "gguf"}}],
                "data": [{"id": model_id, "object": "model", "created": int(time.time()),
                          "owned_by": "llamacpp", "meta": meta}],
                "total_slots": total_slots}
    if flavor == "llama-cpp-python":
        return {"object": "list", "data": [{"id": model_id, "object": "model",
                                            "owned_by": "me", "permissions": []}]}
    # TGI's ModelInfo
    return {"object": "list", "data": [
        {"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]}



# --------------------------------------------------------------------------- /v1/completions


def openai_envelope(model_id: str, created: int) -> dict[str, Any]:
    """What vLLM's (and llama.cpp's) completion answers and chunks start with."""
    return {"id": "cmpl-loopback", "object": "text_completion", "created": created,
            "model": model_id}


def _finish(job: Job) -> str:
    # OpenAI's finish reasons: a stop sequence and end-of-sequence are both "stop".
    return "length" if job.finish == "length" else "stop"


def _usage(job: Job) -> dict[str, int]:
    prompt, completion = len(job.prompt_ids), len(job.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _event(payload: Any) -> bytes:
    # vLLM (FastAPI) and llama.cpp write "data: " with a space.
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def openai_completion_chunk(envelope: dict[str, Any], job: Job, token: Token, last: bool, *,
                            include_usage: bool) -> bytes:
    """One streamed chunk as vLLM writes it: the end-of-sequence step has empty text and
    finish reason "stop"; with ``stream_options.include_usage`` the usage follows in a chunk of
    its own with no choices, then ``[DONE]``."""
    text = job.shown_token(token, last)
    if last and job.preserved and text and token[2] and job.finish == "eos_token":
        # llama.cpp sends a stop token it writes as text in a chunk of its own, then an
        # empty finishing one (tools/server ``process_token``, then ``send_final_response``).
        data = _event({**envelope, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                "finish_reason": None, "stop_reason": None}],
                       "usage": None})
        text = ""
    else:
        data = b""
    choice = {"index": 0, "text": text, "logprobs": None,
              "finish_reason": _finish(job) if last else None, "stop_reason": None}
    data += _event({**envelope, "choices": [choice], "usage": None})
    if not last:
        return data
    if include_usage:
        data += _event({**envelope, "choices": [], "usage": _usage(job)})
    return data + DONE


def openai_completion_answer(envelope: dict[str, Any], job: Job) -> dict[str, Any]:
    """A non-streamed completion answer as vLLM gives it."""
    return {**envelope, "choices": [{"index": 0, "text": job.text, "logprobs": None,
                                     "finish_reason": _finish(job), "stop_reason": None}],
            "usage": _usage(job)}


def openai_error_event(message: str, error_type: str) -> bytes:
    """An error inside a 200 stream, as vLLM sends one (``{"error": {...}}``), then
    ``[DONE]``."""
    return _event({"error": {"message": message, "type": error_type, "param": None,
                             "code": 500}}) + DONE
