"""LoraManager and its gate against the faithful fake engine (vLLM's own request path,
fake model): leases on every exit path, tenant isolation with shared request ids, no
segment escaping an abort, bounded waits, failed loads leaving the previous version."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from http import HTTPStatus
from pathlib import Path

import pytest
from fakes import FakeEngine, token_at, track, write_adapter
from vllm.exceptions import GenerationError, GracefulHTTPError, VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from vllm_lora_ext import broadcast
from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.errors import AdapterBusyError, InvalidAdapterError, LoraExtError
from vllm_lora_ext.server import attribution, metrics
from vllm_lora_ext.server.files import ADAPTER_FILES
from vllm_lora_ext.server.manager import LoraManager


async def make(tmp_path, names=("meow",), **cfg) -> tuple[LoraManager, FakeEngine]:
    engine = FakeEngine(**cfg.pop("engine", {}))
    config = LoraExtConfig(
        **{"hold_timeout_s": 0.5, "drain_timeout_s": 0.5, "keep_versions": 1, **cfg}
    )
    manager = LoraManager(engine, config)
    manager.install()
    track(manager, engine)
    for name in names:
        await manager.load(name, str(write_adapter(tmp_path / f"{name}1")))
    return manager, engine


def lora(name: str = "meow") -> LoRARequest:
    return LoRARequest(name, 1, "/alias")


def params(kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 1000, "output_kind": kind, **kw})


async def drain(gen) -> list:
    return [o async for o in gen]


def run(engine, rid: str, name: str | None = "meow", kind=RequestOutputKind.FINAL_ONLY, **kw):
    gen = engine.generate("p", params(kind, **kw), rid, lora_request=lora(name) if name else None)
    return asyncio.create_task(drain(gen))


async def wait_until(cond, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - polling fake state is the point
            await asyncio.sleep(0.002)


def tokens_of(outs: list, kind=RequestOutputKind.FINAL_ONLY) -> list[int]:
    if kind == RequestOutputKind.DELTA:
        return [t for o in outs for t in o.outputs[0].token_ids]
    return list(outs[-1].outputs[0].token_ids)


def flights(m: LoraManager, name: str = "meow") -> int:
    return len(m.registry.get(name).flights)


def refcounts(m: LoraManager, name: str = "meow") -> list[int]:
    return [v.refcount for v in m.registry.get(name).versions.values()]


# ---- leases on every exit path ---------------------------------------------------------
async def test_requests_run_on_the_leased_internal_version(tmp_path):
    m, engine = await make(tmp_path)
    outs = await run(engine, "r1")
    assert outs[-1].outputs[0].finish_reason == "stop"
    assert tokens_of(outs) == [token_at(p) for p in range(3)]
    assert engine.seen_loras == ["meow@1"]  # the version, never the public alias
    assert flights(m) == 0 and refcounts(m) == [0]


async def test_base_model_and_foreign_adapters_pass_through(tmp_path):
    m, engine = await make(tmp_path)
    await run(engine, "r1", None)
    await drain(engine.generate("p", params(), "r2", lora_request=LoRARequest("other", 7, "/o")))
    assert engine.seen_loras == [None, "other"]
    assert refcounts(m) == [0]  # no lease taken


async def test_lease_released_when_engine_errors(tmp_path):
    m, engine = await make(tmp_path)
    engine.fail_generate = RuntimeError("engine fell over")
    with pytest.raises(EngineGenerateError):  # what vLLM makes of it
        await run(engine, "r1")
    assert refcounts(m) == [0] and flights(m) == 0


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad output"),
        EngineDeadError(),
        GenerationError("the model failed"),
        VLLMValidationError("bad input"),
        GracefulHTTPError("busy", HTTPStatus.SERVICE_UNAVAILABLE),
    ],
    ids=type,
)
@pytest.mark.parametrize("continued", [False, True], ids=["first segment", "continuation"])
async def test_an_error_mid_request_is_answered_as_vllm_generate_answers_it(
    tmp_path, error, continued
):
    """The gate runs vLLM's generate loop itself (first segment and continuations): an
    error the engine puts in a request's queue must come out of it as it comes out of
    vLLM's own generate on the running vLLM (let through, or as EngineGenerateError),
    and the lease must go."""
    m, engine = await make(tmp_path, engine={"manual": True, "tokens_per_request": 100})
    states = engine.output_processor.request_states

    async def raised(lora_request, continued: bool) -> type[BaseException]:
        gen = engine.generate("p", params(RequestOutputKind.DELTA), "r", lora_request=lora_request)
        task = asyncio.create_task(drain(gen))
        await wait_until(lambda: len(states) == 1)
        engine.step()  # one token out first: the error comes mid-stream
        if continued:  # stopped by a keep pause, resumed: the error meets the continuation
            await m.pause("meow", "keep", None)
            await wait_until(lambda: not states)
            m.resume("meow")
            await wait_until(lambda: len(states) == 1)
            engine.step()
        (state,) = states.values()
        state.queue.put(error)
        with pytest.raises(BaseException) as got:
            await task
        if got.type is EngineGenerateError:
            assert got.value.__cause__ is error
        else:
            assert got.value is error
        await engine.abort(list(states), internal=True)
        return got.type

    # ours, and stock vLLM's generate (the base model)
    assert await raised(lora(), continued) is await raised(None, False)
    assert flights(m) == 0 and refcounts(m) == [0]


async def test_streaming_input_on_a_managed_adapter_is_refused(tmp_path):
    """vLLM's streaming input (a prompt that is an async generator) cannot be continued
    from prompt + tokens: refused with a 400 before anything is admitted."""
    m, engine = await make(tmp_path)

    async def chunks():
        yield TokensPrompt(prompt_token_ids=[1])

    stream = chunks()
    with pytest.raises(GracefulHTTPError) as err:
        await drain(engine.generate(stream, params(), "r1", lora_request=lora()))
    assert err.value.http_status == 400 and "streaming input" in str(err.value)
    assert flights(m) == 0 and refcounts(m) == [0] and not engine.output_processor.request_states
    await stream.aclose()


async def test_lease_released_when_client_goes_away_mid_stream(tmp_path):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 100, "step_s": 0.01})
    task = run(engine, "r1")
    await wait_until(lambda: "r1" in engine.running)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert flights(m) == 0 and refcounts(m) == [0]
    assert not engine.running and not engine.output_processor.request_states


# ---- holds -------------------------------------------------------------------------
async def test_paused_adapter_holds_then_503(tmp_path):
    m, engine = await make(tmp_path, hold_timeout_s=0.1)
    await m.pause("meow", "keep", None)
    with pytest.raises(GracefulHTTPError) as err:
        await run(engine, "r1")
    assert err.value.http_status == 503
    assert not m.registry.get("meow").waiters and flights(m) == 0


async def test_held_request_proceeds_on_resume(tmp_path):
    m, engine = await make(tmp_path, hold_timeout_s=5)
    await m.pause("meow", "keep", None)
    task = run(engine, "r1")
    await wait_until(lambda: len(m.registry.get("meow").waiters) == 1)
    m.resume("meow")
    assert (await asyncio.wait_for(task, 2))[-1].finished


async def test_held_request_stays_held_when_paused_again_before_it_runs(tmp_path):
    m, engine = await make(tmp_path, hold_timeout_s=5)
    await m.pause("meow", "keep", None)
    task = run(engine, "r1")
    await wait_until(lambda: len(m.registry.get("meow").waiters) == 1)
    m.resume("meow")
    await m.pause("meow", "keep", None)  # before the waiter got the loop back
    await asyncio.sleep(0.05)
    assert not task.done() and flights(m) == 0 and engine.seen_loras == []
    m.resume("meow")
    assert (await asyncio.wait_for(task, 2))[-1].finished


async def test_shutdown_releases_held_requests_with_503(tmp_path):
    m, engine = await make(tmp_path, hold_timeout_s=30)
    await m.pause("meow", "keep", None)
    task = run(engine, "r1")
    await wait_until(lambda: len(m.registry.get("meow").waiters) == 1)
    await m.shutdown()
    with pytest.raises(GracefulHTTPError) as err:
        await asyncio.wait_for(task, 2)
    assert err.value.http_status == 503


async def test_unload_while_paused_answers_held_requests_404_at_once(tmp_path):
    m, engine = await make(tmp_path, hold_timeout_s=30)
    await m.pause("meow", "keep", None)
    task = run(engine, "r1")
    await wait_until(lambda: len(m.registry.get("meow").waiters) == 1)
    await m.unload("meow", None)
    with pytest.raises(GracefulHTTPError) as err:
        await asyncio.wait_for(task, 1)  # not the 30 s hold
    assert err.value.http_status == 404
    await m.load("meow", str(write_adapter(tmp_path / "meow2")))
    assert not m.registry.get("meow").paused  # a reload does not come up paused
    assert (await run(engine, "r2"))[-1].finished


async def test_wait_mode_timeout_undoes_the_pause(tmp_path):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 100, "step_s": 0.01})
    task = run(engine, "r1")
    await wait_until(lambda: flights(m) == 1)
    with pytest.raises(AdapterBusyError) as err:
        await m.pause("meow", "wait", 0.05)
    assert err.value.status == 409
    assert not m.registry.get("meow").paused
    await task


async def test_a_failed_wait_pause_restores_another_callers_keep_pause(tmp_path):
    """Controller A paused meow (keep) for a swap; controller B's pause(wait) times out:
    meow must stay paused as A left it, its held request still held (not resumed)."""
    m, engine = await make(tmp_path, engine={"manual": True, "tokens_per_request": 100})
    engine.step()
    running = run(engine, "r1")
    await wait_until(lambda: "r1" in engine.running)
    await m.pause("meow", "keep", None)
    held = run(engine, "r2")
    await wait_until(lambda: len(m.registry.get("meow").waiters) == 1)
    with pytest.raises(AdapterBusyError) as err:
        await m.pause("meow", "wait", 0.05)  # r1 is stopped but not finished: in flight
    assert err.value.status == 409
    adapter = m.registry.get("meow")
    assert adapter.paused and adapter.pause_mode == "keep"
    await asyncio.sleep(0.02)
    assert not held.done() and len(adapter.waiters) == 1
    m.resume("meow")
    engine.manual = False
    engine._run_output_handler()
    for task in (running, held):
        assert (await asyncio.wait_for(task, 5))[-1].finished


async def test_wait_mode_returns_when_the_last_request_ends(tmp_path):
    m, engine = await make(tmp_path, engine={"manual": True, "tokens_per_request": 3})
    task = run(engine, "r1")
    await wait_until(lambda: "r1" in engine.running)
    pause = asyncio.create_task(m.pause("meow", "wait", 5))
    await asyncio.sleep(0.01)
    assert not pause.done()
    engine.step(3)
    await asyncio.wait_for(pause, 1)
    assert m.registry.get("meow").paused and (await task)[-1].outputs[0].finish_reason == "stop"


# ---- isolation -----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["abort_route", "pause_abort", "pause_keep"])
async def test_stopping_one_tenant_never_stops_another_with_the_same_request_id(tmp_path, how):
    m, engine = await make(
        tmp_path, names=("duck", "cow"), engine={"tokens_per_request": 40, "step_s": 0.005}
    )
    duck = run(engine, "rollout-0", "duck")
    cow = run(engine, "rollout-0", "cow")  # the same external id: accepted, as by vLLM
    await wait_until(lambda: flights(m, "duck") == 1 and flights(m, "cow") == 1)
    await wait_until(lambda: len(engine.engine_core.requests) == 2)
    if how == "abort_route":
        assert await m.abort("duck") == 1
    else:
        await m.pause("duck", "abort" if how == "pause_abort" else "keep", None)
    cow_out = (await asyncio.wait_for(cow, 5))[-1].outputs[0]
    assert cow_out.finish_reason == "stop" and len(cow_out.token_ids) == 40
    if how == "pause_keep":
        m.resume("duck")
    duck_out = (await asyncio.wait_for(duck, 5))[-1].outputs[0]
    if how == "pause_keep":
        assert duck_out.finish_reason == "stop" and len(duck_out.token_ids) == 40
    else:
        assert duck_out.finish_reason == "abort" and len(duck_out.token_ids) < 40
    assert all(a[1] for a in engine.aborted)  # every abort by internal id


async def test_abort_stops_only_the_requests_of_that_adapter(tmp_path):
    m, engine = await make(
        tmp_path, names=("meow", "woof"), engine={"tokens_per_request": 100, "step_s": 0.01}
    )
    meows = [run(engine, f"m{i}") for i in range(2)]
    woof = run(engine, "w", "woof")
    await wait_until(lambda: len(engine.running) == 3)
    assert await m.abort("meow") == 2
    for t in meows:
        assert (await t)[-1].outputs[0].finish_reason == "abort"
    assert (await woof)[-1].outputs[0].finish_reason == "stop"
    assert flights(m) == flights(m, "woof") == 0 and refcounts(m) == [0]


# ---- no segment escapes ----------------------------------------------------------------
async def _stopped_on_its_way_in(tmp_path, kind):
    """A request stopped by keep, resumed, and aborted while its continuation is still
    in input processing (not yet registered with the engine)."""
    m, engine = await make(
        tmp_path, engine={"manual": True, "tokens_per_request": 100, "input_delay_s": 0.05}
    )
    task = run(engine, "r1", kind=kind)
    await wait_until(lambda: "r1" in engine.running)
    engine.step(5)
    await m.pause("meow", "keep", None)
    await wait_until(lambda: not engine.running)
    m.resume("meow")
    await wait_until(lambda: len(engine.seen_loras) == 2)  # the continuation is on its way
    assert not engine.running
    assert await m.abort("meow") == 1
    outs = await asyncio.wait_for(task, 2)  # no step: it must end without one
    return outs, engine


@pytest.mark.parametrize("kind", [RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA])
async def test_abort_stops_a_continuation_still_on_its_way_in(tmp_path, kind):
    outs, engine = await _stopped_on_its_way_in(tmp_path, kind)
    assert outs[-1].outputs[0].finish_reason == "abort"
    assert tokens_of(outs, kind) == [token_at(p) for p in range(5)]
    assert not engine.running and not engine.output_processor.request_states


async def test_abort_ends_held_requests_too(tmp_path):
    m, engine = await make(tmp_path, hold_timeout_s=30)
    await m.pause("meow", "keep", None)
    held = [run(engine, f"h{i}") for i in range(2)]
    await wait_until(lambda: len(m.registry.get("meow").waiters) == 2)
    assert await m.abort("meow") == 2
    for t in held:
        out = (await asyncio.wait_for(t, 1))[-1].outputs[0]
        assert out.finish_reason == "abort" and out.token_ids == []
    assert flights(m) == 0 and not m.registry.get("meow").waiters


async def test_vllm_abort_by_external_id_reaches_held_and_between_segments(tmp_path):
    """vLLM's own /abort_requests aborts by external id: it must also end a request
    held by a pause or waiting between continuation segments."""
    m, engine = await make(
        tmp_path, hold_timeout_s=30, engine={"manual": True, "tokens_per_request": 100}
    )
    between = run(engine, "x")
    await wait_until(lambda: "x" in engine.running)
    engine.step(2)
    await m.pause("meow", "keep", None)
    await wait_until(lambda: not engine.running)
    held = run(engine, "y")
    await wait_until(lambda: len(m.registry.get("meow").waiters) == 1)
    await engine.abort(["x", "y"])  # what vLLM's route does
    assert (await asyncio.wait_for(between, 1))[-1].outputs[0].finish_reason == "abort"
    assert (await asyncio.wait_for(held, 1))[-1].outputs[0].finish_reason == "abort"
    m.resume("meow")
    assert flights(m) == 0


async def test_continuations_keep_the_callers_request_id(tmp_path):
    m, engine = await make(tmp_path, engine={"manual": True, "tokens_per_request": 10})
    task = run(engine, "r1")
    await wait_until(lambda: "r1" in engine.running)
    engine.step(4)
    await m.pause("meow", "keep", None)
    m.resume("meow")
    await wait_until(lambda: "r1" in engine.running)
    assert engine.running == {"r1"}
    engine.step(10)
    out = (await task)[-1].outputs[0]
    assert out.token_ids == [token_at(p) for p in range(10)] and out.finish_reason == "stop"


@pytest.mark.parametrize(
    ("field", "value"),
    [("presence_penalty", 0.5), ("frequency_penalty", -0.3), ("stop", ["</answer>"])],
)
@pytest.mark.parametrize("kind", [RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA])
async def test_a_keep_pause_ends_what_cannot_be_continued_exactly(tmp_path, field, value, kind):
    """Presence/frequency penalties count only a segment's own tokens, a stop string
    could span the boundary: such a request ends partial at the pause, saying why, and
    nothing is continued (it used to be, silently different)."""
    m, engine = await make(tmp_path, engine={"manual": True, "tokens_per_request": 10})
    task = run(engine, "r1", kind=kind, **{field: value})
    await wait_until(lambda: "r1" in engine.running)
    engine.step(4)
    await m.pause("meow", "keep", None)
    outs = await asyncio.wait_for(task, 5)
    out = outs[-1].outputs[0]
    assert out.finish_reason == "abort" and out.stop_reason.startswith("not continued: ")
    assert tokens_of(outs, kind) == [token_at(p) for p in range(4)]
    m.resume("meow")
    assert flights(m) == 0 and not engine.running


async def test_a_sweep_between_n_children_reaches_every_child(tmp_path):
    """vLLM sends the children of an n > 1 request to the engine core one at a time;
    an abort landing between two sends must still stop the ones sent after it (they
    escaped: the repair read the parent's children after the abort had emptied it)."""
    m, engine = await make(tmp_path, engine={"manual": True, "tokens_per_request": 10})
    real = engine.engine_core.add_request_async
    sent: list[str] = []

    async def add(request) -> None:
        await real(request)
        sent.append(request.request_id)
        if len(sent) == 1:
            assert await m.abort("meow") == 1  # between the first child and the rest

    engine.engine_core.add_request_async = add
    task = run(engine, "r1", n=3)
    await wait_until(lambda: len(sent) == 3)
    outs = await asyncio.wait_for(task, 5)
    assert not engine.engine_core.requests, engine.engine_core.requests  # none escaped
    assert {c.finish_reason for c in outs[-1].outputs} == {"abort"}
    assert flights(m) == 0


async def test_requests_that_bypass_generate_are_refused(tmp_path):
    m, engine = await make(tmp_path)
    version = m.registry.get("meow").current_version
    own = LoRARequest(version.internal_name, version.lora_int_id, version.load_path)
    with pytest.raises(GracefulHTTPError) as err:
        await engine.add_request("e1", TokensPrompt(prompt_token_ids=[1]), params(), None, own)
    assert err.value.http_status == 400
    assert not engine.output_processor.request_states


async def test_an_evicted_version_named_exactly_never_reaches_the_engine(tmp_path):
    m, engine = await make(tmp_path)  # keep_versions=1
    stale = LoRARequest("meow@1", m.registry.get("meow").current_version.lora_int_id, "/s")
    await m.load("meow", str(write_adapter(tmp_path / "meow2")))
    await wait_until(lambda: 1 not in m.registry.get("meow").versions)
    for req in (stale, LoRARequest("meow@7", 5, "/x")):
        with pytest.raises(GracefulHTTPError) as err:
            await drain(engine.generate("p", params(), "r", lora_request=req))
        assert err.value.http_status == 404
    assert engine.seen_loras == []


async def test_an_unloaded_name_is_404_even_with_its_old_request(tmp_path):
    m, engine = await make(tmp_path)
    version = m.registry.get("meow").current_version
    old = LoRARequest("meow", version.lora_int_id, version.path)  # resolved before unload
    await m.unload("meow", None)
    with pytest.raises(GracefulHTTPError) as err:
        await drain(engine.generate("p", params(), "r", lora_request=old))
    assert err.value.http_status == 404 and engine.seen_loras == []


# ---- swaps -----------------------------------------------------------------------------
async def start_long(engine, rid: str, kind=RequestOutputKind.DELTA) -> asyncio.Task:
    task = run(engine, rid, kind=kind)
    await wait_until(lambda: rid in engine.running)
    await asyncio.sleep(0.05)  # some tokens on the old version
    return task


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
async def test_load_with_continue_moves_in_flight_requests_to_the_new_version(tmp_path, kind):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 40, "step_s": 0.005})
    with attribution.recording() as book:
        task = await start_long(engine, "r1", kind)
        await m.load("meow", str(write_adapter(tmp_path / "meow2")), interrupt="continue")
        outs = await asyncio.wait_for(task, 5)
    assert tokens_of(outs, kind) == [token_at(p) for p in range(40)]  # none lost or repeated
    assert outs[-1].outputs[0].finish_reason == "stop"
    assert engine.seen_loras == ["meow@1", "meow@2"]
    spans = book.choices("r1")
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
    with attribution.recording() as book:
        task = await start_long(engine, "r1")
        await m.load("meow", str(write_adapter(tmp_path / "meow2")))
        outs = await asyncio.wait_for(task, 5)
    assert outs[-1].outputs[0].finish_reason == "stop"
    assert engine.seen_loras == ["meow@1"] and engine.aborted == []
    assert [s.version for s in book.choices("r1")[0]] == [1]


