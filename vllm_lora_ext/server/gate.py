"""The gate: the one place every request for one of our adapters passes.

It hooks three methods of vLLM's ``AsyncLLM`` (on the instance, so vLLM's own code calls
them too):

- ``generate`` (every OpenAI route, beam search, token-in/token-out): resolves the
  adapter, holds the request while its adapter is paused, leases one version for the
  request's whole life, runs it as one or more engine **segments** (continued server-side
  after a ``keep`` pause or a ``continue`` swap) and releases the lease on every exit
  path;
- ``add_request`` (where vLLM registers a request): refuses a request on one of our
  adapters that did not come through ``generate``. The gate registers its segments
  beneath the hook (and stops one whose request was interrupted while it was on its
  way in, input processing); the input processor's ``assign_request_id`` (where vLLM
  mints the internal id, before anything is registered) links each segment to its
  internal id and, for ``n > 1``, to its children's ids;
- ``abort`` (vLLM's abort routes, its disconnect handling): an abort by external or
  internal id also ends what the engine does not hold yet, held requests and requests
  between continuation segments.

Requests are stopped by their internal engine ids (``abort(ids, internal=True)``): an
external id is the caller's, may be shared by requests of several tenants (as in stock
vLLM), and is never used to stop anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any

from vllm_lora_ext import compat
from vllm_lora_ext.compat import (
    GracefulHTTPError,
    LoRARequest,
    RequestOutput,
    RequestOutputKind,
    SamplingParams,
    TokensPrompt,
    merge_async_iterators,
)
from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.errors import AdapterBusyError, LoraExtError
from vllm_lora_ext.server import attribution, metrics
from vllm_lora_ext.server.continuation import Stitcher
from vllm_lora_ext.server.fairshare import FairShare, Tenant, Ticket
from vllm_lora_ext.server.registry import (
    Adapter,
    Flight,
    Interrupt,
    Registry,
    Version,
    Waiter,
    split_version,
)

#: The base model's tenant name in the fair share (weights, caps, listings).
BASE_TENANT = "__base__"


def lora_request_of(version: Version) -> LoRARequest:
    """The engine-side request of one version: its own name and id, never shared with
    another version. Made once, when the version first goes to the engine (its load path
    is final by then), and used for its load, vLLM's model list and every request, as
    vLLM shares one per served adapter."""
    if version.engine_request is None:
        version.engine_request = LoRARequest(
            lora_name=version.internal_name,
            lora_int_id=version.lora_int_id,
            lora_path=version.load_path,
            is_3d_lora_weight=version.is_3d_lora_weight,
        )
    return version.engine_request


def http_error(e: LoraExtError) -> GracefulHTTPError:
    """How vLLM's OpenAI routes answer an error raised inside ``generate``."""
    return GracefulHTTPError(e.message, HTTPStatus(e.status))


class _Segment:
    """One engine request of a flight; linked to its internal id when vLLM registers it."""

    __slots__ = ("children", "flight", "internal_id")

    def __init__(self, flight: Flight) -> None:
        self.flight = flight
        self.internal_id: str | None = None
        self.children: tuple[str, ...] = ()  # n > 1: the per-sample requests


_SEGMENT: ContextVar[_Segment | None] = ContextVar("lora_ext_segment", default=None)


