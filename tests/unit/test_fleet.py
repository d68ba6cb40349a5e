"""The fleet's desired state and the planner that converges a replica to it: pure, so
explored with hypothesis over intent histories and replicas that missed any part of
them (down, restarting, a failed load), against a replica model with the server's
rules (a load must be newer than the name's versions; the current version cannot be
unloaded; an unloaded name forgets its pause)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from exploration import SEED, announce, examples
from hypothesis import example, given, seed, settings
from hypothesis import strategies as st

from ray_actors.fleet import FleetIntent, plan, unreachable


@dataclass
class Replica:
    """What one server does with the control calls (its registry's rules)."""

    names: dict[str, dict] = field(default_factory=dict)

    def apply(self, route: str, body: dict) -> int:
        name = body["lora_name"]
        entry = self.names.get(name)
        if route == "load_lora_adapter":
            n = body["version"]
            if entry is not None and n <= max(entry["versions"], default=0):
                return 409
            if entry is None:
                entry = self.names[name] = {"current": n, "versions": {}, "paused": None}
            entry["current"] = n
            entry["versions"][n] = {"path": body["lora_path"], "pinned": body.get("pin", False)}
            return 200
        if entry is None:
            return 404
        if route == "unload_lora_adapter":
            if "version" not in body:
                del self.names[name]
            elif body["version"] == entry["current"]:
                return 409
            else:
                entry["versions"].pop(body["version"], None)
        elif route == "pin_lora_adapter":
            entry["versions"][body["version"]]["pinned"] = True
        elif route == "pause":
            entry["paused"] = body["mode"]
        elif route == "resume":
            entry["paused"] = None
        return 200

    def adapters(self) -> dict[str, dict]:
        return {
            name: {
                "lora_name": name,
                "version": e["current"],
                "paused": e["paused"] is not None,
                "pause_mode": e["paused"],
                "versions": [
                    {"version": n, "path": v["path"], "pinned": v["pinned"], "unloaded": False}
                    for n, v in sorted(e["versions"].items())
                ],
            }
            for name, e in self.names.items()
        }


NAMES = ["meow", "woof"]
op = st.one_of(
    st.tuples(st.just("load"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("unload"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("pause"), st.sampled_from(NAMES), st.sampled_from(["keep", "abort", None])),
    st.tuples(st.just("pin"), st.sampled_from(NAMES), st.integers(0, 3)),
)


def record(intent: FleetIntent, step: tuple) -> FleetIntent:
    kind, name, arg = step
    try:
        if kind == "load":
            n = intent.next_version(name)
            return intent.load(name, f"/ckpt/{name}/{n}", n, pin=arg)
        if kind == "unload":
            entry = intent.names[name]
            older = [n for n in entry.versions if n != entry.current]
            return intent.unload(name, older[0] if arg and older else None)
        if kind == "pause":
            return intent.pause(name, arg)
        entry = intent.names[name]
        return intent.pin(name, max(entry.current - arg, 1), True)
    except (KeyError, ValueError):  # refused: nothing recorded
        return intent


@example(  # found in CI: a pause planned after the name's load failed in that check
    window=0,
    history=[("load", "meow", False), ("pause", "meow", "keep")],
    seen=[False, False],
    failures=[True],
)
@example(  # found in CI: a replica missed an unload, then the name was loaded again
    window=0,
    history=[
        ("load", "woof", False),
        ("load", "woof", False),
        ("unload", "woof", False),
        ("load", "woof", False),
    ],
    seen=[True, True, False, True],
    failures=[],
)
@example(  # found in CI: an unloaded older version was the current one of a replica
    # that missed the newer load, and that load failed in every check
    window=1,
    history=[("load", "woof", False), ("load", "woof", False), ("unload", "woof", True)],
    seen=[True, False, False],
    failures=[True, True, True],
)
@seed(SEED)
@settings(max_examples=examples(local=600, ci=3000), deadline=None, derandomize=False)
@given(
    window=st.integers(0, 2),
    history=st.lists(op, max_size=25),
    seen=st.lists(st.booleans(), max_size=25),
    failures=st.lists(st.booleans(), max_size=40),
)
def _converges(window, history, seen, failures):
    """Each call of the history reached the replica or not (it was down); some of the
    reconcile's own calls fail once (retried next check). Planning again after each
    check, a replica matches the fleet for everything it can still take, and a matched
    replica plans nothing."""
    intent = FleetIntent(window=window)
    replica = Replica()
    for i, step in enumerate(history):
        before = intent
        intent = record(intent, step)
        if intent is not before and (seen[i] if i < len(seen) else True):
            for route, body in plan(intent, replica.adapters()):  # the fan-out's effect
                replica.apply(route, body)
    flaky = iter(failures)
    for _check in range(3):
        skipped = False
        for route, body in plan(intent, replica.adapters()):
            if next(flaky, False):
                skipped = True
                continue  # this call failed: the next check plans it again
            status = replica.apply(route, body)
            # A call after a failed one may fail as its consequence (a pause of a name
            # whose load failed): the reconcile reports it and the next check retries.
            assert status == 200 or skipped, (route, body, replica.names)
    for route, body in plan(intent, replica.adapters()):
        assert replica.apply(route, body) == 200, (route, body)
    assert plan(intent, replica.adapters()) == []
    have = replica.adapters()
    missing = set(unreachable(intent, have))
    for name, want in intent.names.items():
        assert have[name]["version"] == want.current
        assert have[name]["pause_mode"] == want.paused
        resident = {v["version"]: v for v in have[name]["versions"]}
        for n in intent.retained(name):
            if f"{name}@{n}" in missing:
                continue
            assert resident[n]["path"] == want.versions[n].path
            assert resident[n]["pinned"] or not want.versions[n].pinned
        for n in want.unloaded_versions:
            assert n not in resident
    for name in intent.unloaded:
        assert name not in have


def test_a_replica_that_missed_anything_converges_in_one_plan():
    announce()
    _converges()


def test_a_restarted_replica_gets_the_window_pins_and_pause():
    intent = FleetIntent(window=1)
    for n in (1, 2, 3, 4):
        intent = intent.load("meow", f"/ckpt/{n}", n, pin=(n == 1))
    intent = intent.pause("meow", "keep").load("woof", "/w/1", 1).unload("woof")
    calls = plan(intent, {})
    assert calls == [
        (
            "load_lora_adapter",
            {"lora_name": "meow", "lora_path": "/ckpt/1", "version": 1, "pin": True},
        ),
        (
            "load_lora_adapter",
            {"lora_name": "meow", "lora_path": "/ckpt/3", "version": 3, "pin": False},
        ),
        (
            "load_lora_adapter",
            {"lora_name": "meow", "lora_path": "/ckpt/4", "version": 4, "pin": False},
        ),
        ("pause", {"lora_name": "meow", "mode": "keep"}),
    ]
    assert intent.retained("meow") == [1, 3, 4] and 2 not in intent.names["meow"].versions


def test_drift_on_a_live_replica_is_planned_away():
    """A replica that missed meow@13 and a later unload of woof, still paused after the
    fleet resumed: it gets 13, loses woof, resumes."""
    intent = FleetIntent(window=1).load("meow", "/c/12", 12).load("woof", "/w/1", 1)
    replica = Replica()
    for route, body in plan(intent.pause("meow", "abort"), {}):
        replica.apply(route, body)
    intent = intent.load("meow", "/c/13", 13).unload("woof")
    assert plan(intent, replica.adapters()) == [
        ("unload_lora_adapter", {"lora_name": "woof"}),
        (
            "load_lora_adapter",
            {"lora_name": "meow", "lora_path": "/c/13", "version": 13, "pin": False},
        ),
        ("resume", {"lora_name": "meow"}),
    ]


def test_refused_intents_record_nothing():
    intent = FleetIntent().load("meow", "/c/3", 3)
    with pytest.raises(ValueError, match="older"):
        intent.load("meow", "/c/2", 2)
    with pytest.raises(ValueError, match="current"):
        intent.unload("meow", 3)
    with pytest.raises(KeyError):
        intent.pause("nope", "keep")
    assert intent.revision == 1


def test_a_version_a_replica_cannot_take_any_more_is_named():
    intent = FleetIntent(window=1).load("meow", "/c/12", 12).load("meow", "/c/13", 13)
    have = Replica()
    have.apply("load_lora_adapter", {"lora_name": "meow", "lora_path": "/c/13", "version": 13})
    assert plan(intent, have.adapters()) == []
    assert unreachable(intent, have.adapters()) == ["meow@12"]


def test_a_name_given_at_start_is_adopted_as_a_replica_serves_it():
    replica = Replica()
    replica.apply("load_lora_adapter", {"lora_name": "woof", "lora_path": "/w", "version": 1})
    replica.apply("pause", {"lora_name": "woof", "mode": "abort"})
    intent = FleetIntent().adopt("woof", replica.adapters()["woof"])
    assert intent.names["woof"].current == 1 and intent.names["woof"].paused == "abort"
    assert plan(intent, replica.adapters()) == []
    assert plan(intent.pause("woof", None), replica.adapters()) == [
        ("resume", {"lora_name": "woof"})
    ]
