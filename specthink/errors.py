"""Exceptions raised by specthink.

The tree::

    SpecthinkError
    ├── ConfigError (also ValueError)        bad rules or bad input; raised before any request
    │   ├── PromptTooLongError               the prompt exceeds a server's max_input_tokens
    │   └── SettingsError                    the pair's settings were refused (an unknown preset
    │                                        or backend kind); also pydantic's ValidationError
    │                                        (specthink.settings)
    ├── NoToolCallError (also ValueError)    a tool call was required but the answer held none
    ├── LocalPairError                       the local llama.cpp pair failed to start or stop
    │   └── LocalPairMissingError            its server or model file is not installed
    ├── PolicyStateError (also RuntimeError) the takeover policy was told of an event its state
    │                                        does not allow: a bug in its caller (specthink.rules)
    ├── GradingError                         specthink eval could not compare an answer (a timeout,
    │                                        a failed worker): specthink.evaluation.grading
    └── BackendError                         anything a server did or failed to do
        ├── BackendConnectionError           could not connect, or the connection broke
        │   └── StreamDroppedError           the connection broke after the first token
        ├── BackendTimeoutError              connect or read timeout (a stall)
        ├── BackendStatusError               an HTTP error answer: carries status and error_type
        │   ├── RequestValidationError       422 "validation"
        │   │   └── ContextLimitError        a length limit exceeded (the server's limits may
        │   │       │                        have changed: refresh /info, retry once)
        │   │       └── InStreamContextLimitError  the same, reported inside a 200 stream
        │   │                                (TGI); also an InStreamError
        │   ├── GenerationError              424 "generation"
        │   ├── OverloadedError              429 "overloaded"
        │   ├── IncompleteGenerationError    500 "incomplete_generation"
        │   └── UnhealthyError               503 "unhealthy"
        └── InStreamError                    an error event inside a 200 stream

(``InStreamError`` and ``InStreamContextLimitError`` were called ``StreamErrorEvent`` and
``ContextLimitEvent``, names of trace events; the old names still import, with a
``DeprecationWarning``.)

Every ``BackendError`` carries the ``role`` ("small" or "target") once the engine has seen it,
the server ``url``, and chains the httpx exception that caused it (``raise ... from exc``).
"""

from __future__ import annotations

import re
import warnings
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "BackendConnectionError",
    "BackendError",
    "BackendStatusError",
    "BackendTimeoutError",
    "ConfigError",
    "ContextLimitError",
    "GenerationError",
    "InStreamContextLimitError",
    "InStreamError",
    "IncompleteGenerationError",
    "LocalPairError",
    "LocalPairMissingError",
    "NoToolCallError",
    "OverloadedError",
    "PromptTooLongError",
    "RequestValidationError",
    "SpecthinkError",
    "StreamDroppedError",
    "TargetFallbackWarning",
    "UnhealthyError",
    "error_from_response",
    "in_stream_error",
    "is_context_limit_message",
    "redact_url",
]


def redact_url(url: str) -> str:
    """``url`` fit for a message or a log line: credentials (``user:password@``) and the query
    string (where API keys travel: ``?key=...``) replaced by ``***``, the fragment dropped.

    The one redaction of server URLs: every error message, log line and ``repr`` that names a
    server goes through it, so a URL's secrets never reach a client's error body or a log.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # an unparseable URL may hide anything: show none of it
        return "<unreadable url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


class SpecthinkError(Exception):
    """Root of every error specthink raises on purpose."""


class ConfigError(SpecthinkError, ValueError):
    """Invalid configuration or input, detected before any generation request is sent.

    ``field`` names what was wrong where it is known: a request's field (``"messages"``,
    ``"tool_choice"``, ``"rules.n1"``, see :class:`specthink.ChatRequest`) or a setting
    (``"rules"``, ``"backend"``); the server maps it to the OpenAI parameter it answers with.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PromptTooLongError(ConfigError):
    """The rendered prompt has more tokens than a server accepts (``max_input_tokens`` of /info)."""


class NoToolCallError(SpecthinkError, ValueError):
    """A tool call was required (``tool_choice`` / ``error_on_no_tool_call``) but the answer held
    none. A ``ValueError``, as LlamaIndex callers of ``get_tool_calls_from_response`` expect."""


