"""The one source of truth for the extension's settings.

Read from the environment (prefix ``LORA_EXT_``) when the extension runs as a plugin of
stock vLLM, or passed in explicitly by the Ray actor and the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: A tenant's share weight, finite and within a factor 1,000 of the default (1) either
#: way: an infinite weight would never be charged for service (its tenant would always
#: go first, the others starve) and a vanishing one would overflow its counter to inf
#: (every such tenant then tied), so both are refused at the edge.
MIN_WEIGHT, MAX_WEIGHT = 1e-3, 1e3
Weight = Annotated[float, Field(ge=MIN_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)]

#: Every wait has a bound: a timeout is finite and at most a day (``inf``, or a number
#: so large it is never reached, would hold a request, a pause or a load for ever).
MAX_WAIT_S = 86_400.0
Seconds = Annotated[float, Field(gt=0, le=MAX_WAIT_S, allow_inf_nan=False)]


class LoraExtConfig(BaseSettings):
    """Timeouts and retention of the lora-aware routes."""

    model_config = SettingsConfigDict(env_prefix="LORA_EXT_", extra="forbid")

    hold_timeout_s: Seconds = Field(
        default=120.0,
        description="How long a new request for a paused adapter is held before a 503.",
    )
    drain_timeout_s: Seconds = Field(
        default=120.0, description="Default bound of pause mode 'wait'."
    )
    resume_timeout_s: Seconds = Field(
        default=600.0,
        description="How long a request stopped by pause mode 'keep' waits for resume "
        "before it is returned to its caller partial, with finish_reason 'abort'.",
    )
    max_off_policy: int | None = Field(
        default=None,
        ge=0,
        description="The trainer's max staleness in versions (async level): a request may "
        "still ask for a version this many loads old. Sets the default of keep_versions.",
    )
    keep_versions: int | None = Field(
        default=None,
        ge=1,
        description="Resident versions kept per adapter name (current included); older "
        "idle, unpinned versions are removed from the engine. Default: max_off_policy + 2, "
        "or 2.",
    )
    stage_adapters: bool = Field(
        default=True,
        description="Copy each loaded version into a server-owned directory and load it "
        "from there, so a trainer that deletes or rewrites its files in place can never "
        "break a version still in use (vLLM reloads evicted adapters from their path).",
    )
    stage_dir: Path | None = Field(
        default=None,
        description="Where staged copies live (default: a fresh directory in /dev/shm when "
        "it has 2 GiB free, else in the temporary directory).",
    )
    stage_priority: Literal["normal", "low", "idle"] = Field(
        default="low",
        description="CPU priority of the threads that copy and hash staged adapters: "
        "'low' (nice 10) lets a big copy slow the engine a little and keeps swaps quick "
        "under load; 'idle' (SCHED_IDLE) copies only on otherwise idle cores, so other "
        "tenants never wait for it but a swap on a saturated CPU can take seconds.",
    )
    stable_wait_s: Seconds = Field(
        default=30.0,
        description="How long a load of a broadcast step waits for its STABLE sentinel "
        "and manifest-verified files to become visible before a 425.",
    )
    lease_ttl_s: Seconds = Field(
        default=600.0,
        ge=3,
        description="A broadcast step's lease file not refreshed for this long is stale "
        "(its server died); servers refresh theirs every third of it (so at least 3 s: "
        "shorter rewrites the leases in a loop).",
    )
    watch: dict[str, Path] = Field(
        default_factory=dict,
        description="Adapter name -> broadcast root: the newest stable step is swapped in "
        "automatically (CLI: --watch name=root; env: JSON object).",
    )
    watch_interval_s: Seconds = Field(
        default=1.0,
        ge=0.01,
        description="Watcher poll period (at least 10 ms: shorter lists the broadcast "
        "roots in a loop, a metadata storm on NFS).",
    )
    admin_key: SecretStr | None = Field(
        default=None,
        description="Bearer token the /skyrl/v1 routes require (separate from vLLM's "
        "--api-key); unset: no token needed. CLI: --lora-admin-key.",
    )
    allow_open_bind: bool = Field(
        default=False,
        description="Serve on an address beyond loopback without an admin_key (anyone who "
        "reaches the port may then load, unload, pause and abort adapters). Off: such a "
        "launch is refused.",
    )
    lora_roots: list[Path] = Field(
        default_factory=list,
        description="Directories every lora_path must lie under (symlinks resolved); "
        "empty: any path. CLI: --lora-root (repeatable).",
    )
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest request body of a /skyrl/v1 route."
    )
    manage_vllm_lora_routes: bool = Field(
        default=True,
        description="Put vLLM's own /v1/load_lora_adapter, /v1/unload_lora_adapter and "
        "LoRA resolvers through the extension (new names become managed, in-place reloads "
        "new versions). False leaves them stock: such adapters bypass the extension.",
    )
    stack_routes: set[Literal["prime-rl", "areal"]] = Field(
        default_factory=set,
        description="Serve an RL stack's own routes under the names its code calls: "
        "'prime-rl' (POST /load_lora_adapter, GET /liveness), 'areal' (POST "
        "/areal_pause_generation, /areal_continue_generation). Opt-in: a stock-vLLM user "
        'would not expect them. Env: LORA_EXT_STACK_ROUTES=\'["prime-rl", "areal"]\'.',
    )
    liveness_timeout_s: Seconds = Field(
        default=10.0, description="Bound of one engine health check (GET /liveness)."
    )
    fair_share: bool = Field(
        default=True,
        description="A fair share of the engine per tenant (adapter name; the base model "
        "is the tenant '__base__'): at most the engine's batch (plus fair_share_headroom) "
        "is admitted, the rest waits per tenant and the least served tenant goes next "
        "(VTC). False: vLLM's first-come first-served.",
    )
    fair_share_headroom: int = Field(
        default=2,
        ge=0,
        description="Sequences admitted beyond the engine's --max-num-seqs, so it never "
        "idles between a finish and the next admission.",
    )
    fair_share_reserve: int = Field(
        default=1,
        ge=0,
        description="Sequences of the engine's batch kept for tenants with nothing "
        "running: a tenant that arrives while others flood runs at the engine's next step "
        "instead of waiting for a finish. Tenants already running then fill at most "
        "--max-num-seqs minus this (the headroom is kept for arrivals too); 0: they fill "
        "the batch and the headroom.",
    )
    fair_share_wait_s: Seconds = Field(
        default=3600.0,
        description="Longest a request waits for its tenant's share (then 503).",
    )
    tenant_weights: dict[str, Weight] = Field(
        default_factory=dict,
        description=f"Share weight per tenant (default 1; {MIN_WEIGHT:g} to {MAX_WEIGHT:g}).",
    )
    tenant_max_in_flight: dict[str, PositiveInt] = Field(
        default_factory=dict, description="Most engine sequences per tenant (default: none)."
    )
    lora_id_base: int = Field(
        default=1_000_000,
        ge=1,
        description="First lora_int_id the extension hands out; far above the ids vLLM "
        "gives --lora-modules, so the two never collide.",
    )

    @model_validator(mode="after")
    def _retention_window(self) -> LoraExtConfig:
        if self.keep_versions is None:
            self.keep_versions = (self.max_off_policy or 0) + 2
        elif self.max_off_policy is not None and self.keep_versions < self.max_off_policy + 1:
            raise ValueError(
                f"keep_versions={self.keep_versions} is smaller than max_off_policy + 1 = "
                f"{self.max_off_policy + 1}: a request pinned to a version "
                f"{self.max_off_policy} loads old would find it removed ('adapter not found')"
            )
        return self

    @property
    def window(self) -> int:
        """keep_versions, resolved (never None after validation)."""
        assert self.keep_versions is not None
        return self.keep_versions
