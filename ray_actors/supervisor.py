"""A fleet that converges and outlives its supervisor.

- **One desired state per fleet** (:class:`~ray_actors.fleet.FleetIntent`): controllers'
  calls (the client's ``sync_lora``, ``load_lora_adapter``, ``unload_lora_adapter``,
  ``pause_generation``, ``resume_generation`` through :func:`follow`) go through the
  supervisor, which records the intent (durably, in Ray's internal KV) before it fans the
  call out, one call at a time, so two controllers cannot make replicas disagree and a
  call a replica missed is not lost.
- **Continuous reconciliation**: every check converges every replica to the desired state
  with the pure planner (:func:`~ray_actors.fleet.plan`: missing versions under their
  numbers, the retention window, pins, unloads, pauses). A replica is listed
  (:meth:`Supervisor.urls`) only once it matches; one that drifts (a failed load) is
  unlisted until it matches again.
- **No single point of failure**: replicas and their placement groups are named detached
  actors and groups, so they keep serving while no supervisor runs; the supervisor is a
  named detached actor that Ray restarts (``max_restarts=-1``), and a restarted one reads
  the fleet's record and re-adopts the running replicas by name (a replica mid-start is
  waited for, not started twice) instead of killing them.
- **Health**: a replica is replaced after ``max_failed_probes`` consecutive failed probes;
  each slot is tended by its own task, so a restart (bounded by ``restart_timeout_s``,
  retried with exponential backoff) never stalls the checks of the others.
- **Elastic**: :meth:`Supervisor.scale` adds slots (placed, started, reconciled, then
  listed) or removes them (unlisted first, drained, then stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import ray
from pydantic import BaseModel, ConfigDict, Field
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_actors.fleet import FleetIntent, plan, unreachable
from ray_actors.server_actor import ReplicaSpec
from vllm_lora_ext.client import RemoteInferenceClient
from vllm_lora_ext.config import LoraExtConfig, Seconds

logger = logging.getLogger("vllm.lora_ext")

KV_NAMESPACE = "lora_ext"
#: The calls that change what a fleet serves: recorded by the supervisor, then fanned out.
INTENT_OPS = frozenset(
    {"load_lora_adapter", "unload_lora_adapter", "pause", "resume", "pin_lora_adapter"}
)
SlotState = Literal["starting", "reconciling", "serving", "restarting", "draining", "failed"]


class SlotRecord(BaseModel):
    """One replica slot as stored: the names of its detached actor and group."""

    actor: str
    group: str
    generation: int = 0


class FleetRecord(BaseModel):
    """What survives the supervisor: the desired state and the slots."""

    intent: FleetIntent
    slots: dict[int, SlotRecord] = Field(default_factory=dict)
    next_slot: int = 0


class Store:
    """The fleet's record in Ray's internal KV (held by the cluster's GCS: it outlives
    every actor and driver of the cluster)."""

    def __init__(self, fleet: str) -> None:
        self.key = f"fleet/{fleet}".encode()

    def load(self) -> FleetRecord | None:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(self.key, namespace=KV_NAMESPACE)
        return FleetRecord.model_validate_json(raw) if raw else None

    def save(self, record: FleetRecord) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(
            self.key, record.model_dump_json(), overwrite=True, namespace=KV_NAMESPACE
        )

    def delete(self) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(self.key, namespace=KV_NAMESPACE)


@dataclass(eq=False)
class Slot:
    """One replica slot at run time."""

    id: int
    record: SlotRecord
    group: Any = None
    actor: Any = None
    url: str | None = None
    state: SlotState = "starting"
    reason: str | None = None
    listed: bool = False
    failed_probes: int = 0
    restarts: int = 0
    unreachable: list[str] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task | None = None
    removing: bool = False

    def status(self) -> dict[str, Any]:
        return {
            "slot": self.id,
            "state": self.state,
            "url": self.url,
            "listed": self.listed,
            "reason": self.reason,
            "failed_probes": self.failed_probes,
            "restarts": self.restarts,
            "unreachable_versions": list(self.unreachable),
        }


class FleetError(Exception):
    """A control call the fleet refused (nothing recorded); ``status`` as HTTP."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class SupervisorSettings(BaseModel):
    """How the supervisor tends its replicas: every period and wait finite and bounded
    (checked in the caller by :func:`start_supervised`, before any actor exists)."""

    model_config = ConfigDict(extra="forbid")

    check_every_s: Seconds = Field(default=2.0, ge=0.01, description="Probe period.")
    restart_timeout_s: Seconds = Field(
        default=600.0, description="Bound of a replica's start until it serves."
    )
    max_failed_probes: int = Field(default=3, ge=1, le=1000)
    probe_timeout_s: Seconds = Field(default=15.0, description="Bound of one probe.")
    backoff_max_s: Seconds = Field(default=60.0, description="Longest wait between restarts.")
    drain_timeout_s: Seconds = Field(default=120.0, description="Bound of a replica's drain.")
    placement_timeout_s: Seconds = Field(
        default=120.0, description="Bound of a replica's placement group being placed."
    )