async def test_pause_abort_racing_a_continue_swap_ends_the_request(tmp_path):
    m, engine = await make(tmp_path, engine={"manual": True, "tokens_per_request": 100})
    task = run(engine, "r1")
    await wait_until(lambda: "r1" in engine.running)
    engine.step(3)
    real_add = engine.add_lora
    gate = asyncio.Event()

    async def slow_add(req) -> bool:
        await gate.wait()
        return await real_add(req)

    engine.add_lora = slow_add
    load = asyncio.create_task(
        m.load("meow", str(write_adapter(tmp_path / "m2")), interrupt="continue")
    )
    await asyncio.sleep(0.01)
    await m.pause("meow", "abort", None)
    gate.set()
    await load
    m.resume("meow")
    out = (await asyncio.wait_for(task, 1))[-1].outputs[0]
    assert out.finish_reason == "abort" and len(out.token_ids) == 3


async def test_interrupting_load_with_an_exact_request_admitted_meanwhile_succeeds(tmp_path):
    """v1 idle (outside the window once v3 commits), r1 running on v2; the load of v3
    interrupts r1, and while that abort is on its way a request for meow@1 is admitted.
    The load answers (before the gate: RuntimeError 'meow@1 still has 1 users' after it
    had committed), v1 stays until that request ends, then leaves."""
    m, engine = await make(
        tmp_path, keep_versions=2, engine={"manual": True, "tokens_per_request": 100}
    )
    await m.load("meow", str(write_adapter(tmp_path / "m2")))
    old = run(engine, "r1")
    await wait_until(lambda: "r1" in engine.running)
    v1 = m.registry.get("meow").versions[1]
    real_abort = m.gate._abort  # the engine's own, under the gate's hook
    exact: list[asyncio.Task] = []

    async def abort(ids, internal=False):
        exact.append(
            asyncio.create_task(
                drain(
                    engine.generate(
                        "p", params(), "r2", lora_request=LoRARequest("meow@1", 1, "/x")
                    )
                )
            )
        )
        await wait_until(lambda: "r2" in engine.running)
        await real_abort(ids, internal)

    m.gate._abort = abort
    loaded = await m.load("meow", str(write_adapter(tmp_path / "m3")), interrupt="abort")
    assert loaded.version.number == 3 and loaded.interrupted == 1
    assert (await old)[-1].outputs[0].finish_reason == "abort"
    assert 1 in m.registry.get("meow").versions and v1.refcount == 1
    engine.step(100)
    assert (await exact[0])[-1].outputs[0].finish_reason == "stop"
    await wait_until(lambda: v1.lora_int_id in engine.removed)
    assert sorted(m.registry.get("meow").versions) == [2, 3]


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


