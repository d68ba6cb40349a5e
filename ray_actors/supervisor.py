"""Replicas that come back: a supervisor actor restarts a replica whose actor or engine
died, in the same placement group, and brings it to the state its peers serve (names,
current versions under the same numbers, pinned versions, pauses) before it is listed
again.

The desired state is what the healthy replicas serve, snapshotted every check (the
newest current version of each name wins), so loads made straight to the replicas by any
controller are restored too; when every replica died at once, the last snapshot.
Versions are reloaded from the paths the replicas report (a trainer's step or checkpoint
directory) under their own numbers, so ``meow@12`` is the same weights on every replica.
A path that is gone by then cannot be restored: the replica comes back without that
version, and the failure is reported in :meth:`Supervisor.status`.

:func:`plan_restore` is the pure part: which control calls bring a replica from what it
serves to what its peers serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_actors.server_actor import ReplicaSpec
from vllm_lora_ext.client import RemoteInferenceClient

logger = logging.getLogger("vllm.lora_ext")

Adapters = Mapping[str, Mapping[str, Any]]  # name -> one /skyrl/v1/loras adapter entry


def desired_state(snapshots: Iterable[Adapters]) -> dict[str, dict[str, Any]]:
    """Per name, the adapter entry with the newest current version across replicas."""
    out: dict[str, dict[str, Any]] = {}
    for adapters in snapshots:
        for name, entry in adapters.items():
            if name not in out or entry["version"] > out[name]["version"]:
                out[name] = dict(entry)
    return out


def plan_restore(desired: Adapters, actual: Adapters) -> list[tuple[str, dict[str, Any]]]:
    """The ``(route, body)`` control calls, in order, that make a replica serving
    ``actual`` serve ``desired``: pinned versions older than the current one first
    (versions only go up), then the current one, each under its number; then pauses.
    Names the replica serves beyond ``desired`` are left alone."""
    calls: list[tuple[str, dict[str, Any]]] = []
    for name, want in sorted(desired.items()):
        have = actual.get(name)
        have_version = have["version"] if have is not None else 0
        versions = {v["version"]: v for v in want.get("versions", []) if not v.get("unloaded")}
        current = versions.get(want["version"], {"version": want["version"]})
        if "path" not in current:
            continue  # nothing to load it from
        loads = [
            v
            for n, v in sorted(versions.items())
            if have_version < n < want["version"] and v["pinned"]
        ]
        if want["version"] > have_version:
            loads.append(current)
        for v in loads:
            body = {"lora_name": name, "lora_path": v["path"], "version": v["version"]}
            calls.append(("load_lora_adapter", {**body, "pin": bool(v.get("pinned"))}))
        if want.get("paused") and not (have or {}).get("paused"):
            calls.append(("pause", {"lora_name": name, "mode": want.get("pause_mode") or "keep"}))
    return calls


class Supervisor:
    """The supervisor actor's body (use :data:`SupervisorActor`)."""

    def __init__(
        self, spec: ReplicaSpec, check_every_s: float = 2.0, restart_timeout_s: float = 600
    ) -> None:
        self.spec = spec
        self.check_every_s = check_every_s
        self.restart_timeout_s = restart_timeout_s
        self.groups: list[Any] = []
        self.actors: list[Any] = []
        self.urls_: list[str | None] = []
        self.desired: dict[str, dict[str, Any]] = {}
        self.restarts = 0
        self.failures: deque[str] = deque(maxlen=20)  # the latest restore failures
        self._watch: asyncio.Task | None = None
        key = (spec.config or {}).get("admin_key")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def start(self, num_servers: int, placement_timeout_s: float = 120) -> list[str]:
        self.groups = await asyncio.to_thread(
            self.spec.placement_groups, num_servers, placement_timeout_s
        )
        self.actors = [self.spec.actor_in(g) for g in self.groups]
        self.urls_ = list(await asyncio.gather(*(self.spec.start(a) for a in self.actors)))
        self._watch = asyncio.get_running_loop().create_task(self._run())
        return self.urls()

    def urls(self) -> list[str]:
        """The replicas serving now (a restarting one is left out until restored)."""
        return [u for u in self.urls_ if u is not None]

    def replicas(self) -> list[Any]:
        """The replica actors, slot by slot (a restart replaces one)."""
        return list(self.actors)

    def status(self) -> dict[str, Any]:
        return {"urls": self.urls(), "restarts": self.restarts, "failures": list(self.failures)}

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=30, headers=self._headers) as http:
            while True:
                await asyncio.sleep(self.check_every_s)
                try:
                    await self._check(http)
                except Exception:  # a check must never end supervision
                    logger.exception("lora_ext supervisor check failed")

    async def _alive(self, i: int) -> bool:
        try:
            return bool(await asyncio.wait_for(self.actors[i].health.remote(), 15))
        except Exception:
            return False

    async def _check(self, http: httpx.AsyncClient) -> None:
        alive = await asyncio.gather(*(self._alive(i) for i in range(len(self.actors))))
        snapshots = []
        for ok, url in zip(alive, self.urls_, strict=True):
            if ok and url is not None:
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    snapshots.append(await _adapters(http, url))
        if snapshots:  # (an unloaded name leaves the desired state with its last replica)
            self.desired = desired_state(snapshots)
        down = [i for i, ok in enumerate(alive) if not ok]
        await asyncio.gather(*(self._restart(i, http) for i in down))

    async def _restart(self, i: int, http: httpx.AsyncClient) -> None:
        """Replace replica ``i`` in its placement group (which Ray moves to another
        node when its node left) and restore it; a restart that fails or does not
        serve within ``restart_timeout_s`` is reported and tried again next check."""
        logger.warning("lora_ext supervisor: replica %d (%s) is down, restarting", i, self.urls_[i])
        self.urls_[i] = None
        with contextlib.suppress(Exception):
            ray.kill(self.actors[i])
        self.actors[i] = self.spec.actor_in(self.groups[i])
        try:
            async with asyncio.timeout(self.restart_timeout_s):
                await self._restore(i, http)
        except Exception as e:
            self.failures.append(f"replica {i} restart: {type(e).__name__}: {e}"[:300])
            logger.exception("lora_ext supervisor: restarting replica %d failed", i)

    async def _restore(self, i: int, http: httpx.AsyncClient) -> None:
        url = await self.spec.start(self.actors[i])
        actual = await _adapters(http, url)
        for route, body in plan_restore(self.desired, actual):
            r = await http.post(f"{url}/skyrl/v1/{route}", json=body)
            if r.status_code >= 400:
                self.failures.append(f"{url} {route} {body}: {r.status_code} {r.text[:200]}")
        self.urls_[i] = url
        self.restarts += 1

    async def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for actor in self.actors:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(actor.shutdown.remote(), 120)
            ray.kill(actor)
        for group in self.groups:
            remove_placement_group(group)