class Supervisor:
    """The supervisor actor's body (use :func:`start_supervised`)."""

    def __init__(self, spec: ReplicaSpec, fleet: str = "lora_ext", **settings: Any) -> None:
        self.spec = spec
        self.fleet = fleet
        s = SupervisorSettings(**settings)
        self.check_every_s = s.check_every_s
        self.restart_timeout_s = s.restart_timeout_s
        self.max_failed_probes = s.max_failed_probes
        self.probe_timeout_s = s.probe_timeout_s
        self.backoff_max_s = s.backoff_max_s
        self.drain_timeout_s = s.drain_timeout_s
        self.placement_timeout_s = s.placement_timeout_s
        self.store = Store(fleet)
        self.slots: dict[int, Slot] = {}
        self.failures: deque[str] = deque(maxlen=50)  # latest problems, newest last
        self._control = asyncio.Lock()  # one control call (intent + fan-out) at a time
        self._scale = asyncio.Lock()
        self._http_client: httpx.AsyncClient | None = None
        key = (spec.config or {}).get("admin_key")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        # Versions below the current one every replica keeps (its retention window).
        window = (LoraExtConfig(**(spec.config or {})).keep_versions or 1) - 1
        self.record = self.store.load() or FleetRecord(intent=FleetIntent(window=window))
        # A restarted supervisor finds its slots in the record and re-adopts them.
        for sid, rec in self.record.slots.items():
            self._tend(Slot(sid, rec))

    # ---- the fleet ----------------------------------------------------------------------
    async def start(self, num_servers: int) -> list[str]:
        """Bring the fleet to ``num_servers`` replicas (a fleet that already exists, e.g.
        after a driver restart, keeps its slots) and return the URLs once all serve."""
        if not self.slots:
            await self.scale(num_servers)
        await self._until_listed(list(self.slots.values()), self.restart_timeout_s)
        return self.urls()

    def urls(self) -> list[str]:
        """The replicas serving the desired state now (restarting, reconciling and
        draining ones are left out)."""
        return [s.url for _, s in sorted(self.slots.items()) if s.listed and s.url]

    def replicas(self) -> list[Any]:
        """The replica actors, slot by slot (a restart replaces one)."""
        return [s.actor for _, s in sorted(self.slots.items())]

    def status(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "urls": self.urls(),
            "replicas": [s.status() for _, s in sorted(self.slots.items())],
            "restarts": sum(s.restarts for s in self.slots.values()),
            "failures": list(self.failures),
            "revision": self.record.intent.revision,
            "intent": json.loads(self.record.intent.model_dump_json()),
        }

    async def scale(self, n: int) -> list[str]:
        """Add replicas (placed, started, reconciled, then listed: returns once they
        serve) or remove the newest (unlisted first, drained, then stopped)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        async with self._scale:
            live = [s for s in self.slots.values() if not s.removing]
            added = []
            for _ in range(n - len(live)):
                sid = self.record.next_slot
                self.record.next_slot += 1
                prefix = f"lora_ext/{self.fleet}"
                rec = SlotRecord(actor=f"{prefix}/replica-{sid}.0", group=f"{prefix}/group-{sid}")
                self.record.slots[sid] = rec
                self._save()
                added.append(self._tend(Slot(sid, rec)))
            doomed = sorted(live, key=lambda s: s.id)[n:] if n < len(live) else []
            await asyncio.gather(*(self._remove(s) for s in doomed))
        if added:
            await self._until_listed(added, self.restart_timeout_s)
        return self.urls()

    async def _until_listed(self, slots: list[Slot], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while True:  # (polled: listing is decided by the slots' own tasks)
                if all(s.listed for s in slots):
                    return
                await asyncio.sleep(0.2)

    async def _remove(self, slot: Slot) -> None:
        slot.removing, slot.listed, slot.state = True, False, "draining"
        if slot.task is not None:
            slot.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await slot.task
        if slot.url is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.drain_timeout_s):
                    while True:  # (the replica's state, polled over HTTP)
                        if not await self._in_flight(slot.url):
                            break
                        await asyncio.sleep(0.5)
        await self._stop(slot)
        with contextlib.suppress(Exception):
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(slot.group or ray.util.get_placement_group(slot.record.group))
        self.slots.pop(slot.id, None)
        self.record.slots.pop(slot.id, None)
        self._save()

    async def _in_flight(self, url: str) -> int:
        try:
            r = await self._http().get(f"{url}/skyrl/v1/loras", timeout=10)
            return sum(a["in_flight"] + a["held"] for a in r.json()["adapters"])
        except (httpx.HTTPError, KeyError, ValueError):
            return 0  # not answering: nothing to wait for

    # ---- control calls: intent first, then the fan-out ---------------------------------
    async def control(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A controller's call: recorded in the desired state (ops of :data:`INTENT_OPS`
        on one adapter), then sent to every listed replica. A load is tried on one
        replica first: refused there (a bad path, an older version), nothing is recorded
        and ``{"error": {...}}`` says why. A replica that fails the call is unlisted
        until the checks converge it; ``reconciling`` names it."""
        async with self._control:
            name = payload.get("lora_name")
            if name is not None and op in INTENT_OPS:
                await self._adopt_unrecorded(name)
            intent = self.record.intent
            body = dict(payload)
            try:
                if name is None or op not in INTENT_OPS:
                    new = intent  # the global pause/resume: the engine's, not recorded
                elif op == "load_lora_adapter":
                    version = payload.get("version") or intent.next_version(name)
                    body["version"] = version
                    new = intent.load(name, payload["lora_path"], version, bool(payload.get("pin")))
                elif op == "unload_lora_adapter":
                    new = intent.unload(name, payload.get("version"))
                elif op == "pause":
                    new = intent.pause(name, payload.get("mode") or "keep")
                elif op == "resume":
                    new = intent.pause(name, None)
                else:
                    new = intent.pin(name, payload["version"], payload.get("pinned", True))
            except KeyError as e:
                return _refused(404, str(e.args[0] if e.args else e))
            except ValueError as e:
                return _refused(409, str(e))
            targets = [s for _, s in sorted(self.slots.items()) if s.listed and s.url]
            results: dict[str, Any] = {}
            reconciling: dict[str, str] = {}
            if op == "load_lora_adapter" and targets:
                first = targets.pop(0)
                status, answer = await self._send(first, op, body)
                if 400 <= status < 500:
                    return _refused(status, _message(answer))
                self._sent(first, status, answer, results, reconciling)
            if new is not intent:
                self.record.intent = new
                self._save()
            sent = await asyncio.gather(*(self._send(s, op, body) for s in targets))
            for slot, (status, answer) in zip(targets, sent, strict=True):
                self._sent(slot, status, answer, results, reconciling)
            return {"results": results, "reconciling": reconciling, "version": body.get("version")}

    async def _adopt_unrecorded(self, name: str) -> None:
        """A name no controller recorded but the replicas serve (given at start with
        ``--lora-modules``): recorded as the first listed replica serves it."""
        intent = self.record.intent
        if name in intent.names or name in intent.unloaded:  # known, or unloaded on purpose
            return
        for slot in [s for _, s in sorted(self.slots.items()) if s.listed and s.url]:
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                entry = (await _adapters(self._http(), slot.url)).get(name)
                if entry is not None:
                    self.record.intent = intent.adopt(name, entry)
                    self._save()
                return

    async def _send(self, slot: Slot, op: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with slot.lock:
            try:
                r = await self._http().post(f"{slot.url}/skyrl/v1/{op}", json=body)
            except httpx.HTTPError as e:
                return 599, f"unreachable ({type(e).__name__}: {e})"
            try:
                return r.status_code, r.json()
            except ValueError:
                return r.status_code, r.text[:300]

    def _sent(self, slot: Slot, status: int, answer: Any, results: dict, reconciling: dict) -> None:
        assert slot.url is not None
        if status == 200:
            results[slot.url] = answer
            return
        slot.listed, slot.state = False, "reconciling"
        slot.reason = f"{status}: {_message(answer)}"[:300]
        reconciling[slot.url] = slot.reason

    # ---- tending one slot ---------------------------------------------------------------
    def _tend(self, slot: Slot) -> Slot:
        self.slots[slot.id] = slot
        slot.task = asyncio.get_event_loop().create_task(self._tend_loop(slot))
        return slot

    async def _tend_loop(self, slot: Slot) -> None:
        """Bring the slot up (adopting a running replica), then probe and reconcile it
        every check; replace it after ``max_failed_probes`` failed probes. Failures back
        off exponentially; nothing here blocks another slot."""
        backoff = 1.0
        while True:
            try:
                if slot.url is None:
                    await self._bring_up(slot)
                    backoff = 1.0
                if await self._probe(slot):
                    slot.failed_probes = 0
                    await self._reconcile(slot)
                else:
                    slot.failed_probes += 1
                    if slot.failed_probes >= self.max_failed_probes:
                        self._note(slot, f"{slot.failed_probes} failed probes: replacing it")
                        await self._replace(slot)
                        continue
                await asyncio.sleep(self.check_every_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a slot's trouble must never end its supervision
                slot.state = "failed"
                self._note(slot, f"{type(e).__name__}: {e}")
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, self.backoff_max_s)

    async def _bring_up(self, slot: Slot) -> None:
        """Adopt the slot's running replica by name, else place and start a new one;
        bounded by ``restart_timeout_s`` (a start that does not serve in time is killed
        and the next try uses a fresh actor)."""
        if slot.group is None:
            try:
                slot.group = ray.util.get_placement_group(slot.record.group)
            except ValueError:
                slot.group = await asyncio.to_thread(
                    self.spec.placement_group, slot.record.group, self.placement_timeout_s
                )
        if slot.actor is None:
            try:
                slot.actor = ray.get_actor(slot.record.actor)
            except ValueError:
                slot.actor = self.spec.actor_in(slot.group, name=slot.record.actor)
        slot.state = "starting" if slot.restarts == 0 else "restarting"
        try:
            async with asyncio.timeout(self.restart_timeout_s):
                slot.url = await self.spec.start(slot.actor)
        except BaseException:
            await self._new_generation(slot)
            raise
        slot.state, slot.failed_probes = "reconciling", 0

    async def _probe(self, slot: Slot) -> bool:
        # (asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the
        # cancellation of a shutdown when the probe finishes at the same moment.)
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                return bool(await slot.actor.health.remote())
        except Exception:
            return False

    async def _reconcile(self, slot: Slot) -> None:
        """Converge the replica to the desired state; listed once it matches."""
        async with slot.lock:
            intent = self.record.intent
            assert slot.url is not None
            adapters = await _adapters(self._http(), slot.url)
            problems = []
            for route, body in plan(intent, adapters):
                r = await self._http().post(f"{slot.url}/skyrl/v1/{route}", json=body)
                if r.status_code >= 400:
                    problems.append(f"{route} {body}: {r.status_code} {r.text[:200]}")
            if problems:
                slot.listed, slot.state, slot.reason = False, "reconciling", problems[0][:300]
                self._note(slot, problems[0])
                return
            slot.unreachable = unreachable(intent, await _adapters(self._http(), slot.url))
            slot.state, slot.reason = "serving", None
            slot.listed = not slot.removing

    async def _replace(self, slot: Slot) -> None:
        slot.listed, slot.state, slot.url = False, "restarting", None
        slot.restarts += 1
        await self._new_generation(slot)

    async def _new_generation(self, slot: Slot) -> None:
        """Stop the slot's actor and name the next one (a dying actor keeps its name
        until Ray has reaped it)."""
        await self._stop(slot, graceful=False)
        gen = slot.record.generation + 1
        base = slot.record.actor.rsplit(".", 1)[0]
        slot.record = SlotRecord(actor=f"{base}.{gen}", group=slot.record.group, generation=gen)
        self.record.slots[slot.id] = slot.record
        self._save()

    async def _stop(self, slot: Slot, graceful: bool = True) -> None:
        actor, slot.actor, slot.url = slot.actor, None, None
        if actor is None:
            with contextlib.suppress(ValueError):
                actor = ray.get_actor(slot.record.actor)
        if actor is None:
            return
        if graceful:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(120):
                    await actor.shutdown.remote()
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)

    def _note(self, slot: Slot, what: str) -> None:
        slot.reason = what[:300]
        line = f"{time.strftime('%H:%M:%S')} replica {slot.id}: {what}"[:300]
        self.failures.append(line)
        logger.warning("lora_ext supervisor: %s", line)

    def _save(self) -> None:
        self.store.save(self.record)

    def _http(self) -> httpx.AsyncClient:
        if self._http_client is None:
            self._http_client = httpx.AsyncClient(timeout=60, headers=self._headers)
        return self._http_client

    async def shutdown(self) -> None:
        """Stop every replica, remove their groups and the fleet's record."""
        async with self._scale:
            await asyncio.gather(*(self._remove(s) for s in list(self.slots.values())))
        self.store.delete()
        if self._http_client is not None:
            await self._http_client.aclose()


