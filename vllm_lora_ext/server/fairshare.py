"""A fair share of the engine per tenant (adapter name; the base model is one too): the
Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language Models"
(OSDI 2024), applied at admission.

vLLM schedules first-come first-served: a tenant's burst of thousands of requests makes
every other tenant wait behind all of it. Here the engine is given at most ``capacity``
sequences (its own batch, plus a little headroom so it never idles between a finish and
the next admission); the rest wait in one queue per tenant, and when room frees the
backlogged tenant that received the least weighted service (prompt and generated tokens,
divided by its ``weight``) goes next (ties: the one with fewer running, so a tenant lifted
level with a flooding one goes first). Work-conserving (but for ``reserve``, below): a
tenant alone gets every slot. A tenant that becomes backlogged is lifted to the least
counter of the backlogged ones, so idle time is not banked as credit (VTC's rule); an idle
one that comes back is also lowered to it (no debt from long ago). ``max_in_flight`` caps
a tenant's slots.

A flood keeps the engine's batch full, so even a tenant picked first waits for a finish
(a whole long generation) before it runs. ``reserve`` keeps the top slots of ``capacity``
for tenants with nothing running: tenants already running fill at most ``capacity -
reserve``, and one that arrives is admitted at once and runs at the engine's next step.

Pure and synchronous: the gate awaits grants; everything here is unit-testable.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from vllm_lora_ext.config import MAX_WEIGHT, MIN_WEIGHT


@dataclass(eq=False, slots=True)  # one per request
class Ticket:
    """One request's claim on ``slots`` engine sequences (its ``n``)."""

    tenant: str
    slots: int = 1
    granted: bool = False
    done: bool = False  # released or cancelled
    front: bool = False  # a continuation: ahead of its tenant's new requests
    priority: int = 0  # vLLM's: lower goes first, within the tenant


class Tenant:
    """One tenant's counters and queue. ``tokens`` is what it received (prompt and
    generated tokens); whoever serves it adds to it (``tokens += n``, per streamed
    token: no call). The virtual counter ``service`` is derived from it: tokens counted
    since the last change of weight or lift, divided by the weight, on top of the counter
    at that change (a new weight applies to what comes after it, as with a running sum)."""

    def __init__(
        self, name: str, weight: float = 1.0, max_in_flight: int | None = None, order: int = 0
    ) -> None:
        self.name = name
        self.max_in_flight = max_in_flight
        self.tokens = 0  # tokens received (prompt + generated)
        self.running = 0  # slots held
        self.queue: deque[Ticket] = deque()
        self.order = order  # ties: the tenant seen first
        self._weight = weight
        self._base = 0.0  # the counter at the last change...
        self._mark = 0  # ...and the tokens then

    @property
    def service(self) -> float:
        """The virtual token counter: weighted tokens received."""
        return self._base + (self.tokens - self._mark) / self._weight

    @service.setter
    def service(self, value: float) -> None:
        """VTC's lift (or lowering): the counter moves, the tokens received do not."""
        self._base, self._mark = value, self.tokens

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self.service = self.service  # the tokens so far keep the weight they came under
        self._weight = value

    def charge(self, tokens: int) -> None:
        """Service received: prompt tokens once, generated tokens as they come."""
        self.tokens += tokens

    def eligible(self) -> bool:
        return bool(self.queue) and self.under_cap(self.queue[0].slots)

    def under_cap(self, slots: int) -> bool:
        """Whether ``slots`` more stay within ``max_in_flight`` (one request always may:
        a wider one is refused, unless it is a continuation of one admitted before its
        cap was lowered)."""
        cap = self.max_in_flight
        return cap is None or self.running == 0 or self.running + slots <= cap


