"""Settings validated at the edge: the retention window against the trainer's staleness, the
fair share's weights, the bounds of every wait."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.protocol import TenantRequest


def test_window_defaults_to_staleness_plus_two():
    assert LoraExtConfig().window == 2
    assert LoraExtConfig(max_off_policy=3).window == 5
    assert LoraExtConfig(max_off_policy=3, keep_versions=4).window == 4


def test_window_smaller_than_staleness_names_the_failure_it_prevents():
    with pytest.raises(ValidationError, match="adapter not found"):
        LoraExtConfig(max_off_policy=3, keep_versions=3)
    with pytest.raises(ValidationError):
        LoraExtConfig(keep_versions=0)


def test_environment_is_read_with_the_prefix(monkeypatch):
    monkeypatch.setenv("LORA_EXT_MAX_OFF_POLICY", "1")
    monkeypatch.setenv("LORA_EXT_HOLD_TIMEOUT_S", "7")
    config = LoraExtConfig()
    assert config.window == 3 and config.hold_timeout_s == 7


@pytest.mark.parametrize("weight", ["inf", "nan", "0", "1e-9", "1e9"])
def test_a_tenant_weight_the_counters_cannot_divide_by_is_refused(monkeypatch, weight):
    """An infinite weight would never be charged (its tenant always first); a vanishing
    one overflows its counter: both refused at start, as the admin route refuses them."""
    monkeypatch.setenv("LORA_EXT_TENANT_WEIGHTS", f'{{"A": "{weight}"}}')
    with pytest.raises(ValidationError, match="tenant_weights"):
        LoraExtConfig()
    with pytest.raises(ValidationError, match="weight"):
        TenantRequest.model_validate_json(f'{{"tenant": "A", "weight": "{weight}"}}')
    assert LoraExtConfig(tenant_weights={"A": 1e3, "B": 1e-3}).tenant_weights["B"] == 1e-3


_WAITS = (
    "hold_timeout_s",
    "drain_timeout_s",
    "resume_timeout_s",
    "stable_wait_s",
    "liveness_timeout_s",
    "fair_share_wait_s",
    "lease_ttl_s",
    "watch_interval_s",
)


@pytest.mark.parametrize("name", _WAITS)
@pytest.mark.parametrize("value", ["inf", "nan", "1e9", "0", "-1"])
def test_every_wait_is_bounded(monkeypatch, name, value):
    """A timeout of inf (or one never reached) would hold a request, a pause or a load
    for ever: refused at start, from the environment as from code."""
    monkeypatch.setenv(f"LORA_EXT_{name.upper()}", value)
    with pytest.raises(ValidationError, match=name):
        LoraExtConfig()
    monkeypatch.setenv(f"LORA_EXT_{name.upper()}", "86400")
    assert getattr(LoraExtConfig(), name) == 86400


@pytest.mark.parametrize(("name", "value"), [("lease_ttl_s", 2.9), ("watch_interval_s", 0.001)])
def test_a_period_that_would_spin_is_refused(name, value):
    """Leases are rewritten every third of their ttl, the broadcast roots listed every
    watch interval: below the floor either becomes a loop of file-system calls."""
    with pytest.raises(ValidationError, match=name):
        LoraExtConfig(**{name: value})