async def test_a_full_ram_stage_spills_to_disk_and_both_are_cleaned(tmp_path, monkeypatch):
    from vllm_lora_ext.server import staging

    monkeypatch.setattr(staging, "SHM", tmp_path / "shm")  # RAM staging needs room
    m, _ = await make(tmp_path)
    assert staging.default_stage_parent() is None
    ram = m.staging.root
    real_copy = staging.Staging._copy

    def copy(self, version, dest, manifest):
        if dest.parent == ram:
            dest.mkdir()
            (dest / "part").write_bytes(b"x")
            raise OSError(staging.errno.ENOSPC, "No space left on device")
        real_copy(self, version, dest, manifest)

    monkeypatch.setattr(staging.Staging, "_copy", copy)
    v2 = (await m.load("meow", str(write_adapter(tmp_path / "meow2")))).version
    spilled = Path(v2.load_path)
    assert spilled.parent != ram and (spilled / "adapter_config.json").is_file()
    assert not (ram / spilled.name).exists()  # the partial RAM copy is gone
    assert m.staging.sizes()["staged"] == 2  # v1 in RAM, v2 on disk
    await m.shutdown()
    assert not ram.exists() and not spilled.parent.exists()


async def test_a_named_version_loaded_again_from_the_same_path_changes_nothing(tmp_path):
    m, engine = await make(tmp_path)
    path = str(write_adapter(tmp_path / "step_7"))
    first = await m.load("meow", path, version=7)
    assert first.version.number == 7 and not first.unchanged
    await wait_until(lambda: list(engine.loaded) == [first.version.lora_int_id])
    again = await m.load("meow", path, version=7, pin=True)
    assert again.unchanged and again.version is first.version and first.version.pinned
    assert list(engine.loaded) == [first.version.lora_int_id]  # nothing added
    other = str(write_adapter(tmp_path / "other"))
    with pytest.raises(LoraExtError, match="already loaded from") as err:
        await m.load("meow", other, version=7)  # same number, other weights
    assert err.value.status == 409
    with pytest.raises(LoraExtError, match="not newer") as err:
        await m.load("meow", other, version=5)
    assert err.value.status == 409 and m.registry.get("meow").current == 7
    assert (await m.load("meow", other)).version.number == 8  # numbering goes on


