"""A fleet's desired state, and the pure planner that converges one replica to it.

The desired state is explicit: what controllers asked for (loads with their numbers and
paths, pins, pauses, unloads), recorded by the supervisor before it fans a call out, and
stored durably (Ray's internal KV) so it outlives the supervisor. It is never re-derived
from what replicas happen to serve: a call a replica missed (it was down, or restarting,
or a load failed there) is still wanted, and every check converges every replica to it.

:func:`plan` is the pure part: the ``(route, body)`` control calls that bring a replica
from what it serves (its ``GET /skyrl/v1/loras``) to the desired state. Applying the plan
and planning again gives nothing to do (tested as a property).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field

PauseMode = Literal["abort", "keep", "wait"]
Adapters = Mapping[str, Mapping[str, Any]]  # name -> one /skyrl/v1/loras adapter entry
Call = tuple[str, dict[str, Any]]
TOMBSTONES = 1024  # unloaded names remembered (newest), as the servers do


class VersionIntent(BaseModel):
    path: str
    pinned: bool = False


class NameIntent(BaseModel):
    current: int
    versions: dict[int, VersionIntent] = Field(default_factory=dict)
    paused: PauseMode | None = None
    unloaded_versions: list[int] = Field(default_factory=list)


class FleetIntent(BaseModel):
    """Every name's wanted state; ``revision`` counts the changes."""

    revision: int = 0
    window: int = 1  # versions below the current one every replica keeps (max_off_policy)
    names: dict[str, NameIntent] = Field(default_factory=dict)
    # Tombstones, oldest first: an unloaded name and its last version (a reloaded name
    # continues its numbering, as the servers do).
    unloaded: dict[str, int] = Field(default_factory=dict)

    # ---- recording intent (each returns a new record) -------------------------------------
    def next_version(self, name: str) -> int:
        entry = self.names.get(name)
        return entry.current + 1 if entry is not None else self.unloaded.get(name, 0) + 1

    def load(self, name: str, path: str, version: int, pin: bool = False) -> FleetIntent:
        out = self.model_copy(deep=True)
        entry = out.names.get(name)
        if entry is not None and version < entry.current:
            raise ValueError(f"version {version} of '{name}' is older than {entry.current}")
        if entry is None and version <= self.unloaded.get(name, 0):
            raise ValueError(
                f"version {version} of '{name}' is older than its last, {self.unloaded[name]}"
            )
        if entry is None:
            entry = out.names[name] = NameIntent(current=version)
        entry.current = version
        entry.versions[version] = VersionIntent(path=path, pinned=pin)
        if version in entry.unloaded_versions:
            entry.unloaded_versions.remove(version)
        out.unloaded.pop(name, None)
        out._prune(name)
        out.revision += 1
        return out

    def adopt(self, name: str, entry: Mapping[str, Any]) -> FleetIntent:
        """Record a name the replicas serve but no controller recorded (one given at
        start, ``--lora-modules``), as a replica reports it."""
        out = self.model_copy(deep=True)
        resident = _resident(entry)
        out.names[name] = NameIntent(
            current=entry["version"],
            versions={
                n: VersionIntent(path=v["path"], pinned=bool(v.get("pinned")))
                for n, v in resident.items()
                if v.get("path")
            },
            paused=entry.get("pause_mode") if entry.get("paused") else None,
        )
        out._prune(name)
        out.revision += 1
        return out

    def unload(self, name: str, version: int | None = None) -> FleetIntent:
        out = self.model_copy(deep=True)
        entry = out._entry(name)
        if version is None:
            del out.names[name]
            out.unloaded.pop(name, None)
            out.unloaded[name] = entry.current
            while len(out.unloaded) > TOMBSTONES:
                out.unloaded.pop(next(iter(out.unloaded)))
        else:
            if version == entry.current:
                raise ValueError(f"version {version} is the current version of '{name}'")
            entry.versions.pop(version, None)
            if version not in entry.unloaded_versions:
                entry.unloaded_versions = [*entry.unloaded_versions[-63:], version]
        out.revision += 1
        return out

    def pause(self, name: str, mode: PauseMode | None) -> FleetIntent:
        out = self.model_copy(deep=True)
        out._entry(name).paused = mode
        out.revision += 1
        return out

    def pin(self, name: str, version: int, pinned: bool) -> FleetIntent:
        out = self.model_copy(deep=True)
        entry = out._entry(name)
        if version not in entry.versions:
            raise KeyError(f"version {version} of '{name}' is not kept by the fleet")
        entry.versions[version].pinned = pinned
        out._prune(name)
        out.revision += 1
        return out

    def _entry(self, name: str) -> NameIntent:
        if name not in self.names:
            raise KeyError(f"adapter '{name}' is not loaded on the fleet")
        return self.names[name]

    def _prune(self, name: str) -> None:
        """Forget versions no replica keeps: below the window and not pinned."""
        entry = self.names[name]
        entry.versions = {
            n: v for n, v in entry.versions.items() if n in wanted_versions(entry, self.window)
        }

    # ---- what a replica should serve -----------------------------------------------------
    def retained(self, name: str) -> list[int]:
        return sorted(wanted_versions(self.names[name], self.window))


