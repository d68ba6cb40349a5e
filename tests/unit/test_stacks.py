"""The RL stacks' own routes (opt-in): prime-rl's load and liveness, AReaL's global
pause/continue with its hold, over a real manager and gate on the fake engine."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fakes import FakeEngine, write_adapter
from fastapi import FastAPI
from vllm.sampling_params import SamplingParams

from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.server import stacks
from vllm_lora_ext.server.manager import LoraManager
from vllm_lora_ext.server.plugin import LoraExtPlugin
from vllm_lora_ext.server.routes import router

AUTH = {"Authorization": "Bearer k"}
NO_KEY = {"Authorization": ""}


@pytest.fixture
async def served(tmp_path):
    config = LoraExtConfig(
        admin_key="k",
        hold_timeout_s=2.0,
        liveness_timeout_s=0.2,
        stage_adapters=False,
        stack_routes={"prime-rl", "areal"},
    )
    manager = LoraManager(FakeEngine(), config)
    manager.install()
    app = FastAPI()
    app.include_router(router)
    stacks.attach(app, config.stack_routes)
    app.state.lora_ext = manager
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers=AUTH
    ) as c:
        yield c, manager
    await manager.shutdown()


async def first_output(engine, model_lora=None, rid="r"):
    params = SamplingParams(max_tokens=2)
    async for out in engine.generate([1, 2], params, rid, lora_request=model_lora):
        return out
    return None


async def test_prime_rl_load_is_a_new_version_each_step(served, tmp_path):
    c, manager = served
    for step in (1, 2):
        path = write_adapter(tmp_path / f"step_{step}")
        r = await c.post("/load_lora_adapter", json={"lora_name": "policy", "lora_path": str(path)})
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert manager.registry.get("policy").current == step
    # Not there (yet): 404, which prime-rl retries (NFS propagation).
    r = await c.post("/load_lora_adapter", json={"lora_name": "policy", "lora_path": "/nope/x"})
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    assert manager.registry.get("policy").current == 2  # still serving
    r = await c.post("/load_lora_adapter", json={"lora_name": "policy"})
    assert r.status_code == 400 and "lora_path" in r.json()["error"]["message"]
    r = await c.post(
        "/load_lora_adapter", json={"lora_name": "p", "lora_path": "/x"}, headers=NO_KEY
    )
    assert r.status_code == 401  # a control route: the admin key


async def test_prime_rl_liveness(served):
    c, manager = served
    r = await c.get("/liveness", headers=NO_KEY)  # a probe: open
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    manager.engine.health_delay_s = 5
    r = await c.get("/liveness")
    assert r.status_code == 503 and r.json() == {"status": "engine_unresponsive"}


async def test_areal_pause_holds_every_request_until_continue(served, tmp_path):
    c, manager = served
    engine = manager.engine
    r = await c.post("/areal_pause_generation", json={})
    assert r.status_code == 200 and r.json()["success"] is True
    assert engine.global_paused == "abort"
    held = asyncio.create_task(first_output(engine))  # the base model too
    await asyncio.sleep(0.2)
    assert not held.done() and engine.running == set()
    r = await c.post("/areal_continue_generation", json={})
    assert r.status_code == 200 and r.json() == {"success": True, "message": "Generation continued"}
    assert engine.global_paused is None
    out = await asyncio.wait_for(held, 5)
    assert out is not None and out.outputs[0].token_ids


async def test_areal_hold_is_bounded_and_composes_with_adapter_pauses(served, tmp_path):
    c, manager = served
    await manager.load("meow", str(write_adapter(tmp_path / "meow")))
    await manager.pause("meow", "keep", None)
    manager.config.hold_timeout_s = 0.2
    await c.post("/areal_pause_generation", json={})
    with pytest.raises(Exception, match="paused for a weight update"):
        await first_output(manager.engine)  # held past hold_timeout_s: 503
    await c.post("/areal_continue_generation", json={})
    # The adapter's own pause is independent: still paused after AReaL's continue.
    assert manager.registry.get("meow").paused


async def test_a_failed_areal_pause_holds_nothing(served):
    c, manager = served

    async def broken(**_):
        raise RuntimeError("engine gone")

    manager.engine.pause_generation = broken
    with pytest.raises(RuntimeError):
        await c.post("/areal_pause_generation", json={})
    assert not manager.gate.holding_all
    assert await asyncio.wait_for(first_output(manager.engine), 5) is not None


def test_stack_routes_are_opt_in(monkeypatch):
    monkeypatch.delenv("LORA_EXT_STACK_ROUTES", raising=False)
    for stacks_on, expected in (
        (set(), set()),
        ({"prime-rl"}, {"/load_lora_adapter", "/liveness"}),
        ({"areal"}, {"/areal_pause_generation", "/areal_continue_generation"}),
    ):
        app = FastAPI()
        LoraExtPlugin(LoraExtConfig(stack_routes=stacks_on)).attach_router(app)
        paths = {getattr(r, "path", "") for r in app.routes}
        everything = {
            "/load_lora_adapter",
            "/liveness",
            "/areal_pause_generation",
            "/areal_continue_generation",
        }
        assert paths & everything == expected
    with pytest.raises(ValueError, match="stack_routes"):
        LoraExtConfig(stack_routes={"verl"})