def _refused(status: int, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message}}


def _message(answer: Any) -> str:
    if isinstance(answer, dict):
        err = answer.get("error", answer)
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    return str(answer)


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
    name: str = "lora_ext",
    **supervisor_kwargs: Any,
) -> tuple[Any, list[str]]:
    """A fleet of ``num_servers`` replicas under a supervisor; returns its handle and the
    URLs. The supervisor is the named detached actor ``name`` that Ray restarts when it
    dies (its replicas keep serving meanwhile; it re-adopts them); calling this again
    with the same name (another driver, in the same Ray namespace) returns the running
    fleet. It runs on the caller's node (the head, for a driver there): a node that
    leaves takes no supervisor with it. Stop it with :func:`stop_supervised`."""
    SupervisorSettings(**supervisor_kwargs)  # a bad setting fails here, not in the actor
    spec = ReplicaSpec.of(server_args, config, num_cpus, bind_all, env)
    here = ray.get_runtime_context().get_node_id()
    sup = SupervisorActor.options(
        name=name,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(spec, name, **supervisor_kwargs)
    return sup, ray.get(sup.start.remote(num_servers))


def stop_supervised(sup: Any, timeout_s: float = 600) -> None:
    """Stop the fleet (replicas, groups, record) and its supervisor."""
    try:
        ray.get(sup.shutdown.remote(), timeout=timeout_s)
    finally:
        ray.kill(sup, no_restart=True)


def follow(sup: Any, control_timeout_s: float = 600, **client_kwargs: Any) -> RemoteInferenceClient:
    """A client on the fleet: it follows the replica set as replicas restart (on a new
    port, or a new node), join or leave, and its control calls go through the
    supervisor, which records them before fanning them out (each bounded by
    ``control_timeout_s``; a call made while the supervisor restarts waits for it)."""

    async def urls() -> list[str]:
        return await asyncio.wrap_future(sup.urls.remote().future())

    async def control(op: str, payload: dict[str, Any]) -> dict[str, Any]:
        async with asyncio.timeout(control_timeout_s):
            return await asyncio.wrap_future(sup.control.remote(op, payload).future())

    return RemoteInferenceClient(
        ray.get(sup.urls.remote()), replica_source=urls, control=control, **client_kwargs
    )