async def test_a_partly_failed_versioned_sync_converges_when_repeated(tmp_path):
    """Two replicas; the load of version 3 fails on one. Repeating the same versioned
    load converges: the replica that has it answers unchanged, the other loads it."""
    (a, _), (b, engine_b) = await make(tmp_path / "a"), await make(tmp_path / "b")
    path = str(write_adapter(tmp_path / "step_3"))
    engine_b.fail_add = RuntimeError("worker lost")
    await a.load("meow", path, version=3)
    with pytest.raises(InvalidAdapterError):
        await b.load("meow", path, version=3)
    assert b.registry.get("meow").current == 1
    engine_b.fail_add = None
    again = [await a.load("meow", path, version=3), await b.load("meow", path, version=3)]
    assert [r.unchanged for r in again] == [True, False]
    assert {x.registry.get("meow").current for x in (a, b)} == {3}


def test_a_killed_servers_staging_dir_is_swept_a_live_ones_never(tmp_path):
    import subprocess
    import sys

    from vllm_lora_ext.server.staging import OWNER, PREFIX, owned_dir, sweep

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from vllm_lora_ext.server.staging import owned_dir\n"
        "d, _ = owned_dir(Path(sys.argv[1])); (d / 'v1').mkdir(); print(d, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    theirs = Path(child.stdout.readline().strip())
    mine, fd = owned_dir(tmp_path)  # sweeps: theirs is alive
    legacy = tmp_path / f"{PREFIX}legacy"  # no owner lock: not ours to judge
    legacy.mkdir()
    assert theirs.is_dir() and mine.is_dir()
    child.kill()  # SIGKILL: no cleanup
    child.wait()
    sweep(tmp_path)
    assert not theirs.exists() and mine.is_dir() and legacy.is_dir()
    assert (mine / OWNER).exists()
    os.close(fd)  # we are gone too
    sweep(tmp_path)
    assert not mine.exists()


