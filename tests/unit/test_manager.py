"""LoraManager against a fake engine: leases on every exit path, bounded waits, abort
filtering, failed loads leaving the previous version serving."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from fakes import FakeEngine, write_adapter
from vllm.exceptions import GracefulHTTPError
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, SamplingParams

from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.errors import AdapterBusyError, InvalidAdapterError
from vllm_lora_ext.manager import LoraManager


async def make(tmp_path, **cfg) -> tuple[LoraManager, FakeEngine]:
    engine = FakeEngine(**cfg.pop("engine", {}))
    config = LoraExtConfig(
        **{"hold_timeout_s": 0.2, "drain_timeout_s": 0.2, "keep_versions": 1, **cfg}
    )
    manager = LoraManager(engine, config)
    manager.install()
    await manager.load("meow", str(write_adapter(tmp_path / "meow1")))
    return manager, engine


def meow() -> LoRARequest:
    return LoRARequest("meow", 1, "/alias")


def params() -> SamplingParams:
    return SamplingParams(max_tokens=3, output_kind=RequestOutputKind.FINAL_ONLY)


async def drain(gen) -> list:
    return [o async for o in gen]


async def test_requests_run_on_the_leased_internal_version(tmp_path):
    m, engine = await make(tmp_path)
    outs = await drain(engine.generate("p", params(), "r1", lora_request=meow()))
    assert outs[-1].outputs[0].finish_reason == "length"
    assert engine.seen_loras == ["meow@1"]  # the version, never the public alias
    assert m.registry.in_flight("meow") == 0


async def test_base_model_and_foreign_adapters_pass_through(tmp_path):
    m, engine = await make(tmp_path)
    await drain(engine.generate("p", params(), "r1"))
    await drain(engine.generate("p", params(), "r2", lora_request=LoRARequest("other", 7, "/o")))
    assert engine.seen_loras == [None, "other"]
    assert m.registry.get("meow").current_version.refcount == 0  # no lease taken


async def test_lease_released_when_engine_errors(tmp_path):
    m, engine = await make(tmp_path)
    engine.fail_generate = RuntimeError("engine fell over")
    with pytest.raises(RuntimeError):
        await drain(engine.generate("p", params(), "r1", lora_request=meow()))
    assert m.registry.get("meow").current_version.refcount == 0


async def test_lease_released_when_client_goes_away_mid_stream(tmp_path):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 100, "step_s": 0.01})
    gen = engine.generate("p", params(), "r1", lora_request=meow())
    task = asyncio.create_task(drain(gen))
    await asyncio.sleep(0.05)
    assert m.registry.in_flight("meow") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert m.registry.in_flight("meow") == 0
    assert m.registry.get("meow").current_version.refcount == 0


async def test_paused_adapter_holds_then_503(tmp_path):
    m, engine = await make(tmp_path)
    await m.pause("meow", "keep", None)
    with pytest.raises(GracefulHTTPError) as err:
        await drain(engine.generate("p", params(), "r1", lora_request=meow()))
    assert err.value.http_status == 503
    assert m.registry.get("meow").held == 0 and m.registry.in_flight("meow") == 0


async def test_held_request_proceeds_on_resume(tmp_path):
    m, engine = await make(tmp_path, hold_timeout_s=5)
    await m.pause("meow", "keep", None)
    task = asyncio.create_task(drain(engine.generate("p", params(), "r1", lora_request=meow())))
    await asyncio.sleep(0.05)
    assert m.registry.get("meow").held == 1 and not task.done()
    m.resume("meow")
    assert (await asyncio.wait_for(task, 2))[-1].finished


async def test_shutdown_releases_held_requests_with_503(tmp_path):
    m, engine = await make(tmp_path, hold_timeout_s=30)
    await m.pause("meow", "keep", None)
    task = asyncio.create_task(drain(engine.generate("p", params(), "r1", lora_request=meow())))
    await asyncio.sleep(0.05)
    await m.shutdown()
    with pytest.raises(GracefulHTTPError) as err:
        await asyncio.wait_for(task, 2)
    assert err.value.http_status == 503


async def test_wait_mode_timeout_undoes_the_pause(tmp_path):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 100, "step_s": 0.01})
    task = asyncio.create_task(drain(engine.generate("p", params(), "r1", lora_request=meow())))
    await asyncio.sleep(0.02)
    with pytest.raises(AdapterBusyError) as err:
        await m.pause("meow", "wait", 0.05)
    assert err.value.status == 504
    assert not m.registry.get("meow").paused
    await task


async def test_abort_filters_engine_states_and_counts_parents_once(tmp_path):
    m, engine = await make(tmp_path)
    parent = SimpleNamespace(request_id="parent")
    engine.output_processor.request_states = {
        "a": SimpleNamespace(lora_name="meow@1", parent_req=None),
        "c0": SimpleNamespace(lora_name="meow@1", parent_req=parent),
        "c1": SimpleNamespace(lora_name="meow@1", parent_req=parent),
        "w": SimpleNamespace(lora_name="woof@1", parent_req=None),
        "b": SimpleNamespace(lora_name=None, parent_req=None),
    }
    assert await m.abort("meow") == 2
    assert engine.aborted == [(["a", "c0", "c1"], True)]


async def test_failed_load_keeps_previous_version_and_cleans_engine(tmp_path):
    m, engine = await make(tmp_path)
    before = dict(engine.loaded)
    engine.fail_add = RuntimeError("bad weights")
    with pytest.raises(InvalidAdapterError, match="bad weights"):
        await m.load("meow", str(write_adapter(tmp_path / "meow2")))
    assert m.registry.get("meow").current == 1
    assert engine.loaded == before


async def test_swap_retires_old_version_after_its_last_request(tmp_path):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 20, "step_s": 0.01})
    old_id = m.registry.get("meow").current_version.lora_int_id
    task = asyncio.create_task(drain(engine.generate("p", params(), "r1", lora_request=meow())))
    await asyncio.sleep(0.03)
    await m.load("meow", str(write_adapter(tmp_path / "meow2")))
    await asyncio.sleep(0)
    assert old_id not in engine.removed  # still in use
    await task
    for _ in range(50):
        if old_id in engine.removed:
            break
        await asyncio.sleep(0.01)
    assert engine.removed == [old_id]
    assert list(m.registry.get("meow").versions) == [2]
    await m.shutdown()
