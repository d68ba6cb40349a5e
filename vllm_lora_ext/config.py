"""The one source of truth for the extension's settings.

Read from the environment (prefix ``LORA_EXT_``) when the extension runs as a plugin of
stock vLLM, or passed in explicitly by the Ray actor and the tests.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LoraExtConfig(BaseSettings):
    """Timeouts and retention of the lora-aware routes."""

    model_config = SettingsConfigDict(env_prefix="LORA_EXT_", extra="forbid")

    hold_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="How long a new request for a paused adapter is held before a 503.",
    )
    drain_timeout_s: float = Field(
        default=120.0, gt=0, description="Default bound of pause mode 'wait'."
    )
    resume_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="How long a request stopped by pause mode 'keep' waits for resume "
        "before it is returned to its caller partial, with finish_reason 'abort'.",
    )
    keep_versions: int = Field(
        default=2,
        ge=1,
        description="Resident versions kept per adapter name (current included); older "
        "idle, unpinned versions are removed from the engine.",
    )
    lora_id_base: int = Field(
        default=1_000_000,
        ge=1,
        description="First lora_int_id the extension hands out; far above the ids vLLM "
        "gives --lora-modules, so the two never collide.",
    )
