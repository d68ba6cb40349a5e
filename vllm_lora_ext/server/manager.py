"""The one object that owns the lora-aware behaviour of a server (``app.state.lora_ext``).

The routes call :meth:`LoraManager.load`, ``unload``, ``pin``, ``pause``, ``resume`` and
``abort``. Every request passes the :class:`~vllm_lora_ext.server.gate.Gate`; versions and
leases are counted in the :class:`~vllm_lora_ext.server.registry.Registry`; staged copies
and broadcast leases live in :class:`~vllm_lora_ext.server.staging.Staging`; the
:class:`~vllm_lora_ext.server.watcher.Watcher` follows broadcast roots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from vllm_lora_ext import broadcast
from vllm_lora_ext.compat import LoRARequest
from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.errors import AdapterBusyError, InvalidAdapterError, LoraExtError
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.gate import BASE_TENANT, Gate, lora_request_of
from vllm_lora_ext.server.registry import Interrupt, PauseMode, Registry, Version
from vllm_lora_ext.server.staging import Staging
from vllm_lora_ext.server.validation import check_adapter_dir, check_under_roots, model_module_names
from vllm_lora_ext.server.vllm_api import ServingModelsHooks
from vllm_lora_ext.server.watcher import Watcher

logger = logging.getLogger("vllm.lora_ext")


@dataclass(frozen=True)
class Loaded:
    """What one load did (the HTTP answer and the swap metrics)."""

    version: Version
    interrupted: int
    latency_ms: float
    timings_ms: dict[str, float]
    unchanged: bool = False  # the name already served this version from this path


class _Laps:
    """Where a load's time went: each lap from the previous mark, in milliseconds."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(self.laps.get(name, 0.0) + 1000 * (now - self._last), 3)
        self._last = now

    @property
    def total_ms(self) -> float:
        return 1000 * (time.monotonic() - self.started)