class FairShare:
    def __init__(
        self,
        capacity: int,
        weights: dict[str, float] | None = None,
        caps: dict[str, int] | None = None,
        max_tenants: int = 4096,
        reserve: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if not 0 <= reserve < capacity:
            raise ValueError("reserve must be >= 0 and below the capacity")
        self.capacity = capacity
        self.reserve = reserve
        self.running = 0
        self.waiting = 0  # queued tickets, every tenant (nothing queued: nothing to choose)
        self.tenants: dict[str, Tenant] = {}
        self.max_tenants = max_tenants
        self._weights = {name: _checked(w) for name, w in (weights or {}).items()}
        self._caps = dict(caps or {})
        self._order = itertools.count()

    # ---- settings -----------------------------------------------------------------------
    def configure(
        self, name: str, weight: float | None = None, max_in_flight: int | bool | None = False
    ) -> list[Ticket]:
        """Set a tenant's weight and/or cap (``max_in_flight=None`` lifts the cap; the
        default ``False`` leaves it); returns the tickets granted by the change."""
        # Checked in full before anything changes (a refused change leaves all as it was).
        if weight is not None:
            weight = _checked(weight)
        cap = None if max_in_flight is None or max_in_flight is False else int(max_in_flight)
        if cap is not None and cap < 1:
            raise ValueError("max_in_flight must be >= 1")
        kept = (weight is not None and weight != 1.0) or cap is not None
        if kept and name not in self._weights and name not in self._caps:
            if self.settings_count() >= self.max_tenants:
                raise ValueError(
                    f"settings are kept for at most {self.max_tenants} tenants: reset one "
                    "(weight 1, max_in_flight null) before setting another"
                )
        # A setting back to its default is dropped, not kept (bounded by max_tenants).
        if weight == 1.0:
            self._weights.pop(name, None)
        elif weight is not None:
            self._weights[name] = weight
        if cap is not None:
            self._caps[name] = cap
        elif max_in_flight is None:
            self._caps.pop(name, None)
        t = self.tenants.get(name)
        if t is not None:
            t.weight = self._weights.get(name, 1.0)
            t.max_in_flight = self._caps.get(name)
        return self._schedule()

    def settings(self, name: str) -> tuple[float, int | None]:
        return self._weights.get(name, 1.0), self._caps.get(name)

    def settings_count(self) -> int:
        """Tenants with a setting of their own (a weight other than 1, or a cap)."""
        return len(self._weights.keys() | self._caps.keys())

    # ---- requests -----------------------------------------------------------------------
    def grant_now(self, ticket: Ticket) -> bool:
        """Grant ``ticket`` at once if nobody waits and it fits (every request of an
        engine with room: no queue, no scan of the tenants); :meth:`submit`'s first step."""
        if self.waiting:
            return False
        t = self._tenant(ticket.tenant)
        slots = ticket.slots
        # Below the reserve and uncapped, it fits (limit(t) >= capacity - reserve); the
        # checks are made in full only near the top (fewer calls on every request's way).
        near = self.running + slots > self.capacity - self.reserve
        if near or t.max_in_flight is not None:
            if not ticket.front:
                self.refuse_wide(t, slots)
            if not self._fits(t, slots):
                return False
        self._grant(t, ticket)
        return True

    def submit(self, ticket: Ticket, front: bool = False) -> list[Ticket]:
        """Queue ``ticket`` (``front``: a continuation keeps its place in its tenant's
        queue); returns every ticket granted now (maybe this one)."""
        ticket.front = front
        if self.grant_now(ticket):  # as the choice below would
            return [ticket]
        t = self._tenant(ticket.tenant)
        if not front:
            self.refuse_wide(t, ticket.slots)
        if not t.queue and self.waiting:
            backlogged = [o.service for o in self.tenants.values() if o.queue and o is not t]
            if backlogged:
                # VTC's lift: no credit for the time it asked for nothing. An idle tenant
                # also carries no debt from long ago: it starts level with the least
                # served backlogged tenant (else B waits for A to catch up on B's past).
                floor = min(backlogged)
                t.service = floor if t.running == 0 else max(t.service, floor)
        # Continuations first, then by priority, then in arrival order.
        key = (not front, ticket.priority)
        at = next(
            (i for i, q in enumerate(t.queue) if (not q.front, q.priority) > key), len(t.queue)
        )
        t.queue.insert(at, ticket)
        self.waiting += 1
        return self._schedule()

    def release(self, ticket: Ticket) -> list[Ticket]:
        """The request ended (or stopped between segments): its slots free, or it leaves
        the queue; returns the tickets granted by the room made."""
        if ticket.done:
            return []
        ticket.done = True
        t = self.tenants.get(ticket.tenant)
        if t is None:
            return []
        if ticket.granted:
            t.running -= ticket.slots
            self.running -= ticket.slots
        else:
            try:
                t.queue.remove(ticket)
                self.waiting -= 1
            except ValueError:
                pass
        if len(self.tenants) > self.max_tenants:
            self._forget_idle(t)
        return self._schedule() if self.waiting else []

    def forget(self, name: str) -> None:
        """A name that is gone: its counter goes (settings set for it stay); nothing
        of it may be running or queued."""
        t = self.tenants.get(name)
        if t is not None and not t.queue and t.running == 0:
            del self.tenants[name]

    def charge(self, tenant: str, tokens: int) -> None:
        """Service received: prompt tokens once, generated tokens as they come."""
        t = self.tenants.get(tenant)
        if t is not None and tokens > 0:
            t.charge(tokens)

    # ---- views ----------------------------------------------------------------------------
    def queued(self, tenant: str) -> int:
        t = self.tenants.get(tenant)
        return len(t.queue) if t is not None else 0

    def snapshot(self) -> dict[str, dict]:
        return {
            name: {
                "weight": t.weight,
                "max_in_flight": t.max_in_flight,
                "running": t.running,
                "queued": len(t.queue),
                "service_tokens": t.tokens,
            }
            for name, t in self.tenants.items()
        }

    # ---- the choice ---------------------------------------------------------------------
    def _tenant(self, name: str) -> Tenant:
        t = self.tenants.get(name)
        if t is None:
            weight, cap = self.settings(name)
            t = self.tenants[name] = Tenant(name, weight, cap, order=next(self._order))
        return t

    def _forget_idle(self, t: Tenant) -> None:
        """Bounded state: an idle tenant's counter is dropped once many exist (one that
        comes back is lifted when it is backlogged, as any idle tenant is)."""
        if len(self.tenants) > self.max_tenants and not t.queue and t.running == 0:
            del self.tenants[t.name]

    def refuse_wide(self, t: Tenant, slots: int) -> None:
        """A request no share can hold is refused (ValueError), not queued: one wider
        than its tenant's cap (a cap one request may exceed is none), or than the
        engine's batch (it would hold the whole engine until its last sample ends,
        every other tenant waiting for all of it: vLLM runs its samples as one request
        each, queued first-come first-served behind one another). The gate asks no
        more than :meth:`widest` for an adapter's request (it serves a wider one in
        parts): this refuses one on the base model or an adapter it does not continue.
        Never a continuation (``front``): it was admitted, and a cap lowered while it was
        stopped lets it run when its tenant has nothing else running."""
        cap = t.max_in_flight
        if cap is not None and slots > cap:
            raise ValueError(
                f"n={slots} is more than tenant '{t.name}' may run at once "
                f"(max_in_flight={cap}): send at most {cap} samples per request"
            )
        if slots > self.capacity:
            raise ValueError(
                f"n={slots} is more than the engine runs at once ({self.capacity}: "
                "--max-num-seqs plus fair_share_headroom): such a request would hold the "
                f"whole engine until its last sample ends; send at most {self.capacity} "
                "samples per request"
            )

    def widest(self, name: str) -> int:
        """The most samples one request of ``name`` may run at once: its cap, the
        engine's batch (the gate serves a wider request of an adapter in parts)."""
        cap = self._caps.get(name)
        return self.capacity if cap is None else min(cap, self.capacity)

    def limit(self, t: Tenant) -> int:
        """Slots in use up to which ``t`` may be admitted: the reserve is for tenants
        with nothing running."""
        return self.capacity if t.running == 0 else self.capacity - self.reserve

    def _schedule(self) -> list[Ticket]:
        granted: list[Ticket] = []
        while self.waiting and self.running < self.capacity:
            candidates = [t for t in self.tenants.values() if t.eligible()]
            if not candidates:
                break
            pick = min(candidates, key=lambda t: (t.service, t.running, t.order))
            ticket = pick.queue[0]
            if not self._room(pick, ticket.slots):
                break  # a wide request (n) waits for room rather than overfilling
            pick.queue.popleft()
            self.waiting -= 1
            self._grant(pick, ticket)
            granted.append(ticket)
        return granted

    def _fits(self, t: Tenant, slots: int) -> bool:
        """Whether ``slots`` more of ``t`` may run now (its cap, the room, the reserve)."""
        return t.under_cap(slots) and self._room(t, slots)

    def _room(self, t: Tenant, slots: int) -> bool:
        """Whether the engine has room for ``slots`` more of ``t`` (an empty engine takes
        any request; otherwise up to ``limit(t)``)."""
        return self.running == 0 or (
            self.running < self.capacity and self.running + slots <= self.limit(t)
        )

    def _grant(self, t: Tenant, ticket: Ticket) -> None:
        ticket.granted = True
        t.running += ticket.slots
        self.running += ticket.slots


def _checked(weight: float) -> float:
    """A weight the counters can divide by (see :data:`~vllm_lora_ext.config.Weight`)."""
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:  # (false for nan too)
        raise ValueError(f"weight must be from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, got {weight}")
    return weight