async def test_staging_work_still_runs_after_close():
    """A load failing during shutdown must still be able to clean up its copy."""
    from vllm_lora_ext.server.staging import Staging

    staging = Staging(LoraExtConfig(), lambda path: None)
    await staging.close()
    assert await asyncio.wait_for(staging.run(lambda: 41 + 1), 5) == 42


async def test_close_releases_each_lease_once_while_a_discard_thread_releases(
    tmp_path, monkeypatch
):
    """Shutdown cancels a removal whose discard still runs on a copier thread: that
    thread and close() release leases at once (CI saw close() fail with 'dictionary
    changed size during iteration'). Each lease goes exactly once, none is left."""
    import threading

    from vllm_lora_ext.server.registry import Version
    from vllm_lora_ext.server.staging import Staging

    staging = Staging(LoraExtConfig(), lambda path: None)
    versions = []
    for n in (1, 2, 3):
        (tmp_path / f"step_{n}").mkdir()
        versions.append(Version("meow", n, n, str(tmp_path / f"step_{n}")))
        await staging._lease(versions[-1])
    released: list[Path] = []
    real = broadcast.release_lease

    def release_lease(lease: Path) -> None:
        released.append(lease)
        if len(released) == 1:  # the discard of another version runs meanwhile
            thread = threading.Thread(target=staging.discard, args=(versions[2],))
            thread.start()
            thread.join()
        real(lease)

    monkeypatch.setattr(broadcast, "release_lease", release_lease)
    await staging.close()
    assert sorted(p.parent.parent.name for p in released) == ["step_1", "step_2", "step_3"]
    assert not list(tmp_path.glob("step_*/.leases/*"))


