"""What ``specthink serve`` is configured with: one frozen pydantic model, filled by the CLI
(options with environment defaults) and handed to every worker process."""

from __future__ import annotations

import json
import os
from typing import Literal, Self

from pydantic import ConfigDict, Field, SecretStr, field_validator

from specthink.settings import PairSettings

__all__ = ["ENV_SETTINGS", "ReasoningField", "ServeSettings"]

ReasoningField = Literal["both", "reasoning_content", "reasoning"]

ENV_SETTINGS = "SPECTHINK_SERVE_SETTINGS"
"""Where the CLI leaves the settings (without secrets) for ``--workers`` processes."""
ENV_CLIENT_KEYS = "SPECTHINK_SERVE_API_KEYS"
ENV_UPSTREAM_KEY = "SPECTHINK_API_KEY"


class ServeSettings(PairSettings):
    """Settings of one ``specthink serve`` process (every worker gets the same)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The pair (small_url, target_url, backend, small_model, target_model, rules, templates,
    # on_target_error, api_key: the bearer token sent to both model servers, timeout,
    # max_retries, routing_headers) is specthink.settings.PairSettings, declared there once.
    api_keys: tuple[SecretStr, ...] = ()
    """Keys clients must send as ``Authorization: Bearer``; none: the server is open."""
    model_name: str = Field(default="specthink", min_length=1)
    """The one model id clients ask for and ``/v1/models`` lists."""
    max_tokens: int = Field(default=4096, gt=0)
    """Default and upper bound of a request's ``max_tokens``."""
    max_concurrency: int | None = Field(default=None, gt=0)
    """Chat requests in flight per worker; more are answered 429. ``None``: no limit."""
    reasoning_field: ReasoningField = "both"
    """Where the reasoning goes: ``reasoning_content`` (DeepSeek, vLLM <= 0.10), ``reasoning``
    (vLLM >= 0.11, OpenRouter) or both."""
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    """Request bodies above this are answered 413."""
    drain_timeout: float = Field(default=30.0, ge=0)
    """Seconds in-flight requests may take to finish after SIGTERM."""
    max_header_bytes: int = Field(default=64 * 1024, gt=0)
    """Request heads (request line and headers) above this are answered 431 and closed."""
    header_timeout: float = Field(default=20.0, gt=0)
    """Seconds a client may take to send a request head; then 408 and closed."""
    responses_store: int = Field(default=1024, ge=0)
    """Responses API answers each worker keeps for ``previous_response_id`` and
    ``GET /v1/responses/{id}`` (the oldest go first); ``0`` keeps none."""
    responses_ttl: float = Field(default=3600.0, gt=0)
    """Seconds a kept Responses API answer stays readable."""

    @field_validator("api_keys")
    @classmethod
    def _non_empty_keys(cls, keys: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        if any(not key.get_secret_value() for key in keys):
            raise ValueError("an API key must not be empty")
        return keys

    @property
    def open(self) -> bool:
        """No key configured: every client is served."""
        return not self.api_keys

    def to_environment(self) -> dict[str, str]:
        """Environment variables that carry these settings to worker processes: the secrets in
        their usual variables, the rest as JSON."""
        env = {ENV_SETTINGS: self.model_dump_json(exclude={"api_keys", "api_key"})}
        env[ENV_CLIENT_KEYS] = ",".join(key.get_secret_value() for key in self.api_keys)
        env[ENV_UPSTREAM_KEY] = self.api_key.get_secret_value() if self.api_key else ""
        return env

    @classmethod
    def from_environment(cls) -> Self:
        """The settings a ``--workers`` process finds in its environment."""
        data = json.loads(os.environ[ENV_SETTINGS])
        data["api_keys"] = parse_keys(os.environ.get(ENV_CLIENT_KEYS, ""))
        data["api_key"] = os.environ.get(ENV_UPSTREAM_KEY) or None
        return cls(**data)


def parse_keys(text: str) -> tuple[str, ...]:
    """``SPECTHINK_SERVE_API_KEYS``: comma-separated keys, blanks around them ignored."""
    return tuple(key.strip() for key in text.split(",") if key.strip())
