"""Every error ``specthink serve`` answers, as an OpenAI error object, built in one place.

``{"error": {"message", "type", "param", "code"}}`` with the status OpenAI uses for it:

=====  ==========================  ==============================================================
400    ``invalid_request_error``   malformed JSON, an invalid or unsupported field (named in
                                   ``param``); found before any request to a model server
401    ``authentication_error``    missing or wrong API key (the key is never echoed)
404    ``not_found_error``         a model other than ``--model-name``, or an unknown path
413    ``invalid_request_error``   the body is larger than the limit
429    ``rate_limit_error``        more chat requests in flight than ``--max-concurrency``
499    (no body is read)           the client hung up before its request was read (nginx's
                                   "client closed request"; for the metrics and access log)
500    ``server_error``            a bug: the message carries a reference, never a traceback
502    ``upstream_error``          a model server answered wrongly (``code`` names which)
503    ``upstream_unavailable``    a model server is down, overloaded or unhealthy
=====  ==========================  ==============================================================
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
from starlette.requests import ClientDisconnect

from specthink.errors import (
    BackendConnectionError,
    BackendError,
    ConfigError,
    ContextLimitError,
    OverloadedError,
    PromptTooLongError,
    RequestValidationError,
    UnhealthyError,
)

__all__ = ["APIError", "error_body", "from_exception"]

logger = logging.getLogger("specthink.serve")


class APIError(Exception):
    """An error answer: the HTTP status and the fields of the OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def json(self) -> bytes:
        return orjson.dumps(self.body())


def error_body(error: APIError) -> bytes:
    return error.json()


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400: the request itself is wrong."""
    return APIError(400, message, param=param, code=code)


def unauthorized() -> APIError:
    return APIError(401, "Missing or invalid API key: send Authorization: Bearer <key>.",
                    type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def model_not_found(asked: object, served: str) -> APIError:
    return APIError(404, f"The model {asked!r} does not exist here; this server serves "
                         f"{served!r}.", type="not_found_error", param="model",
                    code="model_not_found")


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.",
                    code="request_too_large")


def too_busy(limit: int) -> APIError:
    return APIError(429, f"More than {limit} chat requests are in flight; retry shortly.",
                    type="rate_limit_error", code="too_many_requests",
                    headers={"Retry-After": "1"})


_PARAMS = {"max_new_tokens": "max_tokens", "rules": "specthink.rules", "session_id": "user",
           "sampling": "temperature", "template_kwargs": "chat_template_kwargs"}
"""The request's fields whose OpenAI parameter has another name (the rest are the same)."""


def openai_param(field: str | None) -> str | None:
    """The OpenAI parameter a request field came from (``rules.n1`` ->
    ``specthink.rules.n1``)."""
    if field is None:
        return None
    head, dot, rest = field.partition(".")
    param = _PARAMS.get(head, head)
    return f"{param}.{rest}" if dot else param


def from_exception(exc: BaseException, *, param: str | None = None) -> APIError:
    """The answer for an exception raised while serving a chat request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ClientDisconnect):
        # No one is left to read an answer, and nothing went wrong here: no traceback, no 5xx.
        return APIError(499, "The client closed the connection before its request was read.",
                        code="client_closed_request")
    if isinstance(exc, PromptTooLongError):
        return invalid(str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, ConfigError):
        # Raised by the engine too (what it finds while preparing): its field names the param.
        return invalid(str(exc), param or openai_param(exc.field))
    if isinstance(exc, BackendError):
        return _upstream(exc)
    reference = uuid.uuid4().hex[:12]
    logger.error("internal error %s", reference, exc_info=exc)
    return APIError(500, f"Internal server error (reference {reference}).", type="server_error",
                    code="internal_error")


def _upstream(exc: BackendError) -> APIError:
    """502/503 naming the model server (``small`` or ``target``) that failed."""
    role = exc.role or "a"
    server = f"the {role} model server" if exc.role else "a model server"
    code = f"{exc.role}_server_error" if exc.role else "model_server_error"
    if isinstance(exc, ContextLimitError):
        # The server measured the prompt against its context and it does not fit.
        return invalid(f"the prompt does not fit {server}'s context: {exc}", "messages",
                       "context_length_exceeded")
    if isinstance(exc, RequestValidationError):
        # The server refused what we sent (typically a prompt over its token limit): the
        # client can fix it, so it is the client's 400, still naming the server.
        return invalid(f"{server} rejected the request: {exc}", None, code)
    if isinstance(exc, BackendConnectionError | OverloadedError | UnhealthyError):
        return APIError(503, f"{server} is unavailable: {exc}", type="upstream_unavailable",
                        code=code)
    return APIError(502, f"{server} failed: {exc}", type="upstream_error", code=code)
