"""The supervisor's tending, reconciling and control logic, over replicas that are real
servers (our routes and a real LoraManager on the fake engine, reached over ASGI) behind
fake Ray actors; Ray's KV is a dict. Each test names the defect of the old supervisor it
shows fixed (issue 17, points 1-4)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest
from fakes import FakeEngine, write_adapter
from fastapi import FastAPI
from pydantic import ValidationError

from ray_actors import supervisor as sup_module
from ray_actors.fleet import FleetIntent
from ray_actors.supervisor import Supervisor
from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.server.manager import LoraManager
from vllm_lora_ext.server.routes import router


class Ref:
    """What ``actor.method.remote()`` returns: awaitable, like an ObjectRef."""

    def __init__(self, coro) -> None:
        self.coro = coro

    def __await__(self):
        return self.coro.__await__()


class Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Ref:
        return Ref(self.fn(*args))


class Fleet:
    """The replicas' world: servers by host, fake actors by name, KV, kills."""

    def __init__(self, tmp_path) -> None:
        self.tmp = tmp_path
        self.kv: dict[bytes, str] = {}
        self.actors: dict[str, FakeActor] = {}
        self.servers: dict[str, FastAPI] = {}
        self.killed: list[str] = []
        self.started = 0
        self.hang_starts = 0  # the next starts never serve

    def transport(self) -> httpx.AsyncBaseTransport:
        fleet = self

        class Route(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                app = fleet.servers.get(request.url.host)
                if app is None:
                    raise httpx.ConnectError("refused", request=request)
                return await httpx.ASGITransport(app=app).handle_async_request(request)

        return Route()


class FakeActor:
    def __init__(self, fleet: Fleet, name: str) -> None:
        self.fleet, self.name = fleet, name
        self.url: str | None = None
        self.manager: LoraManager | None = None
        self.healthy = True
        self.health = Method(self._health)
        self.start_calls = 0
        fleet.actors[name] = self

    async def _health(self) -> bool:
        return self.healthy

    async def _start(self) -> str:
        self.start_calls += 1
        if self.url is not None:
            return self.url
        if self.fleet.hang_starts:
            self.fleet.hang_starts -= 1
            await asyncio.Event().wait()
        self.fleet.started += 1
        config = LoraExtConfig(
            stage_adapters=False, hold_timeout_s=1, drain_timeout_s=1, stable_wait_s=0.1
        )
        self.manager = LoraManager(FakeEngine(), config)
        self.manager.install()
        app = FastAPI()
        app.include_router(router)
        app.state.lora_ext = self.manager
        host = f"r{self.fleet.started}"
        self.fleet.servers[host] = app
        self.url = f"http://{host}"
        return self.url

    async def _shutdown(self) -> None:
        if self.url is not None:
            self.fleet.servers.pop(self.url.removeprefix("http://"), None)
        if self.manager is not None:
            await self.manager.shutdown()

    @property
    def shutdown(self) -> Method:
        return Method(self._shutdown)


class Spec:
    config: dict = {}

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def placement_group(self, name: str, timeout_s: float) -> str:
        return name

    def actor_in(self, group: Any, name: str | None = None) -> FakeActor:
        return FakeActor(self.fleet, name or "anon")

    def start(self, actor: FakeActor) -> Ref:
        return Ref(actor._start())


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    world = Fleet(tmp_path)

    class Store:
        def __init__(self, name: str) -> None:
            self.key = name

        def load(self):
            raw = world.kv.get(self.key)
            return sup_module.FleetRecord.model_validate_json(raw) if raw else None

        def save(self, record) -> None:
            world.kv[self.key] = record.model_dump_json()

        def delete(self) -> None:
            world.kv.pop(self.key, None)

    def get_actor(name: str) -> FakeActor:
        if name not in world.actors:
            raise ValueError(name)
        return world.actors[name]

    def kill(actor: FakeActor, no_restart: bool = True) -> None:
        world.killed.append(actor.name)
        world.actors.pop(actor.name, None)
        if actor.url is not None:
            world.servers.pop(actor.url.removeprefix("http://"), None)

    monkeypatch.setattr(sup_module, "Store", Store)
    monkeypatch.setattr(sup_module.ray, "get_actor", get_actor)
    monkeypatch.setattr(sup_module.ray, "kill", kill)
    monkeypatch.setattr(sup_module.ray.util, "get_placement_group", lambda name: name)
    return world


def supervisor(fleet: Fleet, **kwargs: Any) -> Supervisor:
    kwargs = {"check_every_s": 0.05, "probe_timeout_s": 0.5, **kwargs}
    sup = Supervisor(Spec(fleet), "test", **kwargs)  # type: ignore[arg-type]
    sup._http_client = httpx.AsyncClient(transport=fleet.transport(), timeout=10)
    return sup


async def stop(sup: Supervisor) -> None:
    for slot in sup.slots.values():
        if slot.task is not None:
            slot.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                async with asyncio.timeout(10):  # a tend loop that ignores cancel: fail
                    await slot.task


async def until(pred, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if pred():
                return
            await asyncio.sleep(0.02)


async def served(sup: Supervisor, url: str) -> dict:
    r = await sup._http().get(f"{url}/skyrl/v1/loras")
    return {a["lora_name"]: a for a in r.json()["adapters"]}


async def test_a_restore_that_fails_is_retried_until_the_replica_is_listed(fleet):
    """Point 1: a replica whose restore failed stayed unlisted forever."""
    step = fleet.tmp / "step_3"  # not written yet: every load of it fails
    sup = supervisor(fleet)
    sup.record.intent = FleetIntent().load("meow", str(step), 3)
    task = asyncio.create_task(sup.scale(1))
    await until(lambda: sup.slots)
    (slot,) = sup.slots.values()
    await until(lambda: slot.state == "reconciling" and slot.reason)
    assert not slot.listed and sup.urls() == [] and "step_3" in slot.reason
    write_adapter(step)  # the file system caught up
    await asyncio.wait_for(task, 10)
    assert sup.urls() == [slot.url] and slot.state == "serving"
    assert (await served(sup, slot.url))["meow"]["version"] == 3
    await stop(sup)


async def test_live_replicas_converge_to_drift_and_the_window(fleet):
    """Points 2 and 3: a live replica that missed meow@3 (a failed load) is unlisted,
    then gets it; the version inside the window and the fleet's unload and pause reach
    a replica that was down; a replica is listed only once it matches."""
    paths = {n: str(write_adapter(fleet.tmp / f"meow_{n}")) for n in (1, 2, 3)}
    sup = supervisor(fleet)
    sup.record.intent = FleetIntent(window=1)
    await sup.scale(2)
    a, b = sorted(sup.slots.values(), key=lambda s: s.id)
    for n in (1, 2):
        answer = await sup.control(
            "load_lora_adapter", {"lora_name": "meow", "lora_path": paths[n]}
        )
        assert answer["version"] == n and not answer["reconciling"]
    await sup.control("load_lora_adapter", {"lora_name": "tmp", "lora_path": paths[1]})
    # b misses meow@3 and the unload of tmp and the pause (it is down for them).
    b_host = b.url.removeprefix("http://")
    app = fleet.servers.pop(b_host)
    answer = await sup.control("load_lora_adapter", {"lora_name": "meow", "lora_path": paths[3]})
    assert list(answer["reconciling"]) == [b.url] and sup.urls() == [a.url]
    await sup.control("unload_lora_adapter", {"lora_name": "tmp"})
    await sup.control("pause", {"lora_name": "meow", "mode": "keep"})
    fleet.servers[b_host] = app  # back
    await until(lambda: b.listed)
    for url in (a.url, b.url):
        state = await served(sup, url)
        assert "tmp" not in state and state["meow"]["version"] == 3
        assert {v["version"] for v in state["meow"]["versions"]} >= {2, 3}  # the window
        assert state["meow"]["paused"] and state["meow"]["pause_mode"] == "keep"
    await stop(sup)


async def test_a_load_refused_by_the_first_replica_records_nothing(fleet):
    sup = supervisor(fleet)
    await sup.scale(2)
    before = sup.record.intent.revision
    answer = await sup.control("load_lora_adapter", {"lora_name": "meow", "lora_path": "/nope"})
    assert answer["error"]["status"] == 404 and sup.record.intent.revision == before
    assert len(sup.urls()) == 2  # nobody unlisted for a caller's mistake
    assert (await sup.control("pause", {"lora_name": "ghost"}))["error"]["status"] == 404
    await stop(sup)


async def test_k_failed_probes_replace_a_replica_without_stalling_the_others(fleet):
    """Point 4: one slow probe killed a replica, and a restart blocked every check."""
    sup = supervisor(fleet, max_failed_probes=3, restart_timeout_s=0.5)
    await sup.scale(2)
    a, b = sorted(sup.slots.values(), key=lambda s: s.id)
    doomed = fleet.actors[a.record.actor]
    doomed.healthy = False
    await until(lambda: a.failed_probes == 2)
    assert a.restarts == 0 and a.listed is True  # not yet: K = 3
    fleet.hang_starts = 2  # the next two starts never serve: bounded, backed off, retried
    await until(lambda: a.restarts == 1)
    assert doomed.name in fleet.killed and not a.listed
    probes_before = b.failed_probes, b.listed
    await until(lambda: "TimeoutError" in (a.reason or ""))
    assert probes_before == (0, True) and b.listed  # b is tended meanwhile
    await until(lambda: a.listed, timeout=20)
    assert a.record.generation >= 2 and sup.status()["replicas"][0]["state"] == "serving"
    assert any("TimeoutError" in f for f in sup.status()["failures"])
    await stop(sup)


async def test_a_restarted_supervisor_adopts_the_running_replicas(fleet):
    """Point 4: the supervisor's death ended the fleet. Now the record outlives it and a
    new supervisor adopts the replicas by name, starting nothing."""
    path = str(write_adapter(fleet.tmp / "meow"))
    sup = supervisor(fleet)
    await sup.scale(2)
    await sup.control("load_lora_adapter", {"lora_name": "meow", "lora_path": path, "version": 7})
    urls = sup.urls()
    await stop(sup)  # the supervisor dies; its replicas keep serving
    started = fleet.started
    again = supervisor(fleet)  # Ray restarts it: the constructor re-adopts
    await until(lambda: len(again.urls()) == 2)
    assert again.urls() == urls and fleet.started == started and fleet.killed == []
    assert again.record.intent.names["meow"].current == 7
    await stop(again)


async def test_a_restarted_supervisor_finishes_a_restore(fleet):
    """Killed while a replica was restoring: the new one finishes the restore."""
    path = str(write_adapter(fleet.tmp / "meow"))
    sup = supervisor(fleet)
    await sup.scale(1)
    await sup.control("load_lora_adapter", {"lora_name": "meow", "lora_path": path, "version": 4})
    (slot,) = sup.slots.values()
    fleet.actors[slot.record.actor].healthy = False
    await until(lambda: slot.restarts == 1 and slot.state in ("restarting", "reconciling"))
    await stop(sup)
    again = supervisor(fleet)
    try:
        await until(lambda: again.urls() != [], timeout=10)
    except TimeoutError:
        raise AssertionError([s.status() for s in again.slots.values()]) from None
    (url,) = again.urls()
    assert (await served(again, url))["meow"]["version"] == 4
    await stop(again)


async def test_scale_up_then_down_drains_before_stopping(fleet):
    sup = supervisor(fleet, drain_timeout_s=5)
    await sup.scale(1)
    urls = await sup.scale(3)
    assert len(urls) == 3
    last = max(sup.slots.values(), key=lambda s: s.id)
    manager = fleet.actors[last.record.actor].manager
    busy = {"n": 1}
    original = sup._in_flight

    async def in_flight(url: str) -> int:
        if url == last.url and busy["n"]:
            busy["n"] -= 1
            return 1
        return await original(url)

    sup._in_flight = in_flight  # type: ignore[method-assign]
    urls = await sup.scale(1)
    assert len(urls) == 1 and len(sup.slots) == 1 and busy["n"] == 0  # drained first
    assert manager is not None and last.record.actor not in fleet.actors
    assert set(sup.record.slots) == set(sup.slots)
    await stop(sup)


async def test_names_given_at_start_are_adopted_when_a_controller_first_names_them(fleet):
    """``--lora-modules`` adapters are served by every replica but recorded by nobody: a
    pause of one is recorded from what a replica serves, not refused."""
    path = str(write_adapter(fleet.tmp / "woof"))
    sup = supervisor(fleet)
    await sup.scale(2)
    for actor in list(fleet.actors.values()):  # what --lora-modules does at start
        await actor.manager.load("woof", path)
    answer = await sup.control("pause", {"lora_name": "woof", "mode": "abort"})
    assert "error" not in answer and len(answer["results"]) == 2
    assert sup.record.intent.names["woof"].paused == "abort"
    await stop(sup)


@pytest.mark.parametrize(
    "settings",
    [
        {"check_every_s": 0},  # a probe loop with no pause
        {"restart_timeout_s": float("inf")},  # a start waited for with no bound
        {"probe_timeout_s": float("nan")},
        {"drain_timeout_s": 1e9},
        {"max_failed_probes": 0},
        {"check_every": 1.0},  # a misspelt setting (a TypeError inside the actor before)
    ],
)
def test_a_setting_with_no_bound_is_refused_before_any_actor_exists(settings):
    """In the caller (no Ray needed: it fails before the actor is made), and in the
    actor's body for a caller that builds it directly."""
    with pytest.raises(ValidationError):
        sup_module.start_supervised(["--model", "m"], **settings)
    with pytest.raises(ValidationError):
        Supervisor(None, "test", **settings)  # type: ignore[arg-type]
