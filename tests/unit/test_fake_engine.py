"""The fake engine answers the shared scenarios as the real engine does (the same
scenarios run on a real AsyncLLM in tests/gpu/test_fake_matches_engine.py)."""

from __future__ import annotations

import pytest
from engine_scenarios import SCENARIOS
from fakes import FakeEngine
from vllm.lora.request import LoRARequest


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_fake_answers_like_the_engine(name):
    scenario, expected = SCENARIOS[name]
    engine = FakeEngine(tokens_per_request=100_000, step_s=0.001)
    lora = LoRARequest("meow@1", 1, "/adapters/meow")
    await engine.add_lora(lora)
    try:
        assert await scenario(engine, lora) == expected
    finally:
        engine.shutdown()