class Gate:
    def __init__(
        self,
        engine: Any,
        registry: Registry,
        config: LoraExtConfig,
        settle: Callable[[str], None],
    ) -> None:
        compat.check_engine(engine)
        self.engine = engine
        self.registry = registry
        self.config = config
        self._settle = settle  # evict what became idle, forget what is gone
        self._generate = engine.generate
        self._add_request = engine.add_request
        self._abort = engine.abort
        self._assign_request_id = engine.input_processor.assign_request_id
        self._by_segment: dict[str, Flight] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._all_held: asyncio.Event | None = None  # set (and dropped) by release_all
        self.share = fair_share_of(engine, config)
        # vLLM's priority policy orders its queue and picks whom to preempt by priority
        # across every request in the engine: under a fair share a tenant's priority
        # would reach past its own requests (one sending -10**9 is never preempted, the
        # others are). The gate orders each tenant's queue by it; the engine sees 0.
        scheduler = scheduler_config(engine)
        self._flat_priority = (
            self.share is not None and getattr(scheduler, "policy", None) == "priority"
        )
        self.closed = False
        self._installed = False

    # ---- life cycle ---------------------------------------------------------------
    def install(self) -> None:
        if not self._installed:
            self.engine.generate = self.generate
            self.engine.add_request = self.add_request
            self.engine.abort = self.abort
            self.engine.input_processor.assign_request_id = self._assign
            self._installed = True

    def close(self) -> None:
        """Wake every waiting request: held ones end with a 503, keep-stopped ones
        partial. The hooks stay until :meth:`uninstall` (requests still finish)."""
        self.closed = True
        self.release_all()
        for name in list(self._events):
            self.pulse(name)

    def uninstall(self) -> None:
        if self._installed:
            self.engine.generate = self._generate
            self.engine.add_request = self._add_request
            self.engine.abort = self._abort
            with contextlib.suppress(AttributeError):  # a class attribute: nothing to undo
                del self.engine.input_processor.assign_request_id
            self._installed = False

    def sizes(self) -> dict[str, int]:
        share = self.share
        return {
            "segments": len(self._by_segment),
            "events": len(self._events),
            "tenant_settings": share.settings_count() if share is not None else 0,
        }

    # ---- holding every request (an RL stack's global pause) -------------------------
    @property
    def holding_all(self) -> bool:
        return self._all_held is not None

    def hold_all(self) -> None:
        """Hold every new request, any model, and every continuation about to start,
        until :meth:`release_all` (AReaL's pause: its server holds, on every vLLM
        version, where vLLM 0.33's own global pause answers 503)."""
        if self._all_held is None:
            self._all_held = asyncio.Event()

    def release_all(self) -> None:
        event, self._all_held = self._all_held, None
        if event is not None:
            event.set()

    async def _wait_all_released(self) -> bool:
        """Whether the global hold is off (at once, or within ``hold_timeout_s``)."""
        event = self._all_held
        if event is None:
            return True
        try:
            async with asyncio.timeout(self.config.hold_timeout_s):
                await event.wait()
        except TimeoutError:
            return False
        return not self.closed

    # ---- the fair share -----------------------------------------------------------
    def _ask_share(
        self, tenant: str, slots: int, front: bool = False, priority: int = 0
    ) -> Ticket | None:
        """The tenant's claim on the engine, granted at once while there is room (then
        nothing to await: no coroutine on a request's way in); None without a fair
        share. A claim not granted waits in :meth:`_await_share`."""
        share = self.share
        if share is None:
            return None
        ticket = Ticket(tenant, slots if slots > 1 else 1, front=front, priority=priority)
        try:
            if not share.grant_now(ticket):  # (submit's first step, without its list)
                self._wake(share.submit(ticket, front))
        except ValueError as e:  # wider than the tenant's cap or the engine's batch
            raise http_error(LoraExtError(str(e), 400)) from None
        return ticket

    async def _await_share(self, ticket: Ticket, flight: Flight | None = None) -> Ticket | None:
        """Wait for the tenant's turn at the engine; None when the flight was
        interrupted or the server closes meanwhile (it then runs without a share and is
        stopped at once)."""
        share, tenant = self.share, ticket.tenant
        assert share is not None

        def ready() -> bool:
            stopped = flight is not None and (flight.released or flight.interrupt is not None)
            return ticket.granted or self.closed or stopped

        started = time.monotonic()
        try:
            async with asyncio.timeout(self.config.fair_share_wait_s):
                await self._wait(_share_key(tenant), ready)
        except TimeoutError:
            self._give_back(ticket)
            raise http_error(
                AdapterBusyError(
                    f"tenant '{tenant}' waited {self.config.fair_share_wait_s}s for its "
                    "share of the engine"
                )
            ) from None
        except BaseException:  # cancelled (a disconnect): out of the queue
            self._give_back(ticket)
            raise
        finally:
            metrics.SHARE_WAIT.labels(tenant).observe(time.monotonic() - started)
            if not share.queued(tenant):  # nobody of the tenant waits: no event to keep
                self._events.pop(_share_key(tenant), None)
        if not ticket.granted:
            self._give_back(ticket)
            return None
        return ticket

    def _account(self, tenant: str) -> Tenant | None:
        """The tenant's counter, to charge a flight's tokens to (it stays while the
        flight holds a share: a tenant with requests running is never dropped)."""
        return self.share.tenants.get(tenant) if self.share is not None else None

    def _give_back(self, ticket: Ticket | None) -> None:
        if ticket is not None and self.share is not None:
            self._wake(self.share.release(ticket))

    def wake(self, granted: list[Ticket]) -> None:
        """Tickets granted outside the gate (a weight or cap changed) start."""
        self._wake(granted)

    def _wake(self, granted: list[Ticket]) -> None:
        if not self._events:  # nobody waits (most grants: the request asking itself)
            return
        for ticket in granted:
            self._set(_share_key(ticket.tenant))

    # ---- waiting on adapter state -------------------------------------------------
    def pulse(self, name: str) -> None:
        """Something about ``name`` changed: its waiters re-check what they wait for
        (those waiting for the tenant's share too)."""
        if not self._events:  # nobody waits for anything (every request's end asks)
            return
        self._set(name)
        self._set(_share_key(name))

    def _set(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    async def _wait(self, name: str, ready: Callable[[], bool]) -> None:
        while True:
            event = self._events.get(name)
            if event is None:
                event = self._events[name] = asyncio.Event()
            if ready():  # checked after taking the event: no wake-up can be lost
                return
            await event.wait()

    async def drain(self, name: str, timeout_s: float) -> bool:
        """Until no request of ``name`` is in flight; False if that took over the bound."""

        def idle() -> bool:
            adapter = self.registry.entry(name)
            return adapter is None or not adapter.flights

        try:
            async with asyncio.timeout(timeout_s):
                await self._wait(name, idle)
        except TimeoutError:
            return False
        return True

    # ---- stopping requests --------------------------------------------------------
    async def engine_abort(self, ids: list[str], internal: bool) -> None:
        """vLLM's own abort, beneath the hook (marks nothing of ours)."""
        await self._abort(ids, internal=internal)

    async def stop(
        self,
        flights: list[Flight],
        how: Interrupt,
        waiters: list[Waiter] = (),  # type: ignore[assignment]
        sweep: Adapter | None = None,
    ) -> int:
        """End ``flights`` as ``how`` says (and ``waiters``, held requests, with an
        abort): mark them, wake them, and abort their engine requests by internal id.
        ``sweep`` also stops every engine request on that adapter's versions. Returns the
        number of requests stopped."""
        for f in flights:
            metrics.INTERRUPTED.labels(f.name, self.registry.mark(f, how)).inc()
        for w in waiters:
            w.aborted = True
        ids = {i for f in flights for i in f.segments}
        if sweep is not None:
            names = {v.internal_name for v in sweep.versions.values()}
            states = self.engine.output_processor.request_states
            ids |= {rid for rid, state in states.items() if state.lora_name in names}
        for name in {f.name for f in flights} | {w.name for w in waiters}:
            self.pulse(name)
        await self._abort_ids(ids)
        return len(flights) + len(waiters)

    async def _abort_ids(self, ids: set[str]) -> None:
        """vLLM's abort of internal ids, children before their parents (its
        ``abort_requests`` fails on ``list.remove`` when a parent comes first in one call
        while its children are still there)."""
        if ids:
            states = self.engine.output_processor.request_states
            await self._abort(sorted(ids, key=lambda i: (i not in states, i)), internal=True)

    # ---- the hooks ----------------------------------------------------------------
    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        lora_request: LoRARequest | None = None,
        **kwargs: Any,
    ) -> AsyncGenerator[RequestOutput, None]:
        priority = kwargs.get("priority") or 0
        if priority and self._flat_priority:
            kwargs["priority"] = 0  # (this call's own dict)
        if self._all_held is not None and not await self._wait_all_released():
            raise http_error(
                AdapterBusyError(
                    "the server is paused for a weight update (held "
                    f"{self.config.hold_timeout_s}s); retry"
                )
            )
        # Most requests: one of our names, served and not paused, leased at once.
        flight = (
            None
            if lora_request is None
            else self.registry.lease(lora_request.lora_name, request_id)
        )
        target = None if flight is not None else self._resolve(lora_request)
        if flight is None and target is None:  # base model, or an adapter we do not manage
            tenant = BASE_TENANT if lora_request is None else lora_request.lora_name
            ticket = self._ask_share(tenant, sampling_params.n, priority=priority)
            if ticket is not None and not ticket.granted:
                ticket = await self._await_share(ticket)
            try:
                meter, share = _Meter(sampling_params.output_kind), self.share
                async for out in self._generate(
                    prompt, sampling_params, request_id, lora_request=lora_request, **kwargs
                ):
                    if share is not None:
                        share.charge(tenant, meter.tokens(out))
                    yield out
            finally:
                self._give_back(ticket)
            return
        # vLLM's streaming input (as it tells it; a text or dict prompt skips the ABC check)
        if not isinstance(prompt, (str, dict)) and isinstance(prompt, AsyncGenerator):
            if flight is not None:
                self._release(flight)
            raise http_error(
                LoraExtError(
                    "streaming input is not served on managed adapters (a request is "
                    "continued from its prompt and tokens)",
                    status=400,
                )
            )
        if flight is None:
            assert target is not None
            flight = self._admit(*target, request_id) or await self._admit_held(*target, request_id)
        # The flight's share of the engine: given back while it is stopped between
        # segments, taken again (first in its tenant's queue) to continue.
        claim: list[Ticket | None] = [None]
        try:
            stitcher = Stitcher(request_id, sampling_params)
            book = attribution.current_book()
            if book is not None:
                book.track(request_id, stitcher.samples, flight.version.number)
            first = sampling_params
            if first.n > 1 and self.share is not None:
                widest = self.share.widest(flight.name)
                if first.n > widest:  # served in parts, each as wide as its share allows
                    first = sampling_params.clone()
                    first.n = widest
                    stitcher.defer(widest)
            claim[0] = self._ask_share(flight.name, first.n, priority=priority)
            if claim[0] is not None and not claim[0].granted:
                claim[0] = await self._await_share(claim[0], flight)
            # The first segment (every request has one; its samples are fresh, nothing to
            # start) runs here: vLLM's generate loop over the queue add_request returns,
            # without vLLM's generator or one of ours (each layer cost every streamed
            # token a hop and every request an allocation). The tenant is charged what
            # the stitcher counted (Tenant.charge without a call: its counter is derived
            # from the tokens).
            account = self._account(flight.name)
            number = flight.version.number
            seg, queue = _Segment(flight), None
            try:
                queue = await self._register(seg, prompt, first, request_id, kwargs)
                finished = False
                while not finished:  # vLLM's generate loop (its generator is not used)
                    out = queue.get_nowait() or await queue.get()
                    finished = out.finished
                    seen = stitcher.absorb(out, None, number, flight.interrupt == "continue")
                    if account is not None:
                        account.tokens += stitcher.added
                    if seen is not None:
                        yield seen
                self._unlink(seg)  # the engine finished it: nothing left to stop
            except Exception as e:  # answered as vLLM's generate answers it
                compat.raise_as_generate(e)
            finally:
                if queue is not None:
                    queue.close()
            if stitcher.stopped:  # continued until none is left stopped
                async with contextlib.aclosing(
                    self._continuations(
                        flight,
                        prompt,
                        sampling_params,
                        request_id,
                        kwargs,
                        stitcher,
                        claim,
                        priority,
                    )
                ) as outputs:
                    async for out in outputs:
                        yield out
        finally:
            self._give_back(claim[0])
            if flight.segments:
                await self._end(flight)
            else:  # nothing to stop (the common end: the engine finished it)
                self._release(flight)

    async def add_request(self, request_id: str, prompt: Any, params: Any, *args, **kwargs):
        """vLLM's, for anything but our adapters' versions (the gate registers its own
        segments beneath this hook, :meth:`_register`)."""
        lora = kwargs.get("lora_request", args[1] if len(args) > 1 else None)
        if lora is not None and self._is_ours(lora):
            raise http_error(
                LoraExtError(
                    f"adapter '{lora.lora_name}' is served only through generation "
                    "requests (model=<name> or <name>@<version>)",
                    status=400,
                )
            )
        return await self._add_request(request_id, prompt, params, *args, **kwargs)

    def _assign(self, request: Any) -> None:
        """vLLM's ``assign_request_id``, then the segment on its way in is linked to the
        internal id (and its children's), before vLLM registers or sends anything: an
        abort, a sweep or the end of the flight reaches it from then on, whatever
        interrupts the registration (a cancelled caller, a sweep between children)."""
        self._assign_request_id(request)
        seg = _SEGMENT.get()
        if seg is not None and seg.internal_id is None:
            params = getattr(request, "sampling_params", None)
            self._link(seg, request.request_id, getattr(params, "n", 1) or 1)

    async def abort(self, request_id: Any, internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        if internal:
            flights = list({self._by_segment[i] for i in ids if i in self._by_segment})
            waiters: list[Waiter] = []
        else:
            flights, waiters = self.registry.by_request_ids(ids)
        for f in flights:
            self.registry.mark(f, "abort")
        for w in waiters:
            w.aborted = True
        for name in {f.name for f in flights} | {w.name for w in waiters}:
            self.pulse(name)
        await self._abort(ids, internal=internal)

    # ---- admission ----------------------------------------------------------------
    def _is_ours(self, lora: LoRARequest) -> bool:
        return lora.lora_int_id >= self.config.lora_id_base or self.registry.known(
            split_version(lora.lora_name)[0]
        )

    def _resolve(self, lora: LoRARequest | None) -> tuple[str, int | None] | None:
        """(name, version or None) of one of our adapters; None for the base model or a
        foreign adapter; 404 for a name or version of ours that no longer serves."""
        if lora is None:
            return None
        name, number = split_version(lora.lora_name)
        if name in self.registry:
            return name, number
        if self._is_ours(lora):
            raise http_error(LoraExtError(f"adapter '{lora.lora_name}' is not served", 404))
        return None

    def _admit(self, name: str, number: int | None, request_id: str) -> Flight | None:
        """Lease the version now; None while the adapter is paused (the request is then
        held: :meth:`_admit_held`). Not a coroutine: most requests never wait here."""
        try:
            adapter = self.registry.get(name)
            if number is not None:
                self.registry.resident(name, number)  # fail fast, before any hold
            return None if adapter.paused else self.registry.admit(name, request_id, number)
        except LoraExtError as e:  # unknown, or that version is gone
            raise http_error(e) from None

    async def _admit_held(self, name: str, number: int | None, request_id: str) -> Flight:
        try:
            waiter = await self._hold(name, request_id)
            flight = self.registry.admit(name, request_id, number)  # no await since the hold
        except LoraExtError as e:  # unloaded meanwhile, held too long
            raise http_error(e) from None
        if waiter.aborted:
            self.registry.mark(flight, "abort")  # its first segment stops once registered
        return flight

    async def _hold(self, name: str, request_id: str) -> Waiter:
        """Hold a new request while its adapter is paused (bounded, then 503)."""
        waiter = self.registry.hold(name, request_id)

        def ready() -> bool:
            if self.closed or waiter.aborted or name not in self.registry:
                return True
            return not self.registry.get(name).paused

        try:
            async with asyncio.timeout(self.config.hold_timeout_s):
                await self._wait(name, ready)
        except TimeoutError:
            raise AdapterBusyError(
                f"adapter '{name}' is paused and was not resumed within "
                f"{self.config.hold_timeout_s}s"
            ) from None
        finally:
            self.registry.unhold(waiter)
            self._settle(name)
        if self.closed:
            raise AdapterBusyError("server is shutting down")
        return waiter

    async def _end(self, flight: Flight) -> None:
        """The flight is over (aborted, closed, cancelled, failed) with engine requests
        still linked to it: they are stopped before its lease goes, so its version cannot
        leave the engine under a running request. Shielded: a second cancellation cannot
        skip the abort."""
        try:
            await asyncio.shield(self._abort_ids(set(flight.segments)))
        finally:
            self._release(flight)

    def _release(self, flight: Flight) -> None:
        if self.registry.release(flight):
            for internal_id in flight.segments:
                self._by_segment.pop(internal_id, None)
            flight.segments.clear()
            self.pulse(flight.name)
            if flight.version.refcount == 0 and not self.registry.serving(flight.version):
                self._settle(flight.name)  # its version may leave now, or the name go

    # ---- segments -----------------------------------------------------------------
    def _link(self, seg: _Segment, internal_id: str, n: int) -> None:
        seg.internal_id = internal_id
        flight = seg.flight
        flight.segments.add(internal_id)
        self._by_segment[internal_id] = flight
        if n > 1:  # known before the parent exists and after an abort emptied it
            seg.children = tuple(compat.child_request_id(internal_id, i) for i in range(n))
            for rid in seg.children:
                flight.segments.add(rid)
                self._by_segment[rid] = flight

    def _unlink(self, seg: _Segment) -> None:
        rid, flight = seg.internal_id, seg.flight
        if rid is not None:
            flight.segments.discard(rid)
            self._by_segment.pop(rid, None)
        for rid in seg.children:
            flight.segments.discard(rid)
            self._by_segment.pop(rid, None)

    async def _register(
        self, seg: _Segment, prompt: Any, params: SamplingParams, request_id: str, kwargs: dict
    ) -> Any:
        """vLLM's ``add_request`` of one segment on its flight's version; returns the
        queue vLLM puts the segment's outputs in (its ``RequestOutputCollector``). The
        segment is in the context variable meanwhile: :meth:`_assign` links it to the
        flight when vLLM mints its id."""
        lora = lora_request_of(seg.flight.version)
        token = _SEGMENT.set(seg)
        try:
            queue = await self._add_request(request_id, prompt, params, lora_request=lora, **kwargs)
        finally:
            _SEGMENT.reset(token)
        if seg.flight.interrupt is not None or seg.flight.released:
            # Stopped while it was on its way in: the sweep could not reach all of it.
            # (n > 1: a child sent to the engine core after that abort is told again.)
            await self._abort_ids({seg.internal_id or queue.request_id})
            if seg.children:
                await self.engine.engine_core.abort_requests_async(list(seg.children))
        return queue

    async def _segment(
        self,
        flight: Flight,
        prompt: Any,
        params: SamplingParams,
        request_id: str,
        kwargs: dict,
    ) -> AsyncGenerator[RequestOutput, None]:
        """One continuation segment as a generator (several are merged); vLLM's generate
        loop, as the first segment's in :meth:`generate`."""
        seg, queue = _Segment(flight), None
        try:
            queue = await self._register(seg, prompt, params, request_id, kwargs)
            finished = False
            while not finished:
                out = queue.get_nowait() or await queue.get()
                finished = out.finished
                yield out
            self._unlink(seg)  # the engine finished it: nothing left to stop
        except Exception as e:
            compat.raise_as_generate(e)
        finally:
            if queue is not None:
                queue.close()

    async def _continuations(
        self,
        flight: Flight,
        prompt: Any,
        params: SamplingParams,
        request_id: str,
        kwargs: dict,
        stitcher: Stitcher,
        claim: list[Ticket | None],
        priority: int,
    ) -> AsyncGenerator[RequestOutput, None]:
        """The samples a segment left stopped (a keep-mode pause, a continue swap): after
        resume, each continues from prompt + its tokens so far, again while they are
        stopped; ``claim`` holds the flight's share of the engine, ``priority`` is the
        caller's (its place in its tenant's queue). The samples of a request wider than
        its share (:meth:`Stitcher.defer`) run the same way, part after part, on the
        version it was admitted on, unless a stop came meanwhile."""
        cont_kwargs = {k: v for k, v in kwargs.items() if k != "prompt_text"}
        while indices := stitcher.to_continue():
            self._give_back(claim[0])  # stopped: no share while it waits for resume
            claim[0] = None
            # A stack's global hold first (every part waits for it), then, for samples a
            # stop left, their adapter's resume.
            go_on = await self._wait_all_released() and not self.closed
            stopped = flight.interrupt is not None  # else the next part of a wide request
            if go_on and stopped:
                go_on = await self._wait_for_resume(flight)
            if not go_on:
                final = stitcher.give_up()
                if final is not None:
                    yield final
                return
            flight.interrupt = None
            if self.share is not None:  # (a cap lowered meanwhile: parts as wide as it)
                indices = indices[: self.share.widest(flight.name)]
            claim[0] = self._ask_share(flight.name, len(indices), front=True, priority=priority)
            if claim[0] is not None and not claim[0].granted:
                claim[0] = await self._await_share(claim[0], flight)
            if stopped:
                metrics.CONTINUED.labels(flight.name).inc()
                self.registry.rebind(flight)
                self._settle(flight.name)
            version = flight.version
            prompts = [stitcher.continuation_prompt(g) for g in indices]
            # Continuations keep the caller's external id: vLLM's abort routes by id
            # reach them as they reach the first segment.
            gens = [
                self._segment(
                    flight,
                    TokensPrompt(prompt_token_ids=ids),
                    stitcher.continuation_params(params, g),
                    request_id,
                    cont_kwargs,
                )
                for g, ids in zip(indices, prompts, strict=True)
            ]
            stitcher.start_segment(indices)
            account = self._account(flight.name)
            if account is not None:  # each continuation's prompt: its tokens so far too
                account.charge(sum(len(ids) for ids in prompts))
            async with contextlib.aclosing(merge_async_iterators(*gens)) as merged:
                async for i, out in merged:
                    seen = stitcher.absorb(
                        out, indices[i], version.number, flight.interrupt == "continue"
                    )
                    if account is not None:
                        account.tokens += stitcher.added
                    if seen is not None:
                        yield seen

    async def _wait_for_resume(self, flight: Flight) -> bool:
        """Until the flight's adapter is resumed; False if it was aborted or unloaded
        meanwhile, the server closes, or ``resume_timeout_s`` passed."""

        def resumable() -> bool:
            return (
                not self.closed
                and flight.interrupt == "continue"
                and flight.name in self.registry
                and not self.registry.get(flight.name).paused
            )

        def ready() -> bool:
            return (
                resumable()
                or self.closed
                or flight.interrupt != "continue"
                or (flight.name not in self.registry)
            )

        try:
            async with asyncio.timeout(self.config.resume_timeout_s):
                await self._wait(flight.name, ready)
        except TimeoutError:
            return False
        return resumable()


def _share_key(tenant: str) -> str:
    """The event key of a tenant's share waiters (apart from its adapter-state waiters)."""
    return "\x00share:" + tenant


def scheduler_config(engine: Any) -> Any:
    """vLLM's scheduler settings of ``engine`` (its batch, its policy); None if unknown."""
    return getattr(getattr(engine, "vllm_config", None), "scheduler_config", None)


def fair_share_of(engine: Any, config: LoraExtConfig) -> FairShare | None:
    """The engine's fair share: its batch (``--max-num-seqs``) plus headroom, the
    configured weights and caps, the reserve for arrivals; None when off or the batch
    size is unknown."""
    if not config.fair_share:
        return None
    scheduler = scheduler_config(engine)
    seqs = getattr(scheduler, "max_num_seqs", None)
    if not isinstance(seqs, int) or seqs < 1:
        return None
    capacity = seqs + config.fair_share_headroom
    # Arrivals keep the headroom and `fair_share_reserve` slots of the batch (never all
    # of it: a flood always has one).
    reserve = 0
    if config.fair_share_reserve:
        reserve = config.fair_share_headroom + min(config.fair_share_reserve, seqs - 1)
    return FairShare(capacity, config.tenant_weights, config.tenant_max_in_flight, reserve=reserve)


class _Meter:
    """Tokens each engine output adds to its tenant's service: the prompt once, then
    what was generated, whatever the output kind."""

    def __init__(self, kind: RequestOutputKind) -> None:
        self.delta = kind == RequestOutputKind.DELTA
        self.seen: dict[int, int] = {}
        self.prompted = False

    def tokens(self, out: RequestOutput) -> int:
        if self.delta and self.prompted:  # most outputs: the new tokens alone
            return sum([len(c.token_ids) for c in out.outputs])
        n = 0
        if not self.prompted and out.prompt_token_ids:
            n += len(out.prompt_token_ids)
            self.prompted = True
        for c in out.outputs:
            made = len(c.token_ids)
            if self.delta:
                n += made
            else:
                n += max(0, made - self.seen.get(c.index, 0))
                self.seen[c.index] = made
        return n
