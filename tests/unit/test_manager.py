"""LoraManager against a fake engine: leases on every exit path, bounded waits, abort
filtering, failed loads leaving the previous version serving."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from fakes import FakeEngine, write_adapter
from vllm.exceptions import GracefulHTTPError
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, SamplingParams

from vllm_lora_ext import broadcast
from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.errors import AdapterBusyError, InvalidAdapterError
from vllm_lora_ext.server.manager import LoraManager


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


def params(kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY) -> SamplingParams:
    return SamplingParams(max_tokens=1000, output_kind=kind)


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
    assert err.value.status == 409
    assert not m.registry.get("meow").paused
    await task


async def test_abort_stops_only_the_segments_of_that_adapter(tmp_path):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 100, "step_s": 0.01})
    await m.load("woof", str(write_adapter(tmp_path / "woof1")))
    meows = [
        asyncio.create_task(drain(engine.generate("p", params(), f"m{i}", lora_request=meow())))
        for i in range(2)
    ]
    woof = asyncio.create_task(
        drain(engine.generate("p", params(), "w", lora_request=LoRARequest("woof", 2, "/x")))
    )
    await wait_until(lambda: len(engine.running) == 3)
    assert await m.abort("meow") == 2
    assert sorted(engine.aborted[0][0]) == ["m0", "m1"]
    for t in meows:
        assert (await t)[-1].outputs[0].finish_reason == "abort"
    assert (await woof)[-1].outputs[0].finish_reason == "length"
    assert m.registry.in_flight("meow") == m.registry.in_flight("woof") == 0
    assert all(v.refcount == 0 for v in m.registry.get("meow").versions.values())


async def wait_until(cond, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - polling fake state is the point
            await asyncio.sleep(0.005)


async def start_long(engine, rid: str, kind=RequestOutputKind.DELTA) -> asyncio.Task:
    task = asyncio.create_task(drain(engine.generate("p", params(kind), rid, lora_request=meow())))
    await wait_until(lambda: rid in engine.running)
    await asyncio.sleep(0.05)  # some tokens on the old version
    return task


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
async def test_load_with_continue_moves_in_flight_requests_to_the_new_version(tmp_path, kind):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 40, "step_s": 0.005})
    task = await start_long(engine, "r1", kind)
    await m.load("meow", str(write_adapter(tmp_path / "meow2")), interrupt="continue")
    outs = await asyncio.wait_for(task, 5)
    if kind == RequestOutputKind.DELTA:
        tokens = [t for o in outs for t in o.outputs[0].token_ids]
    else:
        tokens = list(outs[-1].outputs[0].token_ids)
    assert tokens == list(range(100, 140))  # nothing lost, nothing repeated
    assert outs[-1].outputs[0].finish_reason == "length"
    assert engine.seen_loras == ["meow@1", "meow@2"]
    spans = m.spans.choices("r1")
    assert [s.version for s in spans[0]] == [1, 2]
    assert spans[0][0].start == 0 and spans[0][-1].end == 40
    assert spans[0][0].end == spans[0][1].start


async def test_load_with_abort_ends_in_flight_requests_partial(tmp_path):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 400, "step_s": 0.005})
    task = await start_long(engine, "r1", RequestOutputKind.CUMULATIVE)
    await m.load("meow", str(write_adapter(tmp_path / "meow2")), interrupt="abort")
    out = (await asyncio.wait_for(task, 5))[-1].outputs[0]
    assert out.finish_reason == "abort" and 0 < len(out.token_ids) < 400
    assert engine.seen_loras == ["meow@1"]


async def test_default_load_lets_in_flight_requests_finish_on_their_version(tmp_path):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 40, "step_s": 0.005})
    task = await start_long(engine, "r1")
    await m.load("meow", str(write_adapter(tmp_path / "meow2")))
    outs = await asyncio.wait_for(task, 5)
    assert outs[-1].outputs[0].finish_reason == "length"
    assert engine.seen_loras == ["meow@1"] and engine.aborted == []
    assert [s.version for s in m.spans.choices("r1")[0]] == [1]


async def test_staged_copy_outlives_the_source_and_leaves_with_the_version(tmp_path):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 40, "step_s": 0.005})
    v1 = m.registry.get("meow").current_version
    assert v1.load_path != v1.path and engine.loaded[v1.lora_int_id].lora_path == v1.load_path
    shutil.rmtree(v1.path)  # the trainer deletes its files: the engine's copy stays
    task = await start_long(engine, "r1")
    await m.load("meow", str(write_adapter(tmp_path / "meow2")))
    assert Path(v1.load_path).is_dir()  # noqa: ASYNC240 - still in use
    await asyncio.wait_for(task, 5)
    await wait_until(lambda: not Path(v1.load_path).exists())
    assert v1.lora_int_id in engine.removed
    stage = Path(m.registry.get("meow").current_version.load_path).parent
    await m.shutdown()
    assert not stage.exists()


async def test_pinned_version_outlives_the_window_until_unpinned(tmp_path):
    m, _ = await make(tmp_path)  # keep_versions=1
    await m.pin("meow", 1, True)
    await m.load("meow", str(write_adapter(tmp_path / "meow2")))
    await m.load("meow", str(write_adapter(tmp_path / "meow3")))
    await wait_until(lambda: sorted(m.registry.get("meow").versions) == [1, 3])
    await m.pin("meow", 1, False)
    await wait_until(lambda: sorted(m.registry.get("meow").versions) == [3])
    await m.shutdown()


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


async def test_keep_pause_without_resume_ends_partial_and_releases(tmp_path):
    m, engine = await make(
        tmp_path, resume_timeout_s=0.1, engine={"tokens_per_request": 400, "step_s": 0.005}
    )
    task = await start_long(engine, "r1", RequestOutputKind.CUMULATIVE)
    await m.pause("meow", "keep", None)
    out = (await asyncio.wait_for(task, 5))[-1].outputs[0]
    assert out.finish_reason == "abort" and 0 < len(out.token_ids) < 400
    assert m.registry.in_flight("meow") == 0
    assert m.registry.get("meow").current_version.refcount == 0


async def test_broadcast_step_loads_once_stable_and_holds_a_lease(tmp_path):
    m, _ = await make(tmp_path, stable_wait_s=10)
    root = tmp_path / "bc"
    src = write_adapter(tmp_path / "src")
    step = root / "step_1"
    step.mkdir(parents=True)
    for f in src.iterdir():  # the files are there, the sentinel is not
        shutil.copyfile(f, step / f.name)
    load = asyncio.create_task(m.load("meow", str(step)))
    await wait_until(lambda: list((step / ".leases").glob("*")))  # waiting, leased
    assert not load.done() and m.registry.get("meow").current == 1
    # The publisher finishes: manifest, then the sentinel, as publish() does.
    manifest = broadcast._manifest_of(step, 1)
    (step / broadcast.MANIFEST).write_text(json.dumps(manifest))
    digest = broadcast.sha256_of(step / broadcast.MANIFEST)
    broadcast._write_atomic(
        step / broadcast.STABLE,
        json.dumps({"manifest": "manifest.json", "sha256": digest}).encode(),
    )
    loaded = await asyncio.wait_for(load, 5)
    assert loaded.version.number == 2
    (lease,) = (step / ".leases").iterdir()
    await m.load("meow", str(write_adapter(tmp_path / "meow3")))  # keep_versions=1
    await wait_until(lambda: not lease.exists())  # retired: lease released


async def test_broadcast_step_never_ready_is_425_and_old_version_serves(tmp_path):
    m, engine = await make(tmp_path, stable_wait_s=0.2)
    step = tmp_path / "bc" / "step_4"
    step.mkdir(parents=True)
    with pytest.raises(broadcast.NotReadyError, match="no STABLE") as err:
        await m.load("meow", str(step))
    assert err.value.status == 425
    assert m.registry.get("meow").current == 1 and len(engine.loaded) == 1
    assert not list((step / ".leases").glob("*"))


async def test_watcher_swaps_in_each_new_stable_step(tmp_path):
    root = tmp_path / "bc"
    m, _ = await make(tmp_path, watch={"meow": root}, watch_interval_s=0.01)
    m.start_watchers()
    src = write_adapter(tmp_path / "src")
    broadcast.publish(src, root, 7)
    await wait_until(lambda: m.registry.get("meow").current_version.path == str(root / "step_7"))
    (root / "step_8").mkdir()  # an incomplete step is skipped until it is stable
    broadcast.publish(write_adapter(tmp_path / "src9"), root, 9)
    await wait_until(lambda: m.registry.get("meow").current_version.path == str(root / "step_9"))
    await m.shutdown()
    assert all(t.done() for t in m._tasks) or not m._tasks


async def test_failed_and_cancelled_loads_leave_no_staged_copy(tmp_path):
    m, engine = await make(tmp_path)
    stage = Path(m.registry.get("meow").current_version.load_path).parent
    bad = write_adapter(tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(InvalidAdapterError):
        await m.load("meow", str(bad))
    engine.fail_add = RuntimeError("bad weights")
    with pytest.raises(InvalidAdapterError):
        await m.load("meow", str(write_adapter(tmp_path / "m2")))
    engine.fail_add = None

    async def slow_add(lora_request) -> bool:
        await asyncio.sleep(10)
        return True

    engine.add_lora = slow_add
    load = asyncio.create_task(m.load("meow", str(write_adapter(tmp_path / "m3"))))
    await wait_until(lambda: len(list(stage.iterdir())) == 2)  # staged, now in add_lora
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    assert sorted(p.name for p in stage.iterdir()) == [
        str(m.registry.get("meow").current_version.lora_int_id)
    ]
    assert m.registry.get("meow").current == 1


async def test_loads_of_one_name_serialize_and_of_two_names_do_not(tmp_path):
    m, engine = await make(tmp_path)
    gate = asyncio.Event()
    real_add = engine.add_lora
    inside: list[str] = []
    most = 0

    async def add(lora_request) -> bool:
        nonlocal most
        if lora_request.lora_name.startswith("meow"):
            inside.append(lora_request.lora_name)
            most = max(most, len(inside))
            await gate.wait()  # meow's load is stuck in the engine
            await asyncio.sleep(0.01)
            inside.remove(lora_request.lora_name)
        return await real_add(lora_request)

    engine.add_lora = add
    first = asyncio.create_task(m.load("meow", str(write_adapter(tmp_path / "m2"))))
    await wait_until(lambda: len(inside) == 1)  # first holds meow's lock, in the engine
    second = asyncio.create_task(m.load("meow", str(write_adapter(tmp_path / "m3"))))
    woof = await asyncio.wait_for(m.load("woof", str(write_adapter(tmp_path / "w1"))), 2)
    assert woof.version.number == 1 and not first.done() and not second.done()
    gate.set()
    assert [(await t).version.number for t in (first, second)] == [2, 3]
    assert most == 1  # never two loads of meow in the engine at once
