"""The one object that owns the lora-aware behaviour of a server.

It wraps the engine client's ``generate`` so that every request naming one of our
adapters is (1) held while its adapter is paused, (2) leased to one adapter version for
its whole life, (3) continued server-side when a ``keep`` pause stopped it, and (4)
released on every exit path. The routes call :meth:`load`, :meth:`pause`,
:meth:`resume` and :meth:`abort`; the bookkeeping itself lives in ``registry.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from vllm.exceptions import GracefulHTTPError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams
from vllm.utils.async_utils import merge_async_iterators

from vllm_lora_ext import broadcast
from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.errors import AdapterBusyError, InvalidAdapterError, LoraExtError
from vllm_lora_ext.server import metrics
from vllm_lora_ext.server.attribution import SpanBook
from vllm_lora_ext.server.continuation import Stitcher
from vllm_lora_ext.server.registry import (
    Flight,
    Interrupt,
    PauseMode,
    Registry,
    Version,
    split_pinned,
)
from vllm_lora_ext.server.validation import check_adapter_dir, check_under_roots, model_module_names

logger = logging.getLogger("vllm.lora_ext")

_POLL_S = 0.02


@dataclass(frozen=True)
class Loaded:
    """What one load did (the HTTP answer and the swap metrics)."""

    version: Version
    interrupted: int
    latency_ms: float


def lora_request_of(version: Version) -> LoRARequest:
    """The engine-side request of one version: its own name and id, never shared."""
    return LoRARequest(
        lora_name=version.internal_name,
        lora_int_id=version.lora_int_id,
        lora_path=version.load_path,
    )


class LoraManager:
    def __init__(self, engine: Any, config: LoraExtConfig, serving_models: Any = None) -> None:
        self.engine = engine
        self.config = config
        self.serving_models = serving_models
        self.registry = Registry(config.window, config.lora_id_base)
        self.spans = SpanBook()
        lora_config = getattr(engine.vllm_config, "lora_config", None)
        self.max_lora_rank: int | None = getattr(lora_config, "max_lora_rank", None)
        self.model_modules = model_module_names(engine.model_config.model)
        self._inner_generate = engine.generate
        self._load_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._resumed: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task] = set()
        self._installed = False
        self._closed = False
        self._leases: dict[int, Path] = {}  # lora_int_id -> lease on its broadcast step
        self._holder = f"{socket.gethostname()}-{os.getpid()}"
        self._own_stage = config.stage_adapters and config.stage_dir is None
        self._stage: Path | None = None
        if config.stage_adapters:
            root = config.stage_dir or Path(tempfile.mkdtemp(prefix="lora_ext_stage_"))
            root.mkdir(parents=True, exist_ok=True)
            self._stage = root

    # ---- life cycle ---------------------------------------------------------------
    def install(self) -> None:
        """Route the engine client's ``generate`` (used by every OpenAI route) through us."""
        if not self._installed:
            self.engine.generate = self.generate
            self._installed = True
            metrics.STATE.sources.add(self)

    async def adopt_static_adapters(self) -> None:
        """Take over adapters given by ``--lora-modules`` as their version 1."""
        if self.serving_models is None:
            return
        for name, req in list(self.serving_models.lora_requests.items()):
            await self.load(name, req.lora_path)
            await self.engine.remove_lora(req.lora_int_id)

    async def shutdown(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._installed:
            self.engine.generate = self._inner_generate
            self._installed = False
        metrics.STATE.sources.discard(self)
        for event in self._resumed.values():
            event.set()  # wake held requests: they end with a 503 (see _wait_unpaused)
        if self._own_stage and self._stage is not None:
            await asyncio.to_thread(shutil.rmtree, self._stage, True)
        for lease in self._leases.values():
            broadcast.release_lease(lease)
        self._leases.clear()

    def start_watchers(self) -> None:
        """Follow each configured broadcast root (``watch``) for new stable steps."""
        for name, root in self.config.watch.items():
            self._spawn(self._watch(name, Path(root)))

    async def _watch(self, name: str, root: Path) -> None:
        """Swap in the newest stable step of ``root`` under ``name`` (zero-stall)."""
        seen: int | None = None
        while not self._closed:
            newest = await asyncio.to_thread(broadcast.newest_stable, root, seen)
            if newest is not None:
                step = broadcast.step_of(newest)
                try:
                    loaded = await self.load(name, str(newest))
                except broadcast.NotReadyError as e:  # try again next round
                    logger.warning("lora_ext watch name=%s step=%s not ready: %s", name, step, e)
                except LoraExtError as e:  # a bad step: skip it, wait for the next
                    seen = step
                    logger.error("lora_ext watch name=%s step=%s refused: %s", name, step, e)
                else:
                    seen = step
                    logger.info(
                        "lora_ext watch swap name=%s step=%s version=%d latency_ms=%.1f",
                        name,
                        step,
                        loaded.version.number,
                        loaded.latency_ms,
                    )
            await asyncio.sleep(self.config.watch_interval_s)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- adapters -----------------------------------------------------------------
    async def load(
        self, name: str, path: str, interrupt: Interrupt | None = None, pin: bool = False
    ) -> Loaded:
        """Load ``path`` as the new current version of ``name``. By default requests in
        flight finish on the version they started on; ``interrupt`` ends them partial
        (``abort``) or moves them onto the new version (``continue``). Loads of one name
        are serialized; the previous version serves until the new one is committed."""
        try:
            loaded = await self._load(name, path, interrupt, pin)
        except BaseException as e:
            # Label only names we serve: refused input must not mint metric series.
            label = name if name in self.registry else "<unknown>"
            outcome = (
                "not_ready"
                if isinstance(e, broadcast.NotReadyError)
                else "corrupt"
                if isinstance(e, broadcast.CorruptStepError)
                else "refused"
                if isinstance(e, LoraExtError)
                else "error"
            )
            metrics.SWAPS.labels(label, outcome).inc()
            raise
        metrics.SWAPS.labels(name, "ok").inc()
        metrics.SWAP_LATENCY.labels(name).observe(loaded.latency_ms / 1000)
        return loaded

    async def _load(self, name: str, path: str, interrupt: Interrupt | None, pin: bool) -> Loaded:
        if self.serving_models is not None and self.serving_models.is_base_model(name):
            raise LoraExtError(f"adapter name '{name}' collides with the base model name")
        try:
            await asyncio.to_thread(check_under_roots, path, self.config.lora_roots)
            stepped = await asyncio.to_thread(broadcast.is_broadcast_step, path)
            if not stepped:  # fail fast, before taking the name's lock
                await asyncio.to_thread(
                    check_adapter_dir, path, self.max_lora_rank, self.model_modules
                )
        except OSError as e:  # e.g. a name too long for the filesystem: bad input, not a 500
            raise InvalidAdapterError(f"cannot inspect lora_path '{path}': {e.strerror}") from e
        async with self._load_locks[name]:
            started = time.monotonic()
            version = self.registry.new_version(name, path)
            added = False
            try:
                manifest = await self._await_stable(version) if stepped else None
                version.load_path = await asyncio.to_thread(self._stage_copy, version, manifest)
                t_add = time.monotonic()
                added = True
                await self.engine.add_lora(lora_request_of(version))
                version.add_lora_ms = 1000 * (time.monotonic() - t_add)
            except BaseException as e:  # refused, failed or cancelled: nothing changes
                if added:
                    await asyncio.shield(self._forget_in_engine(version))
                await asyncio.to_thread(self._unstage, version)
                if isinstance(e, LoraExtError) or not isinstance(e, Exception):
                    raise
                if not added:  # the files, not the engine (e.g. leasing the step failed)
                    raise InvalidAdapterError(f"cannot read lora_path '{path}': {e}") from e
                raise InvalidAdapterError(
                    f"engine refused adapter '{name}' from '{path}': {e}"
                ) from e
            version.pinned = pin
            retire = self.registry.commit(version)
            self._resumed.setdefault(name, _set_event())
            self._publish(name, version)
            interrupted = 0
            if interrupt is not None:
                interrupted = await self._interrupt(self.registry.interrupt_older(name, interrupt))
            latency_ms = 1000 * (time.monotonic() - started)
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
        self._retire(retire)
        return Loaded(version, interrupted, latency_ms)

    async def _await_stable(self, version: Version) -> dict:
        """Lease a broadcast step, then wait (bounded, with backoff) until its sentinel
        and manifest-verified files are visible. Errors name what is missing."""
        deadline = time.monotonic() + self.config.stable_wait_s
        delay = 0.02
        while True:
            try:
                await self._take_lease(version)  # (again: the step may have been replaced)
                return await asyncio.to_thread(broadcast.verify_step, version.path)
            except (broadcast.NotReadyError, broadcast.CorruptStepError) as e:
                if time.monotonic() + delay > deadline:
                    self._drop_lease(version)
                    e.message = f"{e.message} (waited {self.config.stable_wait_s}s)"
                    raise
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    async def _take_lease(self, version: Version) -> None:
        holder = f"{self._holder}-{version.internal_name}-{version.lora_int_id}"
        try:
            lease = await asyncio.to_thread(broadcast.acquire_lease, version.path, holder)
        except PermissionError as e:  # a read-only root: the staged copy still protects us
            logger.warning("lora_ext cannot lease %s: %s", version.path, e)
            return
        first = not self._leases
        self._leases[version.lora_int_id] = lease
        if first:
            self._spawn(self._refresh_leases())

    def _drop_lease(self, version: Version) -> None:
        lease = self._leases.pop(version.lora_int_id, None)
        if lease is not None:
            broadcast.release_lease(lease)

    async def _refresh_leases(self) -> None:
        while self._leases and not self._closed:
            await asyncio.to_thread(broadcast.refresh_leases, list(self._leases.values()))
            await asyncio.sleep(self.config.lease_ttl_s / 3)

    def _stage_copy(self, version: Version, manifest: dict | None) -> str:
        """Copy the adapter files the server will load from (see ``stage_adapters``),
        and check the copy: what is loaded is what was checked."""
        if self._stage is None:
            if manifest is not None:  # a step skipped the early check (it had to wait)
                check_adapter_dir(version.path, self.max_lora_rank, self.model_modules)
            return version.path
        dest = self._stage / str(version.lora_int_id)
        shutil.rmtree(dest, ignore_errors=True)
        try:
            shutil.copytree(version.path, dest, ignore=shutil.ignore_patterns(".*"))
            if manifest is not None:
                broadcast.verify_copy(dest, manifest)
            check_adapter_dir(str(dest), self.max_lora_rank, self.model_modules)
        except OSError as e:
            shutil.rmtree(dest, ignore_errors=True)
            raise InvalidAdapterError(
                f"cannot read adapter '{version.name}' from '{version.path}': {e}"
            ) from e
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return str(dest)

    def _unstage(self, version: Version) -> None:
        """Delete the staged copy and release the broadcast lease of a version."""
        if self._stage is not None and version.load_path != version.path:
            shutil.rmtree(version.load_path, ignore_errors=True)
        self._drop_lease(version)

    async def pin(self, name: str, number: int, pinned: bool) -> Version:
        """Keep ``name@number`` resident whatever the window, or release that pin."""
        async with self._load_locks[name]:
            retire = self.registry.pin(name, number, pinned)
            version = self.registry.resident(name, number)
        self._retire(retire)
        return version

    def _publish(self, name: str, version: Version) -> None:
        """Names the OpenAI routes resolve: ``name`` (the newest version) and
        ``name@N`` (that version, while resident). The wrapped generate replaces either
        with the version the request is leased to."""
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

    async def unload(self, name: str, number: int | None) -> list[int]:
        """Retire ``name`` (or one of its versions): no new request can use it; each
        version leaves the engine once its last request ended. Returns the versions
        marked."""
        async with self._load_locks[name]:
            adapter = self.registry.get(name)
            retire = self.registry.retire(name, number)
            marked = [v for n, v in sorted(adapter.versions.items()) if number in (None, n)]
            if number is None:
                self._unpublish(name)
            self._unpublish(*(v.internal_name for v in marked))
        self._retire(retire)
        return [v.number for v in marked]

    async def _forget_in_engine(self, version: Version) -> None:
        try:
            await self.engine.remove_lora(version.lora_int_id)
        except Exception:  # it was never there
            pass

    def _retire(self, versions: Iterable[Version]) -> None:
        """Remove retirable versions (idle, and unloaded or outside the window); dropped
        from the registry first, so no request can lease one while the engine drops it."""
        versions = list(versions)
        for v in versions:
            self.registry.drop(v)
            self._unpublish(v.internal_name)
        if versions:
            self._spawn(self._remove_from_engine(versions))

    async def _remove_from_engine(self, versions: list[Version]) -> None:
        for v in versions:
            try:
                await self.engine.remove_lora(v.lora_int_id)
            except Exception:
                logger.exception("lora_ext failed to remove %s from the engine", v.internal_name)
            await asyncio.to_thread(self._unstage, v)

    # ---- pause / resume / abort -----------------------------------------------------
    async def pause(self, name: str | None, mode: PauseMode, timeout_s: float | None) -> dict:
        if name is None:
            await self.engine.pause_generation(mode=mode)
            return {"lora_name": None, "paused": True, "mode": mode}
        flights = self.registry.pause(name, mode)
        self._resumed[name].clear()
        result: dict[str, Any] = {"lora_name": name, "paused": True, "mode": mode}
        if mode in ("abort", "keep"):
            result["interrupted"] = await self._interrupt(flights)
        else:
            deadline = time.monotonic() + (timeout_s or self.config.drain_timeout_s)
            while self.registry.in_flight(name):
                if time.monotonic() > deadline:
                    left = self.registry.in_flight(name)
                    self.resume(name)  # a failed pause leaves the adapter serving
                    raise AdapterBusyError(
                        f"adapter '{name}' still had {left} request(s) in flight after "
                        f"{timeout_s or self.config.drain_timeout_s}s; pause undone",
                        status=409,
                    )
                await asyncio.sleep(_POLL_S)
        return result

    def resume(self, name: str | None) -> dict:
        self.registry.resume(name)
        self._resumed[name].set()
        return {"lora_name": name, "paused": False}

    async def resume_global(self) -> dict:
        await self.engine.resume_generation()
        return {"lora_name": None, "paused": False}

    async def abort(self, name: str) -> int:
        """Abort every in-flight request of ``name``; returns their number."""
        flights = list(self.registry.get(name).flights.values())
        for flight in flights:
            flight.interrupt = "abort"
        return await self._interrupt(flights)

    async def _interrupt(self, flights: list[Flight]) -> int:
        """Stop the running engine segments of ``flights`` (already marked with how to
        end). A segment not yet in the engine stops itself on its first output (see
        :meth:`_run`). Returns the number of requests."""
        ids = [seg for f in flights for seg in f.segments]
        for f in flights:
            metrics.INTERRUPTED.labels(f.name, f.interrupt or "abort").inc()
        if ids:
            await self.engine.abort(ids)
        return len(flights)

    def snapshot(self) -> list[dict]:
        return self.registry.snapshot()

    # ---- the wrapped generate -----------------------------------------------------------
    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        lora_request: LoRARequest | None = None,
        **kwargs: Any,
    ) -> AsyncGenerator[RequestOutput, None]:
        name = self.registry.owner_of(lora_request.lora_name) if lora_request else None
        number = split_pinned(lora_request.lora_name)[1] if name is not None else None
        if name is None:  # base model, or an adapter we do not manage
            async for out in self._inner_generate(
                prompt, sampling_params, request_id, lora_request=lora_request, **kwargs
            ):
                yield out
            return
        try:
            await self._hold(name)
            flight = self.registry.admit(name, request_id, number)
        except LoraExtError as e:  # e.g. unloaded while the request was on its way
            raise GracefulHTTPError(e.message, HTTPStatus(e.status)) from e
        try:
            async for out in self._run(flight, prompt, sampling_params, request_id, kwargs):
                yield out
        finally:
            self.spans.finish(request_id)
            self._retire(self.registry.release(flight))

    async def _hold(self, name: str) -> None:
        """Hold a new request while its adapter is paused (bounded, then 503)."""
        adapter = self.registry.get(name)
        if not adapter.paused:
            return
        adapter.held += 1
        try:
            await asyncio.wait_for(self._wait_unpaused(name), self.config.hold_timeout_s)
        except TimeoutError:
            raise GracefulHTTPError(
                f"adapter '{name}' is paused and was not resumed within "
                f"{self.config.hold_timeout_s}s",
                HTTPStatus.SERVICE_UNAVAILABLE,
            ) from None
        finally:
            adapter.held -= 1

    async def _wait_unpaused(self, name: str) -> None:
        while self.registry.get(name).paused:
            if self._closed:
                raise GracefulHTTPError("server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
            await self._resumed[name].wait()

    async def _wait_for_resume(self, flight: Flight) -> bool:
        """Wait until the flight's adapter is resumed; False if aborted or timed out."""
        deadline = time.monotonic() + self.config.resume_timeout_s
        event = self._resumed[flight.name]
        while flight.interrupt == "continue":
            if flight.name not in self.registry:  # unloaded meanwhile: end it partial
                return False
            if not self.registry.get(flight.name).paused:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(event.wait(), min(left, 0.25))
            except TimeoutError:
                pass
        return False

    async def _run(
        self, flight: Flight, prompt: Any, params: SamplingParams, request_id: str, kwargs: dict
    ) -> AsyncGenerator[RequestOutput, None]:
        stitcher = Stitcher(request_id, params)
        self.spans.track(request_id, stitcher.samples, flight.version.number)
        indices: list[int] | None = None  # None: the first segment, all samples
        cont_kwargs = {k: v for k, v in kwargs.items() if k != "prompt_text"}
        round_no = 0
        while True:
            version = flight.version
            lora = lora_request_of(version)
            if indices is None:
                seg_ids = [request_id]
                gens = [
                    self._inner_generate(prompt, params, request_id, lora_request=lora, **kwargs)
                ]
                stitcher.start_segment(list(range(params.n)))
            else:
                seg_ids = [f"{request_id}+c{round_no}.{g}" for g in indices]
                gens = [
                    self._inner_generate(
                        TokensPrompt(prompt_token_ids=stitcher.continuation_prompt(g)),
                        stitcher.continuation_params(params, g),
                        seg_id,
                        lora_request=lora,
                        **cont_kwargs,
                    )
                    for g, seg_id in zip(indices, seg_ids, strict=True)
                ]
                stitcher.start_segment(indices)
            flight.segments = seg_ids
            self_aborted: set[int] = set()
            async for i, out in merge_async_iterators(*gens):
                seen = stitcher.absorb(
                    out,
                    None if indices is None else indices[i],
                    version.number,
                    continuing=flight.interrupt == "continue",
                )
                if flight.interrupt is not None and not out.finished and i not in self_aborted:
                    # Admitted after the pause swept the engine: stop it ourselves.
                    self_aborted.add(i)
                    await self.engine.abort(seg_ids[i])
                if seen is not None:
                    yield seen
            indices = stitcher.to_continue()
            if not indices:
                return
            if not await self._wait_for_resume(flight):
                final = stitcher.give_up()
                if final is not None:
                    yield final
                return
            flight.interrupt = None
            metrics.CONTINUED.labels(flight.name).inc()
            self._retire(self.registry.rebind(flight))
            round_no += 1


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event
