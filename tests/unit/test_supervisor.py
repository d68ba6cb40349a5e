"""What a restarted replica must be told to serve what its peers serve (pure), and a
restart that never comes up."""

from __future__ import annotations

import asyncio

import httpx

from ray_actors import supervisor
from ray_actors.supervisor import Supervisor, desired_state, plan_restore


def entry(version: int, versions: list[tuple[int, bool]], paused=False, mode=None) -> dict:
    return {
        "version": version,
        "paused": paused,
        "pause_mode": mode,
        "versions": [
            {"version": n, "path": f"/ckpt/step_{n}", "pinned": pinned, "unloaded": False}
            for n, pinned in versions
        ],
    }


def test_the_newest_current_version_of_each_name_is_desired():
    a = {"meow": entry(3, [(2, False), (3, False)]), "woof": entry(7, [(7, False)])}
    b = {"meow": entry(4, [(3, False), (4, False)])}
    desired = desired_state([a, b])
    assert desired["meow"]["version"] == 4 and desired["woof"]["version"] == 7
    assert desired_state([b, a])["meow"]["version"] == 4  # order does not matter


def test_an_empty_replica_gets_pinned_versions_then_the_current_one_then_its_pauses():
    desired = {
        "meow": entry(5, [(2, True), (4, False), (5, False)], paused=True, mode="abort"),
        "woof": entry(1, [(1, False)]),
    }

    def load(name: str, n: int, pin: bool) -> tuple[str, dict]:
        body = {"lora_name": name, "lora_path": f"/ckpt/step_{n}", "version": n, "pin": pin}
        return "load_lora_adapter", body

    assert plan_restore(desired, {}) == [
        load("meow", 2, True),
        load("meow", 5, False),
        ("pause", {"lora_name": "meow", "mode": "abort"}),
        load("woof", 1, False),
    ]


def test_what_a_replica_already_serves_is_left_alone():
    desired = {"meow": entry(5, [(2, True), (5, False)]), "woof": entry(1, [(1, False)])}
    actual = {"meow": entry(5, [(5, False)]), "woof": entry(1, [(1, False)]), "x": entry(9, [])}
    assert plan_restore(desired, actual) == []
    behind = {"meow": entry(3, [(3, False)])}
    calls = plan_restore({"meow": desired["meow"]}, behind)
    assert [body["version"] for _, body in calls] == [5]  # pinned 2 is older than 3: skip


class HangingSpec:
    """A replica spec whose replicas never come up (a placement group with no node to
    go to): the restart must give up in time, say so, and leave the slot unlisted."""

    config: dict = {}

    def __init__(self) -> None:
        self.started = 0

    def actor_in(self, group: object) -> object:
        return object()

    async def start(self, actor: object) -> str:
        self.started += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_restart_that_never_serves_times_out_and_is_reported(monkeypatch):
    killed: list[object] = []
    monkeypatch.setattr(supervisor.ray, "kill", killed.append)
    spec = HangingSpec()
    sup = Supervisor(spec, restart_timeout_s=0.2)  # type: ignore[arg-type]
    dead = object()
    sup.groups, sup.actors, sup.urls_ = [None, None], [object(), dead], ["u0", "u1"]
    async with httpx.AsyncClient() as http:
        await asyncio.wait_for(sup._restart(1, http), 5)
    assert killed == [dead] and spec.started == 1
    assert sup.urls() == ["u0"] and sup.restarts == 0
    (failure,) = sup.status()["failures"]
    assert failure.startswith("replica 1 restart: TimeoutError")
