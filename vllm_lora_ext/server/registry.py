"""Adapter bookkeeping: names, versions, leases (refcounts), pause state, retention.

Pure and synchronous so that every rule here is unit-testable without an engine. The
async layer (``manager.py``) calls into it and performs the engine I/O it asks for.

A stable name (``meow``) always means its newest committed version. Each version has its
own vLLM ``lora_int_id`` and its own internal ``lora_name`` (``meow@3``): vLLM compares
``LoRARequest`` objects and keys prefix-cache blocks by name, so per-version names keep
old and new weights apart. Every admitted request holds a :class:`Flight` (a lease on one
version) until it is released, exactly once, on whatever path the request ends.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

from vllm_lora_ext.errors import LoraExtError, UnknownAdapterError

Interrupt = Literal["abort", "continue"]
PauseMode = Literal["abort", "keep", "wait"]
VERSION_SEP = "@"


@dataclass
class Version:
    name: str
    number: int
    lora_int_id: int
    path: str  # what the caller loaded from
    load_path: str = ""  # what the engine loads (a staged copy, or ``path``)
    refcount: int = 0
    pinned: bool = False
    retired: bool = False  # unloaded: leaves the engine once idle, serves nobody new
    add_lora_ms: float = 0.0  # the engine's own load time (the floor of a swap)

    def __post_init__(self) -> None:
        self.load_path = self.load_path or self.path

    @property
    def internal_name(self) -> str:
        return f"{self.name}{VERSION_SEP}{self.number}"


@dataclass
class Flight:
    """One admitted request's lease on a version; ``interrupt`` says how a pause ends it."""

    request_id: str
    name: str
    version: Version
    interrupt: Interrupt | None = None
    released: bool = False
    pinned: bool = False  # asked for this version by number: never moved to another
    segments: list[str] = field(default_factory=list)  # engine request ids running now


@dataclass
class Adapter:
    name: str
    versions: dict[int, Version] = field(default_factory=dict)
    current: int | None = None
    paused: bool = False
    pause_mode: PauseMode | None = None
    flights: dict[str, Flight] = field(default_factory=dict)
    held: int = 0
    last_number: int = 0  # version numbers are never reused, even after an unload

    @property
    def current_version(self) -> Version:
        if self.current is None:
            raise UnknownAdapterError(f"adapter '{self.name}' has no loaded version")
        return self.versions[self.current]


def split_pinned(model: str) -> tuple[str, int | None]:
    """``meow@3`` -> (``meow``, 3); ``meow`` -> (``meow``, None)."""
    name, sep, num = model.rpartition(VERSION_SEP)
    if sep and name and num.isdigit():
        return name, int(num)
    return model, None