async def test_a_copy_started_after_close_fails_and_leaves_no_directory(tmp_path):
    """A load still staging when the server shuts down must not make the staging
    directory again: nothing would sweep it (it has no owner lock)."""
    from vllm_lora_ext.server.registry import Version
    from vllm_lora_ext.server.staging import Staging

    staging = Staging(LoraExtConfig(), lambda path: None)
    root = staging.root
    await staging.close()
    version = Version("meow", 1, 1, str(write_adapter(tmp_path / "meow1")))
    with pytest.raises(LoraExtError, match=r"staging directory .* is gone") as caught:
        await staging.run(staging.stage, version, None)
    assert caught.value.status == 503
    assert root is not None and not root.exists()


async def test_a_staging_root_removed_outside_the_server_is_named_and_not_remade(tmp_path):
    """A tmp cleaner removed the live staging directory: a load fails with a 503 that
    says so (not a 400 blaming the adapter), and the directory is not made again
    without its owner lock."""
    from vllm_lora_ext.server.registry import Version
    from vllm_lora_ext.server.staging import Staging

    staging = Staging(LoraExtConfig(), lambda path: None)
    root = staging.root
    assert root is not None
    shutil.rmtree(root)
    version = Version("meow", 1, 1, str(write_adapter(tmp_path / "meow1")))
    try:
        with pytest.raises(LoraExtError, match=r"staging directory .* is gone") as caught:
            await staging.run(staging.stage, version, None)
        assert caught.value.status == 503 and f"'{root}'" in caught.value.message
        assert not root.exists()
    finally:
        await staging.close()


async def test_pinned_version_outlives_the_window_until_unpinned(tmp_path):
    m, _ = await make(tmp_path)  # keep_versions=1
    await m.pin("meow", 1, True)
    await m.load("meow", str(write_adapter(tmp_path / "meow2")))
    await m.load("meow", str(write_adapter(tmp_path / "meow3")))
    await wait_until(lambda: sorted(m.registry.get("meow").versions) == [1, 3])
    await m.pin("meow", 1, False)
    await wait_until(lambda: sorted(m.registry.get("meow").versions) == [3])


async def test_failed_load_keeps_previous_version_and_cleans_engine(tmp_path):
    m, engine = await make(tmp_path)
    before = dict(engine.loaded)
    engine.fail_add = RuntimeError("bad weights")
    with pytest.raises(InvalidAdapterError, match="bad weights"):
        await m.load("meow", str(write_adapter(tmp_path / "meow2")))
    assert m.registry.get("meow").current == 1
    assert engine.loaded == before


async def test_swap_evicts_old_version_after_its_last_request(tmp_path):
    m, engine = await make(tmp_path, engine={"tokens_per_request": 20, "step_s": 0.01})
    old_id = m.registry.get("meow").current_version.lora_int_id
    task = run(engine, "r1")
    await wait_until(lambda: "r1" in engine.running)
    await m.load("meow", str(write_adapter(tmp_path / "meow2")))
    await asyncio.sleep(0)
    assert old_id not in engine.removed  # still in use
    await task
    await wait_until(lambda: old_id in engine.removed)
    assert engine.removed == [old_id]
    assert list(m.registry.get("meow").versions) == [2]