class LocalPairError(SpecthinkError):
    """The local llama.cpp pair could not be started, reached or stopped."""


class LocalPairMissingError(LocalPairError):
    """llama-cpp-python's server or the GGUF model file is not installed."""


class BackendError(SpecthinkError):
    """A server failed to answer as expected.

    ``role`` is filled in by the engine ("small" or "target"); ``url`` names the server.
    """

    def __init__(self, message: str, *, url: str = "", role: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.url = redact_url(url) if url else url
        """The server's URL, redacted (:func:`redact_url`): errors travel to clients and logs."""
        self.role = role

    def __str__(self) -> str:
        where = f"{self.role} server {self.url}" if self.role else f"server {self.url}"
        return f"{self.message} ({where})" if self.url or self.role else self.message


class BackendConnectionError(BackendError):
    """The server could not be reached, or the connection broke."""


class StreamDroppedError(BackendConnectionError):
    """The connection broke after tokens had arrived; the engine resumes from the accepted text."""

    def __init__(self, message: str, *, url: str = "", role: str | None = None,
                 tokens_received: int = 0) -> None:
        super().__init__(message, url=url, role=role)
        self.tokens_received = tokens_received


class BackendTimeoutError(BackendError):
    """Connecting took longer than the connect timeout, or no byte arrived within the read timeout.

    A long, healthy stream is never cut: there is no total timeout.
    """


class BackendStatusError(BackendError):
    """The server answered with an HTTP error status and TGI's ``{"error", "error_type"}`` body."""

    status_code: int = 0

    def __init__(self, message: str, *, url: str = "", role: str | None = None,
                 status_code: int = 0, error_type: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, url=url, role=role)
        self.status_code = status_code or type(self).status_code
        self.error_type = error_type
        self.retry_after = retry_after

    def __str__(self) -> str:
        kind = f"{self.status_code} {self.error_type}" if self.error_type else f"{self.status_code}"
        return f"[{kind}] {super().__str__()}"


class RequestValidationError(BackendStatusError):
    """422: the server rejected the request's parameters (TGI ``validation``)."""

    status_code = 422


class GenerationError(BackendStatusError):
    """424: the model failed while generating (TGI ``generation``)."""

    status_code = 424


class OverloadedError(BackendStatusError):
    """429: the server's queue is full (TGI ``overloaded``); retried with backoff."""

    status_code = 429


class IncompleteGenerationError(BackendStatusError):
    """500: the generation stopped before completing (TGI ``incomplete_generation``)."""

    status_code = 500


class UnhealthyError(BackendStatusError):
    """503: the server is not healthy or still loading (TGI ``unhealthy``); retried with backoff."""

    status_code = 503


class InStreamError(BackendError):
    """An ``{"error", "error_type"}`` event arrived inside a 200 stream."""

    def __init__(self, message: str, *, url: str = "", role: str | None = None,
                 error_type: str | None = None, tokens_received: int = 0) -> None:
        super().__init__(message, url=url, role=role)
        self.error_type = error_type
        self.tokens_received = tokens_received

    def __str__(self) -> str:
        return f"[in-stream {self.error_type}] {super().__str__()}"


class ContextLimitError(RequestValidationError):
    """The server refused the request because the prompt, or the prompt plus ``max_new_tokens``,
    exceeds one of its length limits (TGI's 422 ``validation``, vLLM's and SGLang's 400, llama.cpp's
    ``exceed_context_size_error``).

    The limits cached from ``/info`` may be stale (the server restarted with other limits): the
    engine refreshes them (``backend.info(refresh=True)``) and retries once.
    """


class InStreamContextLimitError(ContextLimitError, InStreamError):
    """A :class:`ContextLimitError` reported as an error event inside a 200 stream (TGI's
    ``/generate_stream`` validates after answering 200); it is an :class:`InStreamError` too."""

    def __init__(self, message: str, *, url: str = "", role: str | None = None,
                 error_type: str | None = "validation", tokens_received: int = 0) -> None:
        BackendStatusError.__init__(self, message, url=url, role=role, status_code=422,
                                    error_type=error_type)
        self.tokens_received = tokens_received

    __str__ = InStreamError.__str__


class TargetFallbackWarning(UserWarning):
    """The target failed; the small model went on alone (``on_target_error="fallback"``)."""


_BY_ERROR_TYPE: dict[str, type[BackendStatusError]] = {
    "validation": RequestValidationError,
    "tool_error": RequestValidationError,
    "generation": GenerationError,
    "overloaded": OverloadedError,
    "incomplete_generation": IncompleteGenerationError,
    "unhealthy": UnhealthyError,
}
_BY_STATUS: dict[int, type[BackendStatusError]] = {
    cls.status_code: cls
    for cls in (RequestValidationError, GenerationError, OverloadedError,
                IncompleteGenerationError, UnhealthyError)
}


_CONTEXT_LIMIT = re.compile(
    r"must have less than \d+ tokens"            # TGI: `inputs` must have less than N tokens
    r"|tokens \+ `max_new_tokens` must be <="     # TGI: `inputs` tokens + `max_new_tokens` ...
    r"|maximum context length"                    # vLLM (older), OpenAI
    r"|maximum model length"                      # vLLM: ... longer than the maximum model length
    r"|longer than the model's context length"    # SGLang
    r"|exceeds? the available context size"       # llama.cpp
    r"|exceeds the context length"                # Ollama
    r"|context_length_exceeded|exceed_context_size",
    re.IGNORECASE)
_CONTEXT_LIMIT_STATUSES = (400, 413, 422)


def is_context_limit_message(message: str) -> bool:
    """Whether a server's error message says a length limit was exceeded."""
    return _CONTEXT_LIMIT.search(message) is not None


def error_from_response(status_code: int, payload: object, *, url: str = "",
                        retry_after: float | None = None) -> BackendStatusError:
    """Map an HTTP error answer to an exception: TGI's ``error_type`` first, the status second;
    a 400, 413 or 422 whose message says a length limit was exceeded is a
    :class:`ContextLimitError`.

    ``payload`` is the decoded JSON body (TGI: ``{"error", "error_type"}``; OpenAI-compatible
    servers: ``{"error": {"message", "type"}}`` or ``{"detail": ...}``), or raw text.
    """
    message, error_type = _message_and_type(payload)
    cls: type[BackendStatusError]
    if status_code in _CONTEXT_LIMIT_STATUSES and is_context_limit_message(
            f"{message} {error_type or ''}"):
        cls = ContextLimitError
    else:
        cls = (_BY_ERROR_TYPE.get(error_type or "")
               or _BY_STATUS.get(status_code, BackendStatusError))
    return cls(message or f"HTTP {status_code}", url=url, status_code=status_code,
               error_type=error_type, retry_after=retry_after)


def in_stream_error(message: str, *, url: str = "", error_type: str | None = None,
                    tokens_received: int = 0) -> InStreamError:
    """The exception for an error event inside a 200 stream: an
    :class:`InStreamContextLimitError` when a validation error says a length limit was exceeded,
    else an :class:`InStreamError`."""
    if error_type in (None, "validation", "invalid_request_error", "BadRequestError",
                      "context_length_exceeded", "exceed_context_size_error") and (
            is_context_limit_message(f"{message} {error_type or ''}")):
        return InStreamContextLimitError(message, url=url, error_type=error_type,
                                 tokens_received=tokens_received)
    return InStreamError(message, url=url, error_type=error_type,
                            tokens_received=tokens_received)


def _message_and_type(payload: object) -> tuple[str, str | None]:
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):  # OpenAI style
            return str(error.get("message", "")), _opt_str(error.get("type"))
        if error is not None:
            return str(error), _opt_str(payload.get("error_type"))
        if "detail" in payload:  # FastAPI style (llama-cpp-python)
            return str(payload["detail"]), None
        if "message" in payload:
            return str(payload["message"]), _opt_str(payload.get("type"))
        return str(payload), None
    return (str(payload) if payload else ""), None


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


_RENAMED = {"StreamErrorEvent": "InStreamError", "ContextLimitEvent": "InStreamContextLimitError"}


def __getattr__(name: str) -> type[BackendError]:
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"specthink.errors.{name} is now {new}", DeprecationWarning, stacklevel=2)
        renamed: type[BackendError] = globals()[new]
        return renamed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