class Registry:
    """All adapters of one server. Not thread-safe: used from the server's event loop."""

    def __init__(self, keep_versions: int, id_base: int) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.keep_versions = keep_versions
        self._ids = itertools.count(id_base)
        self._adapters: dict[str, Adapter] = {}

    # ---- lookup -------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        adapter = self._adapters.get(name)
        return adapter is not None and adapter.current is not None

    def names(self) -> list[str]:
        return [name for name in self._adapters if name in self]

    def get(self, name: str) -> Adapter:
        if name not in self:
            raise UnknownAdapterError(f"unknown adapter '{name}'")
        return self._adapters[name]

    def owner_of(self, internal_name: str) -> str | None:
        """The stable name an engine-side ``lora_name`` belongs to, if ours."""
        name, number = split_pinned(internal_name)
        adapter = self._adapters.get(name)
        if adapter is None or (number is not None and number not in adapter.versions):
            return None
        return name

    # ---- versions -----------------------------------------------------------------
    def new_version(self, name: str, path: str) -> Version:
        """Allocate the next version of ``name``; it serves nobody until :meth:`commit`."""
        if not name or VERSION_SEP in name:
            raise LoraExtError(f"invalid adapter name '{name}': empty or contains '{VERSION_SEP}'")
        adapter = self._adapters.setdefault(name, Adapter(name))
        adapter.last_number += 1
        return Version(
            name=name, number=adapter.last_number, lora_int_id=next(self._ids), path=path
        )

    def commit(self, version: Version) -> list[Version]:
        """Make ``version`` current; returns versions that are now retirable."""
        adapter = self._adapters.setdefault(version.name, Adapter(version.name))
        adapter.versions[version.number] = version
        adapter.current = version.number
        return self.retirable(version.name)

    def retirable(self, name: str) -> list[Version]:
        """Idle versions that were unloaded, or are unpinned and outside the newest
        ``keep_versions``; never the current one."""
        adapter = self._adapters.get(name)
        if adapter is None:
            return []
        live = [n for n, v in adapter.versions.items() if not v.retired]
        newest = sorted(live, reverse=True)[: self.keep_versions]
        return [
            v
            for n, v in sorted(adapter.versions.items())
            if n != adapter.current
            and v.refcount == 0
            and (v.retired or (n not in newest and not v.pinned))
        ]

    def resident(self, name: str, number: int) -> Version:
        adapter = self.get(name)
        version = adapter.versions.get(number)
        if version is None or version.retired:
            raise UnknownAdapterError(f"adapter '{name}' has no resident version {number}")
        return version

    def pin(self, name: str, number: int, pinned: bool) -> list[Version]:
        """Keep a version resident whatever the window (or let it go again)."""
        self.resident(name, number).pinned = pinned
        return self.retirable(name)

    def interrupt_older(self, name: str, interrupt: Interrupt) -> list[Flight]:
        """Mark the flights still on an older version (not pinned to it) for a swap's
        ``abort``/``continue``; returns them."""
        adapter = self.get(name)
        marked = [
            f
            for f in adapter.flights.values()
            if f.version.number != adapter.current and not f.pinned
        ]
        for f in marked:
            f.interrupt = interrupt
        return marked

    def retire(self, name: str, number: int | None = None) -> list[Version]:
        """Unload a name (all versions) or one non-current version; each leaves once
        idle. Returns what is retirable now."""
        adapter = self.get(name)
        if number is None:
            adapter.current = None  # the name stops resolving at once
            for v in adapter.versions.values():
                v.retired = True
        elif number not in adapter.versions:
            raise UnknownAdapterError(f"adapter '{name}' has no resident version {number}")
        elif number == adapter.current:
            raise LoraExtError(
                f"version {number} is the current version of '{name}'; load a new one first "
                "or unload the name",
                status=409,
            )
        else:
            adapter.versions[number].retired = True
        return self.retirable(name)

    def drop(self, version: Version) -> None:
        """Forget a version the engine no longer holds (after ``remove_lora``)."""
        if version.refcount:
            raise RuntimeError(f"{version.internal_name} still has {version.refcount} users")
        adapter = self._adapters[version.name]
        adapter.versions.pop(version.number, None)

    # ---- leases -------------------------------------------------------------------
    def admit(self, name: str, request_id: str, number: int | None = None) -> Flight:
        """Lease the current (or the pinned) version of ``name`` for one request."""
        adapter = self.get(name)
        version = adapter.current_version if number is None else self.resident(name, number)
        if request_id in adapter.flights:
            raise LoraExtError(f"request id '{request_id}' is already in flight")
        version.refcount += 1
        flight = Flight(
            request_id=request_id, name=name, version=version, pinned=number is not None
        )
        adapter.flights[request_id] = flight
        return flight

    def rebind(self, flight: Flight) -> list[Version]:
        """Move a continuing request onto the current version; returns retirable ones."""
        adapter = self._adapters[flight.name]
        old = flight.version
        if flight.pinned or adapter.current is None:
            return []
        new = adapter.current_version
        if new is not old:
            new.refcount += 1
            old.refcount -= 1
            flight.version = new
        return self.retirable(flight.name)

    def release(self, flight: Flight) -> list[Version]:
        """End a lease; idempotent. Returns versions that became retirable."""
        if flight.released:
            return []
        flight.released = True
        flight.version.refcount -= 1
        adapter = self._adapters[flight.name]
        adapter.flights.pop(flight.request_id, None)
        return self.retirable(flight.name)

    # ---- pause --------------------------------------------------------------------
    def pause(self, name: str, mode: PauseMode) -> list[Flight]:
        """Pause ``name``; marks its flights for ``abort``/``keep`` and returns them."""
        adapter = self.get(name)
        adapter.paused = True
        adapter.pause_mode = mode
        flights = list(adapter.flights.values())
        if mode != "wait":
            interrupt: Interrupt = "continue" if mode == "keep" else "abort"
            for flight in flights:
                flight.interrupt = interrupt
        return flights

    def resume(self, name: str) -> None:
        adapter = self.get(name)
        adapter.paused = False
        adapter.pause_mode = None

    def in_flight(self, name: str) -> int:
        return len(self.get(name).flights)

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
                    "held": a.held,
                    "versions": [
                        {
                            "version": v.number,
                            "lora_int_id": v.lora_int_id,
                            "internal_name": v.internal_name,
                            "in_flight": v.refcount,
                            "path": v.path,
                            "pinned": v.pinned,
                            "retired": v.retired,
                        }
                        for v in sorted(a.versions.values(), key=lambda v: v.number)
                    ],
                }
            )
        return out