async def test_keep_pause_without_resume_ends_partial_and_releases(tmp_path):
    m, engine = await make(
        tmp_path, resume_timeout_s=0.1, engine={"tokens_per_request": 400, "step_s": 0.005}
    )
    task = await start_long(engine, "r1", RequestOutputKind.CUMULATIVE)
    await m.pause("meow", "keep", None)
    out = (await asyncio.wait_for(task, 5))[-1].outputs[0]
    assert out.finish_reason == "abort" and 0 < len(out.token_ids) < 400
    assert flights(m) == 0 and refcounts(m) == [0]


async def test_server_side_continuation_derives_a_new_seed(tmp_path):
    m, engine = await make(tmp_path, engine={"manual": True, "tokens_per_request": 10})
    seeds: list[int | None] = []
    real = engine.input_processor.process_inputs_async

    async def spy(request_id, prompt, p, *a, **kw):
        seeds.append(p.seed)
        return await real(request_id, prompt, p, *a, **kw)

    engine.input_processor.process_inputs_async = spy
    task = run(engine, "r1", seed=7)
    await wait_until(lambda: "r1" in engine.running)
    engine.step(3)
    await m.pause("meow", "keep", None)
    m.resume("meow")
    await wait_until(lambda: "r1" in engine.running)
    engine.step(10)
    await task
    assert seeds[0] == 7 and seeds[1] is not None and seeds[1] != 7


# ---- broadcast and watcher -----------------------------------------------------------
async def test_broadcast_step_loads_once_stable_and_holds_a_lease(tmp_path):
    m, _ = await make(tmp_path, stable_wait_s=10)
    src = write_adapter(tmp_path / "src")
    step = tmp_path / "bc" / "step_1"
    step.mkdir(parents=True)
    for f in src.iterdir():  # a publisher mid-way: files and manifest, no sentinel yet
        shutil.copyfile(f, step / f.name)
    manifest = broadcast._manifest_of(step, 1)
    (step / broadcast.MANIFEST).write_text(json.dumps(manifest))
    load = asyncio.create_task(m.load("meow", str(step)))
    await wait_until(lambda: list((step / ".leases").glob("*")))  # waiting, leased
    assert not load.done() and m.registry.get("meow").current == 1
    digest = broadcast.sha256_of(step / broadcast.MANIFEST)
    broadcast._write_atomic(
        step / broadcast.STABLE,
        json.dumps({"manifest": "manifest.json", "sha256": digest}).encode(),
    )
    loaded = await asyncio.wait_for(load, 5)
    assert loaded.version.number == 2
    (lease,) = (step / ".leases").iterdir()
    await m.load("meow", str(write_adapter(tmp_path / "meow3")))  # keep_versions=1
    await wait_until(lambda: not lease.exists())  # evicted: lease released


async def test_a_step_on_the_stage_filesystem_is_copied_never_linked(tmp_path):
    """A hard link would share the trainer's file: a step rewritten or truncated in
    place would change (or, mapped by the worker, crash) a live version."""
    m, engine = await make(tmp_path, stage_dir=tmp_path / "stage")
    good = broadcast.publish(write_adapter(tmp_path / "src2"), tmp_path / "bc", 2)
    v2 = (await m.load("meow", str(good.path))).version
    weights = "adapter_model.safetensors"
    staged = Path(v2.load_path) / weights
    assert staged.is_relative_to(tmp_path / "stage")
    assert staged.stat().st_ino != (good.path / weights).stat().st_ino
    before = staged.read_bytes()
    published = set(broadcast.verify_step(good.path, check_sums=False)["files"])
    os.truncate(good.path / weights, 4)  # the trainer rewrites its step in place
    assert staged.read_bytes() == before
    assert set(os.listdir(v2.load_path)) == published & ADAPTER_FILES

    bad = broadcast.publish(write_adapter(tmp_path / "src3"), tmp_path / "bc", 3)
    f = bad.path / "adapter_config.json"  # valid, same size, not what was published
    f.write_text(f.read_text().replace('"r": 8', '"r": 4'))
    await wait_until(lambda: list(engine.loaded) == [v2.lora_int_id])  # v1 left (window 1)
    before_engine = dict(engine.loaded)
    with pytest.raises(broadcast.CorruptStepError, match="xxh3_128") as err:
        await m.load("meow", str(bad.path))
    assert err.value.status == 422
    assert m.registry.get("meow").current == 2 and engine.loaded == before_engine
    assert [p.name for p in m.staging.root.iterdir() if not p.name.startswith(".")] == [
        Path(v2.load_path).name
    ]


async def test_broadcast_step_never_ready_is_425_and_old_version_serves(tmp_path):
    m, engine = await make(tmp_path, stable_wait_s=0.2)
    step = tmp_path / "bc" / "step_4"
    step.mkdir(parents=True)
    with pytest.raises(broadcast.NotReadyError, match="no adapter files yet") as err:
        await m.load("meow", str(step))
    assert err.value.status == 425
    assert m.registry.get("meow").current == 1 and len(engine.loaded) == 1
    assert not list((step / ".leases").glob("*"))