class _NameLocks:
    """One lock per adapter name, held only while an operation on that name runs, so
    names that come and go (or never existed) leave nothing behind."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(name, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[name]


class LoraManager:
    def __init__(self, engine: Any, config: LoraExtConfig, serving_models: Any = None) -> None:
        self.engine = engine
        self.config = config
        self.serving_models = serving_models
        self.registry = Registry(config.window, config.lora_id_base)
        self.gate = Gate(engine, self.registry, config, self._settle)
        lora_config = getattr(engine.vllm_config, "lora_config", None)
        self.max_lora_rank: int | None = getattr(lora_config, "max_lora_rank", None)
        self.model_modules = model_module_names(engine.model_config.model)
        self.staging = Staging(config, self._check)
        self.watcher = Watcher(self.load, config.watch, config.watch_interval_s)
        self.vllm_hooks = (
            ServingModelsHooks(self, serving_models)
            if serving_models is not None and config.manage_vllm_lora_routes
            else None
        )
        self._locks = _NameLocks()
        self._resolving = _NameLocks()
        self._removals: set[asyncio.Task] = set()

    def _check(self, path: str) -> dict:
        return check_adapter_dir(path, self.max_lora_rank, self.model_modules)

    # ---- life cycle ---------------------------------------------------------------
    def install(self) -> None:
        """Route the engine's requests through the gate (every OpenAI route uses it),
        and vLLM's own LoRA loads and unloads through this manager."""
        self.gate.install()
        if self.vllm_hooks is not None:
            self.vllm_hooks.install()
        metrics.STATE.sources.add(self)

    def resolving(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """One resolution of an unknown name (vLLM's resolver plugins) at a time."""
        return self._resolving.hold(name)

    async def adopt_static_adapters(self) -> None:
        """Take over adapters given by ``--lora-modules`` as their version 1."""
        if self.serving_models is None:
            return
        for name, req in list(self.serving_models.lora_requests.items()):
            await self.load(name, req.lora_path)
            await self.engine.remove_lora(req.lora_int_id)

    def start_watchers(self) -> None:
        self.watcher.start()

    async def shutdown(self) -> None:
        self.gate.close()  # held requests: 503; keep-stopped ones end partial
        await self.watcher.stop()
        for task in list(self._removals):
            task.cancel()
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        self.gate.uninstall()
        if self.vllm_hooks is not None:
            self.vllm_hooks.uninstall()
        metrics.STATE.sources.discard(self)
        await self.staging.close()

    def sizes(self) -> dict[str, int]:
        """Every piece of per-name or per-request state this server holds."""
        return {
            **self.registry.sizes(),
            **self.gate.sizes(),
            **self.staging.sizes(),
            "locks": len(self._locks) + len(self._resolving),
            "removals": len(self._removals),
            "published": len(self.serving_models.lora_requests) if self.serving_models else 0,
        }

    # ---- adapters -----------------------------------------------------------------
    async def load(
        self,
        name: str,
        path: str,
        interrupt: Interrupt | None = None,
        pin: bool = False,
        version: int | None = None,
        is_3d_lora_weight: bool = False,
    ) -> Loaded:
        """Load ``path`` as the new current version of ``name``. By default requests in
        flight finish on the version they started on; ``interrupt`` ends them partial
        (``abort``) or moves them onto the new version (``continue``). Loads of one name
        are serialized; the previous version serves until the new one is committed."""
        try:
            loaded = await self._load(name, path, interrupt, pin, version, is_3d_lora_weight)
        except BaseException as e:
            # Label only names we serve: refused input must not mint metric series.
            metrics.count_swap(name if name in self.registry else None, e)
            raise
        if not loaded.unchanged:
            metrics.count_swap(name, None, loaded.latency_ms)
        return loaded

    async def _load(
        self,
        name: str,
        path: str,
        interrupt: Interrupt | None,
        pin: bool,
        number: int | None,
        is_3d_lora_weight: bool,
    ) -> Loaded:
        if self.serving_models is not None and self.serving_models.is_base_model(name):
            raise LoraExtError(f"adapter name '{name}' collides with the base model name")
        if name == BASE_TENANT:  # it would share the base model's fair share and settings
            raise LoraExtError(f"adapter name '{name}' is the base model's tenant name")
        laps = _Laps()
        kind = await self._inspect(path)
        laps.lap("checks")
        async with self._locks.hold(name):
            laps.lap("lock")
            same = self._same_version(name, path, number)
            if same is not None:
                if pin and not same.pinned:
                    self.registry.pin(name, same.number, True)
                return Loaded(same, 0, laps.total_ms, laps.laps, unchanged=True)
            version = self.registry.new_version(name, path, number)
            version.is_3d_lora_weight = is_3d_lora_weight
            await self._bring_in(version, kind, laps)
            version.pinned = pin
            self.registry.commit(version)
            self._publish(name, version)
            interrupted = 0
            if interrupt is not None:
                interrupted = await self.gate.stop(self.registry.older_flights(name), interrupt)
            laps.lap("commit")
            latency_ms = laps.total_ms
            logger.info(
                "lora_ext load name=%s version=%d path=%s interrupt=%s interrupted=%d "
                "add_lora_ms=%.1f latency_ms=%.1f",
                name,
                version.number,
                path,
                interrupt,
                interrupted,
                version.add_lora_ms,
                latency_ms,
            )
        self._settle(name)
        return Loaded(version, interrupted, latency_ms, laps.laps)

    async def _inspect(self, path: str) -> broadcast.StepKind:
        """What ``path`` is (a broadcast step or a plain adapter directory), refused
        before any lock if it lies outside the roots or, plain, is no adapter."""
        try:
            await asyncio.to_thread(check_under_roots, path, self.config.lora_roots)
            kind = await asyncio.to_thread(broadcast.step_kind, path)
            if kind == "plain":
                await asyncio.to_thread(self.staging.check_source, path)
        except OSError as e:  # e.g. a name too long for the filesystem: bad input, not a 500
            raise InvalidAdapterError(f"cannot inspect lora_path '{path}': {e.strerror}") from e
        return kind

    async def _bring_in(self, version: Version, kind: broadcast.StepKind, laps: _Laps) -> None:
        """Stage ``version`` (a broadcast step once complete) and add it to the engine.
        On any failure or cancellation nothing is left: the engine forgets it, the copy
        and the step's lease go, and the error names the files or the engine's refusal."""
        staging: asyncio.Future[str] | None = None
        added = False
        try:
            manifest = await self.staging.await_step(version) if kind != "plain" else None
            laps.lap("step")
            staging = self.staging.run(self.staging.stage, version, manifest)
            # Shielded: a cancelled load still learns where its copy went.
            version.load_path = await asyncio.shield(staging)
            laps.lap("stage")
            added = True
            await self.engine.add_lora(lora_request_of(version))
            laps.lap("add_lora")
            version.add_lora_ms = laps.laps["add_lora"]
        except BaseException as e:
            if staging is not None and version.load_path == version.path:
                with contextlib.suppress(BaseException):
                    version.load_path = await staging
            if added:
                await asyncio.shield(self._forget_in_engine(version))
            await self.staging.run(self.staging.discard, version)
            if isinstance(e, LoraExtError) or not isinstance(e, Exception):
                raise
            what = "engine refused adapter" if added else "cannot read adapter"
            raise InvalidAdapterError(f"{what} '{version.name}' from '{version.path}': {e}") from e

    def _same_version(self, name: str, path: str, number: int | None) -> Version | None:
        """The current version when a load asks for it again from the same path (a
        retry or a reconciliation: nothing to do); a different path under the same
        number is a conflict (a version's weights never change)."""
        if number is None or name not in self.registry:
            return None
        current = self.registry.get(name).current_version
        if current.number != number:
            return None
        if current.path != path:
            raise LoraExtError(
                f"version {number} of '{name}' is already loaded from '{current.path}': a "
                "version's weights never change, load a new version",
                status=409,
            )
        return current

    async def pin(self, name: str, number: int, pinned: bool) -> Version:
        """Keep ``name@number`` resident whatever the window, or release that pin."""
        self.registry.get(name)  # unknown names take no lock
        async with self._locks.hold(name):
            version = self.registry.pin(name, number, pinned)
        self._settle(name)
        return version

    async def unload(self, name: str, number: int | None) -> list[int]:
        """Unload ``name`` (or one of its versions): no new request can use it; each
        version leaves the engine once its last request ended. Unloading a name ends its
        pause: held requests get a 404 at once, keep-stopped ones end partial."""
        self.registry.get(name)
        async with self._locks.hold(name):
            marked = self.registry.unload(name, number)
            if number is None:
                self._unpublish(name)
            self._unpublish(*(v.internal_name for v in marked))
        self.gate.pulse(name)
        self._settle(name)
        return [v.number for v in marked]

    def _settle(self, name: str) -> None:
        """Evict the versions of ``name`` that may leave now, dropped from the registry
        before the engine removes them (no request can lease one meanwhile; nothing
        awaits between choosing and dropping), and forget the name once it is gone."""
        versions = self.registry.evictable(name)
        for v in versions:
            self.registry.drop(v)
            self._unpublish(v.internal_name)
        if versions:
            task = asyncio.get_running_loop().create_task(self._remove_from_engine(versions))
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)
            metrics.prune_vllm_lora_info()
        if self.registry.tidy(name):
            self.gate.pulse(name)
            if self.gate.share is not None:
                self.gate.share.forget(name)  # its counter and gauges go with the name
            metrics.forget(name)

    async def _remove_from_engine(self, versions: list[Version]) -> None:
        for v in versions:
            try:
                await self.engine.remove_lora(v.lora_int_id)
            except Exception:
                logger.exception("lora_ext failed to remove %s from the engine", v.internal_name)
            await self.staging.run(self.staging.discard, v)

    async def _forget_in_engine(self, version: Version) -> None:
        with contextlib.suppress(Exception):  # it may never have got there
            await self.engine.remove_lora(version.lora_int_id)

    def _publish(self, name: str, version: Version) -> None:
        """Names the OpenAI routes resolve: ``name`` (the newest version) and
        ``name@N`` (that version, while resident). The gate replaces either with the
        version the request is leased to."""
        if self.serving_models is None:
            return
        models = self.serving_models.lora_requests
        models[name] = LoRARequest(
            lora_name=name, lora_int_id=version.lora_int_id, lora_path=version.path
        )
        models[version.internal_name] = lora_request_of(version)

    def _unpublish(self, *names: str) -> None:
        if self.serving_models is not None:
            for n in names:
                self.serving_models.lora_requests.pop(n, None)

    # ---- pause / resume / abort -----------------------------------------------------
    async def pause(self, name: str | None, mode: PauseMode, timeout_s: float | None) -> dict:
        if name is None:
            await self.engine.pause_generation(mode=mode)
            return {"lora_name": None, "paused": True, "mode": mode}
        adapter = self.registry.get(name)
        before = self.registry.pause(name, mode)
        flights, waiters = self.registry.requests(name)
        result: dict[str, Any] = {"lora_name": name, "paused": True, "mode": mode}
        if mode == "abort":
            result["interrupted"] = await self.gate.stop(flights, "abort", waiters, adapter)
        elif mode == "keep":
            result["interrupted"] = await self.gate.stop(flights, "continue", sweep=adapter)
        else:
            bound = timeout_s or self.config.drain_timeout_s
            if not await self.gate.drain(name, bound):
                left = len(adapter.flights)
                if self.registry.entry(name) is adapter and adapter.pause_mode == "wait":
                    # A failed pause leaves the adapter as it was: serving, or paused by
                    # another caller (e.g. keep) before this one.
                    self.registry.pause(name, before)
                    self.gate.pulse(name)
                raise AdapterBusyError(
                    f"adapter '{name}' still had {left} request(s) in flight after "
                    f"{bound}s; pause undone",
                    status=409,
                )
        return result

    def resume(self, name: str) -> dict:
        self.registry.resume(name)
        self.gate.pulse(name)
        return {"lora_name": name, "paused": False}

    async def resume_global(self) -> dict:
        await self.engine.resume_generation()
        return {"lora_name": None, "paused": False}

    async def pause_everything(self) -> None:
        """AReaL's pause: hold every new request (any model), then vLLM's global
        abort pause with the prefix cache cleared ends everything running. Requests held
        by a per-adapter pause stay held. A failed pause holds nothing."""
        self.gate.hold_all()
        try:
            await self.engine.pause_generation(mode="abort", clear_cache=True)
        except BaseException:
            self.gate.release_all()
            raise

    async def continue_everything(self) -> None:
        """AReaL's continue: vLLM's resume, then the held requests go on."""
        await self.engine.resume_generation()
        self.gate.release_all()

    async def abort(self, name: str) -> int:
        """End every request of ``name`` now, partial (held ones too); their number."""
        adapter = self.registry.get(name)
        flights, waiters = self.registry.requests(name)
        return await self.gate.stop(flights, "abort", waiters, adapter)

    async def abort_everything(self) -> int:
        """End every request now: ours wherever they are (held, between segments,
        running), and every other request the engine holds (base model, foreign)."""
        stopped = 0
        for name in self.registry.names():
            flights, waiters = self.registry.requests(name)
            stopped += await self.gate.stop(flights, "abort", waiters, self.registry.get(name))
        op = self.engine.output_processor
        rest = [*op.request_states, *op.parent_requests]  # children before their parents
        if rest:
            await self.gate.engine_abort(rest, internal=True)
        return stopped + len(rest)

    def snapshot(self) -> list[dict]:
        return self.registry.snapshot()

    # ---- the fair share -------------------------------------------------------------
    def tenants(self) -> dict[str, dict]:
        """Per tenant seen: weight, cap, sequences running, requests queued, tokens
        received (empty with the fair share off)."""
        share = self.gate.share
        return share.snapshot() if share is not None else {}

    def configure_tenant(
        self, tenant: str, weight: float | None = None, max_in_flight: int | bool | None = False
    ) -> dict:
        """Set a tenant's weight and/or cap at run time (``max_in_flight=None`` lifts
        the cap); the tenant need not exist yet."""
        share = self.gate.share
        if share is None:
            raise LoraExtError("the fair share is off on this server (fair_share=false)", 409)
        try:
            self.gate.wake(share.configure(tenant, weight, max_in_flight))
        except ValueError as e:
            raise LoraExtError(str(e), 400) from None
        w, cap = share.settings(tenant)
        return {"tenant": tenant, "weight": w, "max_in_flight": cap}
