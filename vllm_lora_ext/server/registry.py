"""Adapter bookkeeping: names, versions, leases (refcounts), held requests, pause state,
retention. Pure and synchronous, so every rule here is unit-testable without an engine;
the gate and the manager call into it and perform the engine I/O it asks for.

One word per meaning:

- a **version** is one load of a name: its own vLLM ``lora_int_id`` and its own internal
  ``lora_name`` (``meow@3``); vLLM compares ``LoRARequest`` objects and keys prefix-cache
  blocks by name, so per-version names keep old and new weights apart. A stable name
  (``meow``) means its newest committed version;
- a **flight** is one admitted request's lease on a version, released exactly once on
  whatever path the request ends; a flight is **exact** when the request named its
  version (``model=meow@3``): it is never moved to another version;
- a **waiter** is a request held, not yet admitted, while its adapter is paused;
- an **unloaded** version serves nobody new and leaves the engine once idle; a
  **pinned** version is kept resident by retention until unpinned;
- **evictable** versions are idle and may leave the engine now: unloaded ones, and
  unpinned ones outside the newest ``keep_versions``; never the current one.

A name that was unloaded is forgotten once its last version left and nobody waits on it;
its last version number is remembered (for the newest :data:`TOMBSTONES` such names) so a
reloaded name continues its numbering.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from vllm_lora_ext.errors import LoraExtError, UnknownAdapterError

Interrupt = Literal["abort", "continue"]
PauseMode = Literal["abort", "keep", "wait"]
VERSION_SEP = "@"
TOMBSTONES = 1024


@dataclass(eq=False)
class Version:
    name: str
    number: int
    lora_int_id: int
    path: str  # what the caller loaded from
    load_path: str = ""  # what the engine loads (a staged copy, or ``path``)
    refcount: int = 0
    pinned: bool = False
    unloaded: bool = False
    add_lora_ms: float = 0.0  # the engine's own load time (the floor of a swap)
    is_3d_lora_weight: bool = False  # vLLM's flag for fused-MoE (3D) LoRA weights
    # The engine's request object of this version (gate.lora_request_of), made once.
    engine_request: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.load_path = self.load_path or self.path

    @property
    def internal_name(self) -> str:
        return f"{self.name}{VERSION_SEP}{self.number}"


@dataclass(eq=False)
class Waiter:
    key: int
    name: str
    request_id: str
    aborted: bool = False


@dataclass(eq=False, slots=True)  # one per request, alive while it runs
class Flight:
    key: int
    request_id: str  # the caller's (external) id; several requests may share one
    name: str
    version: Version
    exact: bool = False
    interrupt: Interrupt | None = None  # how a pause, abort or swap ends it
    released: bool = False
    segments: set[str] = field(default_factory=set)  # internal engine ids running now


@dataclass(eq=False)
class Adapter:
    name: str
    versions: dict[int, Version] = field(default_factory=dict)
    current: int | None = None
    paused: bool = False
    pause_mode: PauseMode | None = None
    flights: dict[int, Flight] = field(default_factory=dict)
    waiters: dict[int, Waiter] = field(default_factory=dict)
    last_number: int = 0

    @property
    def current_version(self) -> Version:
        if self.current is None:
            raise UnknownAdapterError(f"adapter '{self.name}' has no loaded version")
        return self.versions[self.current]


def split_version(model: str) -> tuple[str, int | None]:
    """``meow@3`` -> (``meow``, 3); ``meow`` -> (``meow``, None)."""
    name, sep, num = model.rpartition(VERSION_SEP)
    if sep and name and num.isdigit():
        return name, int(num)
    return model, None


def check_name(name: str) -> None:
    """Any name a vLLM model name can be ('team/meow' included), but not empty, without
    the version separator and without control characters (logs, metric labels)."""
    if not name or VERSION_SEP in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise LoraExtError(
            f"invalid adapter name {name!r}: empty, or contains '{VERSION_SEP}' or a "
            "control character"
        )


class Registry:
    """All adapters of one server. Not thread-safe: used from the server's event loop."""

    def __init__(self, keep_versions: int, id_base: int) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.keep_versions = keep_versions
        self._ids = itertools.count(id_base)
        self._keys = itertools.count(1)
        self._adapters: dict[str, Adapter] = {}
        self._tombstones: OrderedDict[str, int] = OrderedDict()

    # ---- lookup -------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        """Served: the name resolves to a version."""
        adapter = self._adapters.get(name)
        return adapter is not None and adapter.current is not None

    def known(self, name: str) -> bool:
        """Served, or unloaded with versions still draining."""
        return name in self._adapters

    def names(self) -> list[str]:
        return [name for name in self._adapters if name in self]

    def get(self, name: str) -> Adapter:
        if name not in self:
            raise UnknownAdapterError(f"unknown adapter '{name}'")
        return self._adapters[name]

    def entry(self, name: str) -> Adapter | None:
        return self._adapters.get(name)

    def adapters(self) -> list[Adapter]:
        return list(self._adapters.values())

    def resident(self, name: str, number: int) -> Version:
        version = self.get(name).versions.get(number)
        if version is None or version.unloaded:
            raise UnknownAdapterError(f"adapter '{name}' has no resident version {number}")
        return version

    def sizes(self) -> dict[str, int]:
        """How much state is held (for boundedness checks)."""
        return {
            "adapters": len(self._adapters),
            "versions": sum(len(a.versions) for a in self._adapters.values()),
            "flights": sum(len(a.flights) for a in self._adapters.values()),
            "waiters": sum(len(a.waiters) for a in self._adapters.values()),
            "tombstones": len(self._tombstones),
        }

    # ---- versions -----------------------------------------------------------------
    def last_number(self, name: str) -> int:
        adapter = self._adapters.get(name)
        return adapter.last_number if adapter else self._tombstones.get(name, 0)

    def new_version(self, name: str, path: str, number: int | None = None) -> Version:
        """The next version of ``name`` (or version ``number``, which must be newer than
        every earlier one); it serves nobody and holds no state until :meth:`commit`."""
        check_name(name)
        last = self.last_number(name)
        if number is None:
            number = last + 1
        elif number <= last:
            raise LoraExtError(
                f"version {number} of '{name}' is not newer than its version {last}", status=409
            )
        return Version(name=name, number=number, lora_int_id=next(self._ids), path=path)

    def commit(self, version: Version) -> None:
        """Make ``version`` current (new requests get it at once)."""
        adapter = self._adapters.get(version.name)
        if adapter is None:
            adapter = self._adapters[version.name] = Adapter(version.name)
            self._tombstones.pop(version.name, None)
        adapter.versions[version.number] = version
        adapter.current = version.number
        adapter.last_number = max(adapter.last_number, version.number)

    def evictable(self, name: str) -> list[Version]:
        adapter = self._adapters.get(name)
        if adapter is None:
            return []
        live = [n for n, v in adapter.versions.items() if not v.unloaded]
        newest = sorted(live, reverse=True)[: self.keep_versions]
        return [
            v
            for n, v in sorted(adapter.versions.items())
            if n != adapter.current
            and v.refcount == 0
            and (v.unloaded or (n not in newest and not v.pinned))
        ]

    def serving(self, version: Version) -> bool:
        """Whether ``version`` is its name's live current version: it never leaves
        while it is, so the end of a request on it evicts nothing."""
        adapter = self._adapters.get(version.name)
        return (
            adapter is not None
            and adapter.current == version.number
            and adapter.versions.get(version.number) is version
            and not version.unloaded
        )

    def drop(self, version: Version) -> None:
        """Forget a version that leaves the engine (only an idle one)."""
        if version.refcount:
            raise RuntimeError(f"{version.internal_name} still has {version.refcount} users")
        adapter = self._adapters[version.name]
        if adapter.versions.get(version.number) is version:
            del adapter.versions[version.number]

    def tidy(self, name: str) -> bool:
        """Forget an unloaded name nothing refers to any more; True if it was forgotten."""
        adapter = self._adapters.get(name)
        if adapter is None or adapter.current is not None:
            return False
        if adapter.versions or adapter.flights or adapter.waiters:
            return False
        del self._adapters[name]
        self._tombstones[name] = adapter.last_number
        while len(self._tombstones) > TOMBSTONES:
            self._tombstones.popitem(last=False)
        return True

    def pin(self, name: str, number: int, pinned: bool) -> Version:
        version = self.resident(name, number)
        version.pinned = pinned
        return version

    def unload(self, name: str, number: int | None = None) -> list[Version]:
        """Unload a name (every version; it stops resolving at once, its pause ends) or
        one non-current version. Returns the versions marked."""
        adapter = self.get(name)
        if number is None:
            adapter.current = None
            adapter.paused = False
            adapter.pause_mode = None
            marked = list(adapter.versions.values())
        elif number not in adapter.versions or adapter.versions[number].unloaded:
            raise UnknownAdapterError(f"adapter '{name}' has no resident version {number}")
        elif number == adapter.current:
            raise LoraExtError(
                f"version {number} is the current version of '{name}'; load a new one first "
                "or unload the name",
                status=409,
            )
        else:
            marked = [adapter.versions[number]]
        for v in marked:
            v.unloaded = True
        return sorted(marked, key=lambda v: v.number)

    # ---- leases -------------------------------------------------------------------
    def admit(self, name: str, request_id: str, number: int | None = None) -> Flight:
        """Lease the current (or the named) version of ``name`` for one request."""
        adapter = self.get(name)
        version = adapter.current_version if number is None else self.resident(name, number)
        return self._lease(adapter, version, request_id, exact=number is not None)

    def lease(self, name: str, request_id: str) -> Flight | None:
        """:meth:`admit` of a served, unpaused name's current version, asked by its
        stable name (most requests: one lookup, no exception to set up); None when it is
        not that (a version named, unknown, paused): :meth:`admit` and the gate decide."""
        adapter = self._adapters.get(name)
        if adapter is None or adapter.paused or adapter.current is None:
            return None
        return self._lease(adapter, adapter.versions[adapter.current], request_id)

    def _lease(
        self, adapter: Adapter, version: Version, request_id: str, exact: bool = False
    ) -> Flight:
        version.refcount += 1
        flight = Flight(next(self._keys), request_id, adapter.name, version, exact)
        adapter.flights[flight.key] = flight
        return flight

    def rebind(self, flight: Flight) -> None:
        """Move a continuing request onto the current version (unless it is exact)."""
        adapter = self._adapters[flight.name]
        if flight.exact or adapter.current is None or flight.released:
            return
        new = adapter.current_version
        if new is not flight.version:
            new.refcount += 1
            flight.version.refcount -= 1
            flight.version = new

    def release(self, flight: Flight) -> bool:
        """End a lease; idempotent. True the first time."""
        if flight.released:
            return False
        flight.released = True
        flight.version.refcount -= 1
        self._adapters[flight.name].flights.pop(flight.key, None)
        return True

    def hold(self, name: str, request_id: str) -> Waiter:
        waiter = Waiter(key=next(self._keys), name=name, request_id=request_id)
        self.get(name).waiters[waiter.key] = waiter
        return waiter

    def unhold(self, waiter: Waiter) -> None:
        adapter = self._adapters.get(waiter.name)
        if adapter is not None:
            adapter.waiters.pop(waiter.key, None)

    # ---- interruptions ------------------------------------------------------------
    @staticmethod
    def mark(flight: Flight, how: Interrupt) -> Interrupt:
        """Say how ``flight`` ends when stopped; an ``abort`` is never downgraded to a
        ``continue`` (a pause(abort) racing a swap(continue) ends the request)."""
        if flight.interrupt != "abort":
            flight.interrupt = how
        return flight.interrupt or how

    def older_flights(self, name: str) -> list[Flight]:
        """The flights still on an older version (and not exact): what a swap's
        ``interrupt`` stops."""
        adapter = self.get(name)
        return [
            f
            for f in adapter.flights.values()
            if f.version.number != adapter.current and not f.exact
        ]

    def pause(self, name: str, mode: PauseMode | None) -> PauseMode | None:
        """Pause ``name`` in ``mode`` (None: resume); returns the mode it had (None: it
        was not paused), so a pause that fails can put that back."""
        adapter = self.get(name)
        before = adapter.pause_mode if adapter.paused else None
        adapter.paused = mode is not None
        adapter.pause_mode = mode
        return before

    def requests(self, name: str) -> tuple[list[Flight], list[Waiter]]:
        """Everything of ``name`` a pause or an abort may stop: flights and held requests."""
        adapter = self.get(name)
        return list(adapter.flights.values()), list(adapter.waiters.values())

    def by_request_ids(self, request_ids: Iterable[str]) -> tuple[list[Flight], list[Waiter]]:
        """Flights and held requests with these external ids (any adapter)."""
        wanted = set(request_ids)
        flights: list[Flight] = []
        waiters: list[Waiter] = []
        for adapter in self._adapters.values():
            flights += [f for f in adapter.flights.values() if f.request_id in wanted]
            waiters += [w for w in adapter.waiters.values() if w.request_id in wanted]
        return flights, waiters

    def resume(self, name: str) -> None:
        self.pause(name, None)

    def snapshot(self) -> list[dict]:
        out = []
        for name in self.names():
            a = self._adapters[name]
            out.append(
                {
                    "lora_name": name,
                    "version": a.current,
                    "paused": a.paused,
                    "pause_mode": a.pause_mode,
                    "in_flight": len(a.flights),
                    "held": len(a.waiters),
                    "versions": [
                        {
                            "version": v.number,
                            "lora_int_id": v.lora_int_id,
                            "internal_name": v.internal_name,
                            "in_flight": v.refcount,
                            "path": v.path,
                            "pinned": v.pinned,
                            "unloaded": v.unloaded,
                        }
                        for v in sorted(a.versions.values(), key=lambda v: v.number)
                    ],
                }
            )
        return out