async def test_a_plain_adapter_directory_named_step_n_loads_at_once(tmp_path):
    m, _ = await make(tmp_path, stable_wait_s=30)
    step = write_adapter(tmp_path / "checkpoints" / "step_7")  # every trainer's naming
    loop = asyncio.get_running_loop()
    started = loop.time()
    loaded = await m.load("meow", str(step))
    assert loaded.version.number == 2 and loop.time() - started < 5


async def test_a_sentinel_without_manifest_loads_once_the_files_check_out(tmp_path):
    """prime-rl's layout: the weights, then an empty STABLE. Files still arriving are
    waited for (then 425 naming what is missing); nothing is written into the step."""
    m, _ = await make(tmp_path, stable_wait_s=0.3)
    step = write_adapter(tmp_path / "prime" / "step_3")
    (step / "STABLE").write_text("")
    assert (await m.load("meow", str(step))).version.number == 2
    assert sorted(p.name for p in step.iterdir()) == [
        "STABLE",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    torn = write_adapter(tmp_path / "prime" / "step_4")
    (torn / "STABLE").write_text("")
    weights = torn / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])  # the header says more than is there
    with pytest.raises(broadcast.NotReadyError, match="truncated") as err:
        await m.load("meow", str(torn))
    assert err.value.status == 425 and m.registry.get("meow").current == 2


async def test_a_pending_step_loads_when_its_files_arrive(tmp_path):
    m, _ = await make(tmp_path, stable_wait_s=10)
    step = tmp_path / "nfs" / "step_9"
    load = asyncio.create_task(m.load("meow", str(step)))
    await asyncio.sleep(0.1)
    assert not load.done()  # not visible yet: waiting
    write_adapter(step)
    assert (await asyncio.wait_for(load, 5)).version.number == 2


async def test_corrupt_broadcast_step_is_422_at_once(tmp_path):
    m, _ = await make(tmp_path, stable_wait_s=30)
    published = broadcast.publish(write_adapter(tmp_path / "src"), tmp_path / "bc", 3)
    weights = published.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(broadcast.CorruptStepError) as err:
        await m.load("meow", str(published.path))
    assert err.value.status == 422
    assert loop.time() - started < 5  # not retried for stable_wait_s under the lock
    assert m.registry.get("meow").current == 1


async def test_watcher_swaps_in_each_new_stable_step(tmp_path):
    root = tmp_path / "bc"
    m, _ = await make(tmp_path, watch={"meow": root}, watch_interval_s=0.01)
    m.start_watchers()
    broadcast.publish(write_adapter(tmp_path / "src"), root, 7)
    await wait_until(lambda: m.registry.get("meow").current_version.path == str(root / "step_7"))
    (root / "step_8").mkdir()  # an incomplete step is skipped until it is stable
    broadcast.publish(write_adapter(tmp_path / "src9"), root, 9)
    await wait_until(lambda: m.registry.get("meow").current_version.path == str(root / "step_9"))
    await m.shutdown()
    assert not m.watcher._tasks


# ---- loads: cleanup and concurrency ----------------------------------------------------
async def test_the_base_models_tenant_name_is_no_adapter_name(tmp_path):
    """An adapter named '__base__' would be charged to, and capped and weighted as, the
    base model's tenant: refused, nothing registered."""
    manager, engine = await make(tmp_path, names=())
    with pytest.raises(LoraExtError, match="base model's tenant") as e:
        await manager.load("__base__", str(write_adapter(tmp_path / "b")))
    assert e.value.status == 400 and "__base__" not in manager.registry
    assert await engine.list_loras() == set()


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

    def staged() -> list[str]:  # (not the owner lock)
        return [p.name for p in stage.iterdir() if not p.name.startswith(".")]

    load = asyncio.create_task(m.load("meow", str(write_adapter(tmp_path / "m3"))))
    await wait_until(lambda: len(staged()) == 2)  # staged, now in add_lora
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    assert staged() == [Path(m.registry.get("meow").current_version.load_path).name]
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


# ---- bounded state -------------------------------------------------------------------
async def test_operations_on_unknown_names_leave_nothing_behind(tmp_path):
    m, _ = await make(tmp_path)
    before = m.sizes()
    for i in range(50):
        with pytest.raises(Exception, match="unknown adapter"):
            await m.unload(f"ghost-{i}", None)
        with pytest.raises(Exception, match="unknown adapter"):
            await m.pin(f"ghost-{i}", 1, True)
        with pytest.raises(InvalidAdapterError):
            await m.load(f"ghost-{i}", str(tmp_path / "missing"))
    assert m.sizes() == before


async def test_names_that_come_and_go_leave_bounded_state(tmp_path):
    """Many distinct names loaded, used and unloaded: registry, gate, locks, staging,
    published names and metric series all return to where they were."""
    m, engine = await make(tmp_path, engine={"tokens_per_request": 2, "step_s": 0})
    src = str(write_adapter(tmp_path / "src"))
    before = m.sizes()
    for i in range(300):
        name = f"tenant-{i}"
        await m.load(name, src)
        await drain(engine.generate("p", params(), f"r{i}", lora_request=lora(name)))
        await m.unload(name, None)
    await wait_until(lambda: not m._removals)
    after = m.sizes()
    assert after["tombstones"] == 300
    assert {k: v for k, v in after.items() if k != "tombstones"} == {
        k: v for k, v in before.items() if k != "tombstones"
    }
    series = {
        s.labels.get("lora_name")
        for metric in (metrics.SWAPS, metrics.INTERRUPTED, metrics.CONTINUED)
        for fam in metric.collect()
        for s in fam.samples
    }
    assert not any(name and name.startswith("tenant-") for name in series)
