"""Request and response bodies of the ``/skyrl/v1/`` routes (the HTTP contract)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vllm_lora_ext.config import Weight

NameField = Field(min_length=1, max_length=256)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AbortLoraRequest(_Body):
    lora_name: str = NameField


class AbortLoraResponse(BaseModel):
    lora_name: str
    aborted: int


class PauseRequest(_Body):
    lora_name: str | None = Field(default=None, min_length=1, max_length=256)
    mode: Literal["abort", "keep", "wait"] = "keep"
    timeout_s: float | None = Field(
        default=None, gt=0, le=3600, description="Drain bound for mode 'wait'."
    )


class ResumeRequest(_Body):
    lora_name: str | None = Field(default=None, min_length=1, max_length=256)


class PauseResponse(BaseModel):
    lora_name: str | None
    paused: bool
    mode: str | None = None
    interrupted: int | None = None


class LoadLoraRequest(_Body):
    lora_name: str = NameField
    lora_path: str = Field(min_length=1, max_length=4096)
    interrupt: Literal["abort", "continue"] | None = Field(
        default=None,
        description="What happens to requests in flight on older versions: by default "
        "they finish on their version; 'abort' returns them partial, 'continue' moves "
        "them onto the new version.",
    )
    pin: bool = Field(default=False, description="Keep this version resident until unpinned.")
    version: int | None = Field(
        default=None,
        ge=1,
        description="The number this version gets (e.g. the trainer's step), so that "
        "name@N means the same weights on every replica. It must be newer than the "
        "name's versions; asking again for the version the name serves, from the same "
        "path, changes nothing (answered with unchanged: true), so a retried or "
        "reconciling load is safe. Default: the next number.",
    )


class PinLoraRequest(_Body):
    lora_name: str = NameField
    version: int = Field(ge=1)
    pinned: bool = True


class PinLoraResponse(BaseModel):
    lora_name: str
    version: int
    pinned: bool


class LoadLoraResponse(BaseModel):
    lora_name: str
    version: int
    lora_int_id: int
    lora_path: str
    pinned: bool
    interrupted: int = Field(description="Requests stopped by 'interrupt'.")
    add_lora_ms: float = Field(description="The engine's add_lora time alone.")
    latency_ms: float = Field(description="The whole load: checks, staging, add_lora, commit.")
    timings_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Where the time went: checks (before the name's lock), lock (waiting "
        "for an earlier load of the name), step (waiting for and verifying a broadcast "
        "step), stage (the staged copy, checked), add_lora (the engine), commit.",
    )
    unchanged: bool = Field(
        default=False, description="The name already served this version: nothing done."
    )


class UnloadLoraRequest(_Body):
    lora_name: str = NameField
    version: int | None = Field(default=None, ge=1, description="Only this version.")


class UnloadLoraResponse(BaseModel):
    lora_name: str
    unloaded_versions: list[int]


class VersionInfo(BaseModel):
    version: int
    lora_int_id: int
    internal_name: str
    in_flight: int
    path: str
    pinned: bool
    unloaded: bool


class AdapterInfo(BaseModel):
    lora_name: str
    version: int | None
    paused: bool
    pause_mode: str | None
    in_flight: int
    held: int
    versions: list[VersionInfo]


class TenantRequest(_Body):
    """A tenant's share at run time: ``max_in_flight: null`` lifts its cap; a field left
    out is left as it is."""

    tenant: str = Field(
        min_length=1, max_length=256, description="Adapter name, or '__base__' for the base model."
    )
    weight: Weight | None = None
    max_in_flight: int | None = Field(default=None, ge=1)


class TenantInfo(BaseModel):
    tenant: str
    weight: float
    max_in_flight: int | None
    running: int = Field(default=0, description="Engine sequences it holds now.")
    queued: int = Field(default=0, description="Requests waiting for its share.")
    service_tokens: int = Field(default=0, description="Prompt + generated tokens received.")


class LorasResponse(BaseModel):
    adapters: list[AdapterInfo]
    engine_adapters: int = Field(description="Adapters registered in the engine (all names).")
    tenants: list[TenantInfo] = Field(
        default_factory=list, description="The fair share per tenant (empty when it is off)."
    )


class StateResponse(BaseModel):
    sizes: dict[str, int] = Field(
        description="Entries of each piece of state: adapters, versions, flights, "
        "waiters, tombstones, segments, events, tenant settings, leases, staged copies, "
        "locks, removals, published names."
    )


class ErrorInfo(BaseModel):
    message: str
    type: str = Field(description="The HTTP status phrase, as vLLM's own errors say it.")
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    """vLLM's error format (``ErrorResponse``), the same on every route of the server."""

    error: ErrorInfo


def error_body(message: str, status: int) -> dict:
    info = ErrorInfo(message=message, type=HTTPStatus(status).phrase, code=status)
    return ErrorBody(error=info).model_dump()