def wanted_versions(entry: NameIntent, window: int) -> set[int]:
    """The current version, the pinned ones, and those inside the window below it."""
    return {
        n
        for n, v in entry.versions.items()
        if n == entry.current or v.pinned or entry.current - window <= n < entry.current
    }


def _resident(have: Mapping[str, Any] | None) -> dict[int, Mapping[str, Any]]:
    if have is None:
        return {}
    return {v["version"]: v for v in have.get("versions", []) if not v.get("unloaded")}


def plan(desired: FleetIntent, actual: Adapters) -> list[Call]:
    """The control calls, in order, that make a replica serving ``actual`` serve
    ``desired``: unloads of unloaded names and versions; per name the missing kept
    versions in ascending order (a replica accepts only versions newer than its own),
    each under its number from its path; pins; then the pause state. Names the fleet
    never recorded are left alone; so is a version a replica cannot take any more (older
    than one it already serves: :func:`unreachable` names them)."""
    calls: list[Call] = []
    for name in desired.unloaded:
        if name in actual and name not in desired.names:
            calls.append(("unload_lora_adapter", {"lora_name": name}))
    for name, want in sorted(desired.names.items()):
        have = actual.get(name)
        resident = _resident(have)
        newest = max(resident, default=0)
        serving = (have or {}).get("version")
        stale = [n for n in want.unloaded_versions if n in resident]
        # Unloads first (they free slots), except the replica's current version: it can
        # go only once a load below has moved the current past it.
        calls += [_unload_version(name, n) for n in stale if n != serving]
        for n in desired.retained(name):
            v = want.versions[n]
            if n in resident:
                if v.pinned and not resident[n].get("pinned"):
                    calls.append(("pin_lora_adapter", {"lora_name": name, "version": n}))
                continue
            if n < newest:
                continue  # cannot go back: see unreachable()
            body = {"lora_name": name, "lora_path": v.path, "version": n, "pin": v.pinned}
            calls.append(("load_lora_adapter", body))
            newest = n
        if serving in stale and newest > serving:
            calls.append(_unload_version(name, serving))
        paused = (have or {}).get("paused") and (have or {}).get("pause_mode")
        if want.paused is not None and paused != want.paused:
            calls.append(("pause", {"lora_name": name, "mode": want.paused}))
        elif want.paused is None and paused:
            calls.append(("resume", {"lora_name": name}))
    return calls


def _unload_version(name: str, version: int) -> Call:
    return ("unload_lora_adapter", {"lora_name": name, "version": version})


def unreachable(desired: FleetIntent, actual: Adapters) -> list[str]:
    """Kept versions a replica cannot load any more (it already serves a newer one of the
    name): it serves without them (``name@N`` 404s there); the status names them."""
    out = []
    for name in desired.names:
        resident = _resident(actual.get(name))
        newest = max(resident, default=0)
        out += [f"{name}@{n}" for n in desired.retained(name) if n not in resident and n < newest]
    return out
