"""The fair share in the gate, on the faithful fake engine (vLLM's own request path):
a light tenant's request reaches the engine before a flooding tenant's backlog; weights
and caps hold; held, aborted and disconnected requests give their share back; a
continuation keeps its place; the base model is a tenant too."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from types import SimpleNamespace

import pytest
from fakes import PROMPT_IDS, FakeEngine, token_at, track, write_adapter
from vllm.exceptions import GracefulHTTPError
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine import EngineCoreRequest

from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.server.gate import BASE_TENANT
from vllm_lora_ext.server.manager import LoraManager


async def make(
    tmp_path, seqs: int = 2, policy: str = "fcfs", **cfg
) -> tuple[LoraManager, FakeEngine]:
    engine = FakeEngine(manual=True, tokens_per_request=4)
    engine.vllm_config.scheduler_config = SimpleNamespace(max_num_seqs=seqs, policy=policy)
    config = LoraExtConfig(
        **{
            "hold_timeout_s": 2,
            "drain_timeout_s": 1,
            "fair_share_headroom": 0,
            "fair_share_reserve": 0,
            **cfg,
        }
    )
    manager = LoraManager(engine, config)
    manager.install()
    track(manager, engine)
    for name in ("A", "B"):
        await manager.load(name, str(write_adapter(tmp_path / name)))
    return manager, engine


def start(engine, rid: str, name: str | None, n: int = 1, priority: int = 0) -> asyncio.Task:
    params = SamplingParams(max_tokens=100, n=n, output_kind=RequestOutputKind.FINAL_ONLY)
    lora = LoRARequest(name, 1, "/alias") if name else None
    extra = {"priority": priority} if priority else {}  # as vLLM's serving passes it

    async def go():
        return [o async for o in engine.generate("p", params, rid, lora_request=lora, **extra)]

    return asyncio.create_task(go())


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def step_until(engine, cond, steps: int = 200) -> None:
    for _ in range(steps):
        await settle()
        if cond():
            return
        engine.step()
    raise AssertionError("never happened")


async def test_a_light_tenant_goes_before_a_flooding_tenants_backlog(tmp_path):
    manager, engine = await make(tmp_path)
    flood = [start(engine, f"a{i}", "A") for i in range(8)]
    await settle()
    assert engine.engine_core.admitted == ["a0", "a1"]  # the batch, no more
    light = start(engine, "b0", "B")
    await settle()
    await step_until(engine, lambda: "b0" in engine.engine_core.admitted)
    order = engine.engine_core.admitted
    assert order.index("b0") == 2, order  # next free slot: B, before A's six queued
    await step_until(engine, lambda: all(t.done() for t in [*flood, light]))
    assert manager.gate.share.running == 0 and manager.gate.share.queued("A") == 0


async def test_with_a_reserve_a_light_tenant_is_admitted_at_once(tmp_path):
    """A batch of 3 with one slot reserved: the flood holds 2, B's request enters the
    engine as it arrives (not after A's next finish), and the flood fills the batch
    again only through the reserve's owner finishing."""
    manager, engine = await make(tmp_path, seqs=3, fair_share_reserve=1)
    flood = [start(engine, f"a{i}", "A") for i in range(6)]
    await settle()
    assert engine.engine_core.admitted == ["a0", "a1"]
    light = start(engine, "b0", "B")
    await settle()
    assert engine.engine_core.admitted == ["a0", "a1", "b0"]  # no step in between
    await step_until(engine, lambda: all(t.done() for t in [*flood, light]))
    assert manager.gate.share.running == 0


async def test_weights_and_caps(tmp_path):
    manager, engine = await make(tmp_path, seqs=2, tenant_weights={"A": 3.0})
    tasks = [start(engine, f"a{i}", "A") for i in range(30)]
    tasks += [start(engine, f"b{i}", "B") for i in range(30)]
    await step_until(engine, lambda: len(engine.engine_core.admitted) >= 40)
    first = engine.engine_core.admitted[:40]
    a = sum(1 for r in first if r.startswith("a"))
    assert 27 <= a <= 33, first  # weight 3:1 (B's lift makes the start even)
    manager.configure_tenant("A", max_in_flight=1)
    share = manager.gate.share
    for _ in range(3000):  # every step: at most one A in the engine once it drains
        await settle()
        if all(t.done() for t in tasks):
            break
        before = share.tenants["A"].running
        engine.step()
        assert share.tenants["A"].running <= max(1, before)
    assert all(t.done() for t in tasks)
    assert len({r for r in engine.engine_core.requests}) == 0
    # a cap, listed with the weights
    tenants = manager.tenants()
    assert tenants["A"]["max_in_flight"] == 1 and tenants["A"]["weight"] == 3.0
    assert tenants["A"]["service_tokens"] > 0


async def test_held_aborted_and_disconnected_requests_give_their_share_back(tmp_path):
    manager, engine = await make(tmp_path)
    await manager.pause("B", "keep", None)
    held = start(engine, "b-held", "B")  # held by the pause: takes no share
    flood = [start(engine, f"a{i}", "A") for i in range(4)]
    await settle()
    assert engine.engine_core.admitted == ["a0", "a1"]
    waiting = start(engine, "b-wait", None)  # the base model, waiting for its share
    gone = start(engine, "a-gone", "A")
    await settle()
    assert manager.gate.share.queued(BASE_TENANT) == 1
    gone.cancel()  # a disconnect while waiting
    await settle()
    assert manager.gate.share.queued("A") == 2
    manager.resume("B")
    await settle()
    aborted = await manager.abort("B")  # the resumed b-held now waits for its share
    assert aborted == 1
    outs = await asyncio.wait_for(held, 2)
    assert outs[-1].outputs[0].finish_reason == "abort"
    await step_until(engine, lambda: all(t.done() for t in [*flood, waiting]))
    share = manager.gate.share
    assert share.running == 0 and all(share.queued(t) == 0 for t in share.tenants)
    assert manager.tenants()[BASE_TENANT]["service_tokens"] > 0  # the base model is charged


@pytest.mark.parametrize("model", ["B", None], ids=["adapter", "base model"])
async def test_a_request_that_waits_longer_than_fair_share_wait_s_gets_503(tmp_path, model):
    """Every wait is bounded: a request whose tenant's turn does not come within
    ``fair_share_wait_s`` is answered 503 and leaves the queue; the lease and the share
    of the request that ran are untouched, and the engine serves the next one."""
    manager, engine = await make(tmp_path, seqs=1, fair_share_wait_s=0.2)
    tenant = model or BASE_TENANT
    running = start(engine, "a-run", "A")
    await settle()
    assert engine.engine_core.admitted == ["a-run"]
    late = start(engine, "late", model)  # the engine is full: it waits for its share
    await settle()
    assert manager.gate.share.queued(tenant) == 1
    with pytest.raises(GracefulHTTPError) as err:
        await asyncio.wait_for(late, 5)
    assert err.value.http_status == HTTPStatus.SERVICE_UNAVAILABLE
    assert "waited 0.2s for its share" in str(err.value)
    share = manager.gate.share
    assert share.queued(tenant) == 0 and share.waiting == 0 and share.running == 1
    assert manager.registry.get("B").versions[1].refcount == 0  # no lease is left
    await step_until(engine, running.done)
    assert share.running == 0
    after = start(engine, "after", model)  # served once there is room
    await step_until(engine, after.done)
    assert (await after)[-1].finished
    assert engine.engine_core.admitted == ["a-run", "after"]


async def test_on_the_base_model_a_request_no_share_can_hold_is_a_400_and_holds_nothing(
    tmp_path,
):
    """A hostile tenant's one wide request (vLLM allows n up to 16,384) would hold the
    whole engine until its last sample ends, and a cap one request may exceed is none.
    On an adapter it is served in parts (below); on the base model, which the gate does
    not continue, wider than the tenant's cap or the engine's batch is a 400, with no
    share or engine request left; the tenant's next request, narrow enough, is served."""
    manager, engine = await make(tmp_path, seqs=4)
    manager.configure_tenant(BASE_TENANT, max_in_flight=2)
    share = manager.gate.share
    for n, limit in ((3, "max_in_flight=2"), (5, "the engine runs at once (4")):
        if n == 5:
            manager.configure_tenant(BASE_TENANT, max_in_flight=None)
        with pytest.raises(GracefulHTTPError) as err:
            await asyncio.wait_for(start(engine, f"wide-{n}", None, n=n), 5)
        assert err.value.http_status == HTTPStatus.BAD_REQUEST
        assert f"n={n} is more than" in str(err.value) and limit in str(err.value)
        assert share.running == 0 and share.waiting == 0
        assert engine.engine_core.admitted == []
    ok = start(engine, "ok", None, n=4)  # the whole batch, no more: served
    await step_until(engine, ok.done)
    assert (await ok)[-1].finished and share.running == 0


def recorded(engine) -> list[EngineCoreRequest]:
    """Every engine request, as it reaches the core."""
    core, seen = engine.engine_core, []
    add = core.add_request_async

    async def recording(request):
        seen.append(request)
        await add(request)

    core.add_request_async = recording
    return seen


@pytest.mark.parametrize("kind", [RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA])
async def test_on_an_adapter_a_request_wider_than_its_share_is_served_in_parts(tmp_path, kind):
    """n=5 over a cap of 2 (then n=9 over the engine's 4): parts as wide as the share,
    one after the other, never more running than the cap; every sample whole, with the
    seed vLLM gives it unsplit (seed + index), so a seeded request reads the same; the
    tenant's share and lease all given back."""
    manager, engine = await make(tmp_path, seqs=4, tenant_max_in_flight={"B": 2})
    share, seen = manager.gate.share, recorded(engine)
    for rid, n, cap in (("w5", 5, 2), ("w9", 9, 4)):
        if rid == "w9":
            manager.configure_tenant("B", max_in_flight=None)
        seen.clear()
        params = SamplingParams(max_tokens=100, n=n, seed=7, output_kind=kind)
        lora = LoRARequest("B", 1, "/alias")

        async def go(params=params, lora=lora, rid=rid):
            return [o async for o in engine.generate("p", params, rid, lora_request=lora)]

        task, most = asyncio.create_task(go()), 0

        def done(task=task) -> bool:
            nonlocal most
            most = max(most, share.tenants["B"].running if "B" in share.tenants else 0)
            return task.done()

        await step_until(engine, done, steps=500)
        tokens: dict[int, list[int]] = {}
        finish: dict[int, str | None] = {}
        for out in await task:
            for c in out.outputs:
                if kind == RequestOutputKind.DELTA:
                    tokens.setdefault(c.index, []).extend(c.token_ids)
                else:
                    tokens[c.index] = list(c.token_ids)
                finish[c.index] = c.finish_reason
        whole = [token_at(len(PROMPT_IDS) - 1 + i) for i in range(4)]
        assert tokens == dict.fromkeys(range(n), whole), tokens
        assert set(finish.values()) == {"stop"}
        assert 0 < most <= cap
        seeds = sorted(r.sampling_params.seed for r in seen)
        assert seeds == [7 + i for i in range(n)] and {r.external_req_id for r in seen} == {rid}
        assert share.running == 0 and share.waiting == 0
        assert manager.registry.get("B").versions[1].refcount == 0


@pytest.mark.parametrize("how", ["abort", "close", "keep", "hold"])
async def test_between_its_parts_a_wide_request_can_be_aborted_or_paused(tmp_path, how):
    """Its next parts wait for their share at the front of their tenant's queue. An
    abort ends them (the samples that ran keep their tokens), and so does a shutdown
    (what runs finishes); a keep pause holds them until resume, a stack's global hold
    (AReaL's pause) until it is released, and then the request is served whole."""
    manager, engine = await make(tmp_path, seqs=4, tenant_max_in_flight={"B": 2})
    share = manager.gate.share
    wide = start(engine, "wide", "B", n=4)
    await settle()
    engine.step()  # its first part (2 samples) makes a token
    await settle()
    assert share.tenants["B"].running == 2
    if how == "abort":
        await manager.abort("B")
        await step_until(engine, wide.done)
        final = (await wide)[-1]
        assert {c.finish_reason for c in final.outputs} == {"abort"}
        assert [len(c.token_ids) for c in final.outputs] == [1, 1, 0, 0]
    elif how == "close":  # the server shuts down: what runs ends, no part starts
        manager.gate.close()
        await step_until(engine, wide.done)
        final = (await wide)[-1]
        assert [c.finish_reason for c in final.outputs] == ["stop", "stop", "abort", "abort"]
        assert [len(c.token_ids) for c in final.outputs] == [4, 4, 0, 0]
    else:
        if how == "keep":
            await manager.pause("B", "keep", None)
        else:
            manager.gate.hold_all()
        for _ in range(5):
            engine.step()
            await settle()
        assert not wide.done() and share.tenants["B"].running == 0
        assert engine.engine_core.admitted.count("wide") == 2  # the first part's, no more
        if how == "keep":
            manager.resume("B")
        else:
            manager.gate.release_all()
        await step_until(engine, wide.done, steps=500)
        final = (await wide)[-1]
        assert [len(c.token_ids) for c in final.outputs] == [4, 4, 4, 4]
    assert share.running == 0 and share.waiting == 0
    assert manager.registry.get("B").versions[1].refcount == 0
    assert not engine.engine_core.requests


async def test_a_continuation_is_not_refused_by_a_cap_lowered_while_it_was_stopped(tmp_path):
    """It was admitted: refusing it would end a request half served. It runs when its
    tenant has nothing else running, as a request queued before the cap changed."""
    manager, engine = await make(tmp_path, seqs=4)
    wide = start(engine, "a-wide", "A", n=2)
    await settle()
    engine.step()
    await manager.pause("A", "keep", None)
    await settle()
    manager.configure_tenant("A", max_in_flight=1)
    manager.resume("A")
    await step_until(engine, wide.done)
    final = (await wide)[-1]
    assert [len(c.token_ids) for c in final.outputs] == [4, 4]
    assert engine.engine_core.admitted.count("a-wide") >= 2  # the first segment, then more
    assert manager.gate.share.running == 0


async def test_a_continuation_keeps_its_place(tmp_path):
    """A keep-stopped request gives its slot back while paused, and on resume goes ahead
    of its tenant's newer requests, not behind them."""
    manager, engine = await make(tmp_path, seqs=1)
    first = start(engine, "a-first", "A")
    await settle()
    engine.step()
    await manager.pause("A", "keep", None)
    await settle()
    b = start(engine, "b0", "B")  # takes the slot a-first gave back
    await settle()
    newer = [start(engine, f"a{i}", "A") for i in range(3)]  # held by the pause
    await settle()
    manager.resume("A")
    await settle()
    assert manager.gate.share.queued("A") == 4
    await step_until(engine, lambda: engine.engine_core.admitted.count("a-first") == 2)
    admitted = engine.engine_core.admitted
    assert admitted == ["a-first", "b0", "a-first"], admitted
    await step_until(engine, lambda: all(t.done() for t in [first, b, *newer]), steps=500)
    assert len((await first)[-1].outputs[0].token_ids) == 4


@pytest.mark.parametrize("share", [True, False])
async def test_under_vllms_priority_policy_a_priority_orders_only_its_tenants_queue(
    tmp_path, share
):
    """vLLM's priority policy orders and preempts across every request in the engine:
    with a fair share, a tenant's priority orders its own queue at the gate and the
    engine sees 0 (one tenant sending -10**9 would never be preempted, the others
    would). With the share off vLLM's own rule applies: the engine sees it."""
    manager, engine = await make(tmp_path, seqs=1, policy="priority", fair_share=share)
    core = engine.engine_core
    requests = recorded(engine)
    tasks = [start(engine, "a0", "A")]
    await settle()
    tasks += [start(engine, "a1", "A"), start(engine, "a2", "A", priority=-5)]
    await settle()
    tasks.append(start(engine, "base", None, priority=-9))
    await step_until(engine, lambda: all(t.done() for t in tasks), steps=500)
    seen = {r.external_req_id: r.priority for r in requests}
    if share:
        assert seen == {"a0": 0, "a1": 0, "a2": 0, "base": 0}
        order = core.admitted
        assert order.index("a2") < order.index("a1"), order  # A's queue, by priority
        assert manager.gate.share.running == 0
    else:
        assert seen == {"a0": 0, "a1": 0, "a2": -5, "base": -9}


async def test_fair_share_off_is_first_come_first_served(tmp_path):
    manager, engine = await make(tmp_path, fair_share=False)
    assert manager.gate.share is None
    tasks = [start(engine, f"a{i}", "A") for i in range(5)]
    await settle()
    assert len(engine.engine_core.admitted) == 5
    await step_until(engine, lambda: all(t.done() for t in tasks))


async def test_a_tenant_is_charged_its_prompt_once_and_every_token(tmp_path):
    """Service = prompt tokens (once per request, and again for each continuation's
    prompt: its tokens so far are prefilled again) + generated tokens, whatever the
    output kind and n."""
    manager, engine = await make(tmp_path, seqs=4)
    prompt = len(PROMPT_IDS)

    def service(name: str) -> int:
        return manager.tenants()[name]["service_tokens"]

    for i, (kind, n) in enumerate(
        [(k, n) for k in RequestOutputKind for n in (1, 2)]  # CUMULATIVE, DELTA, FINAL_ONLY
    ):
        before = service("A") if "A" in manager.tenants() else 0
        params = SamplingParams(max_tokens=100, n=n, output_kind=kind)
        lora = LoRARequest("A", 1, "/alias")

        async def go(params=params, lora=lora, rid=f"c{i}"):
            return [o async for o in engine.generate("p", params, rid, lora_request=lora)]

        task = asyncio.create_task(go())
        await step_until(engine, task.done)
        assert service("A") - before == prompt + n * 4, (kind, n)

    # A continuation: its prompt (the prompt and the k tokens made so far) is charged.
    first = start(engine, "k0", "B")
    await settle()
    engine.step()
    await settle()
    await manager.pause("B", "keep", None)
    await settle()
    made = service("B") - prompt
    assert 0 < made < 4
    manager.resume("B")
    await step_until(engine, first.done)
    assert len((await first)[-1].outputs[0].token_ids) == 4
    assert service("B") == prompt + 4 + (prompt + made)
