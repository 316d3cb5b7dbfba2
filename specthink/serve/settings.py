"""What ``specthink serve`` is configured with: one frozen pydantic model, filled by the CLI
(options with environment defaults) and handed to every worker process."""

from __future__ import annotations

import json
import os
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from specthink.backends import BackendKind
from specthink.rules import PRESETS

__all__ = ["ENV_SETTINGS", "ReasoningField", "ServeSettings"]

ReasoningField = Literal["both", "reasoning_content", "reasoning"]

ENV_SETTINGS = "SPECTHINK_SERVE_SETTINGS"
"""Where the CLI leaves the settings (without secrets) for ``--workers`` processes."""
ENV_CLIENT_KEYS = "SPECTHINK_SERVE_API_KEYS"
ENV_UPSTREAM_KEY = "SPECTHINK_API_KEY"


class ServeSettings(BaseModel):
    """Settings of one ``specthink serve`` process (every worker gets the same)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    small_url: str = Field(min_length=1)
    """The small (speculative) model's server."""
    target_url: str = Field(min_length=1)
    """The target model's server."""
    backend: BackendKind = "tgi"
    """Wire protocol of both model servers: one of ``specthink.backends.kinds()``."""
    small_model: str | None = None
    """Model name sent to an OpenAI-compatible or Ollama small server (default: the one it
    serves)."""
    target_model: str | None = None
    """Model name sent to an OpenAI-compatible or Ollama target server."""
    upstream_api_key: SecretStr | None = None
    """Bearer token sent to both model servers (``$SPECTHINK_API_KEY``)."""
    api_keys: tuple[SecretStr, ...] = ()
    """Keys clients must send as ``Authorization: Bearer``; none: the server is open."""
    model_name: str = Field(default="specthink", min_length=1)
    """The one model id clients ask for and ``/v1/models`` lists."""
    rules: str = "paper"
    """Default takeover rules preset; a request may pick another or override fields."""
    small_template: str = "auto"
    target_template: str = "auto"
    max_tokens: int = Field(default=4096, gt=0)
    """Default and upper bound of a request's ``max_tokens``."""
    max_concurrency: int | None = Field(default=None, gt=0)
    """Chat requests in flight per worker; more are answered 429. ``None``: no limit."""
    reasoning_field: ReasoningField = "both"
    """Where the reasoning goes: ``reasoning_content`` (DeepSeek, vLLM <= 0.10), ``reasoning``
    (vLLM >= 0.11, OpenRouter) or both."""
    on_target_error: Literal["fallback", "raise"] = "fallback"
    """The target fails: the small model finishes alone (marked in the statistics), or 502/503."""
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    """Request bodies above this are answered 413."""
    drain_timeout: float = Field(default=30.0, ge=0)
    """Seconds in-flight requests may take to finish after SIGTERM."""
    max_header_bytes: int = Field(default=64 * 1024, gt=0)
    """Request heads (request line and headers) above this are answered 431 and closed."""
    header_timeout: float = Field(default=20.0, gt=0)
    """Seconds a client may take to send a request head; then 408 and closed."""

    @field_validator("rules")
    @classmethod
    def _known_preset(cls, rules: str) -> str:
        if rules not in PRESETS:
            raise ValueError(f"unknown rules preset {rules!r}; choose one of {sorted(PRESETS)}")
        return rules

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
        env = {ENV_SETTINGS: self.model_dump_json(exclude={"api_keys", "upstream_api_key"})}
        env[ENV_CLIENT_KEYS] = ",".join(key.get_secret_value() for key in self.api_keys)
        env[ENV_UPSTREAM_KEY] = (self.upstream_api_key.get_secret_value()
                                 if self.upstream_api_key else "")
        return env

    @classmethod
    def from_environment(cls) -> Self:
        """The settings a ``--workers`` process finds in its environment."""
        data = json.loads(os.environ[ENV_SETTINGS])
        data["api_keys"] = parse_keys(os.environ.get(ENV_CLIENT_KEYS, ""))
        data["upstream_api_key"] = os.environ.get(ENV_UPSTREAM_KEY) or None
        return cls.model_validate(data)


def parse_keys(text: str) -> tuple[str, ...]:
    """``SPECTHINK_SERVE_API_KEYS``: comma-separated keys, blanks around them ignored."""
    return tuple(key.strip() for key in text.split(",") if key.strip())