async def _adapters(http: httpx.AsyncClient, url: str) -> dict[str, dict[str, Any]]:
    r = await http.get(f"{url}/skyrl/v1/loras")
    r.raise_for_status()
    return {a["lora_name"]: a for a in r.json()["adapters"]}


SupervisorActor = ray.remote(num_cpus=0, max_concurrency=100)(Supervisor)


def start_supervised(
    server_args: list[str],
    num_servers: int = 1,
    *,
    config: dict | None = None,
    num_cpus: float = 1,
    bind_all: bool = False,
    env: dict[str, str] | None = None,
    name: str | None = None,
    check_every_s: float = 2.0,
) -> tuple[Any, list[str]]:
    """Replicas under a supervisor; returns its handle and the URLs. With ``name`` the
    supervisor is a detached named actor (``ray.get_actor(name)``), outliving the
    driver; stop it with ``ray.get(sup.shutdown.remote())``. The supervisor owns the
    replica actors (they end with it), so it runs on the caller's node (the head, for a
    driver there), never on a worker node that may leave (Ray's soft node affinity
    placed it elsewhere, so it is a hard one)."""
    spec = ReplicaSpec.of(server_args, config, num_cpus, bind_all, env)
    here = ray.get_runtime_context().get_node_id()
    options: dict[str, Any] = {
        "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)
    }
    if name is not None:
        options |= {"name": name, "lifetime": "detached"}
    sup = SupervisorActor.options(**options).remote(spec, check_every_s)
    return sup, ray.get(sup.start.remote(num_servers))


def follow(sup: Any, **client_kwargs: Any) -> RemoteInferenceClient:
    """A client on the supervisor's replicas that follows the set as replicas restart
    (on a new port, or a new node) or leave."""

    async def urls() -> list[str]:
        return await asyncio.wrap_future(sup.urls.remote().future())

    return RemoteInferenceClient(ray.get(sup.urls.remote()), replica_source=urls, **client_kwargs)
