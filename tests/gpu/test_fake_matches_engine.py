"""The shared scenarios on a real AsyncLLM (in this process): the answers the fake engine
of the unit tests must give too (tests/unit/test_fake_engine.py)."""

from __future__ import annotations

import pytest
import pytest_asyncio
from engine_scenarios import SCENARIOS
from vllm.lora.request import LoRARequest

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(toy):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(toy.model),
        enable_lora=True,
        max_lora_rank=16,
        max_loras=2,
        max_cpu_loras=2,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=8,
        kv_cache_memory_bytes=64 * 1024 * 1024,
        enable_prefix_caching=False,
    )
    llm = AsyncLLM.from_engine_args(args)
    try:
        yield llm
    finally:
        llm.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lora(engine, toy) -> LoRARequest:
    req = LoRARequest("meow@1", 1, str(toy.adapters["meow"]))
    await engine.add_lora(req)
    return req


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_engine_answers_the_shared_scenarios(engine, lora, name):
    scenario, expected = SCENARIOS[name]
    assert await scenario(engine, lora) == expected
    assert not engine.output_processor.request_states  # each scenario cleans up
