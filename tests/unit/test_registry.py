"""Versions, leases and retention: the bookkeeping that makes swaps safe."""

from __future__ import annotations

import pytest

from vllm_lora_ext.errors import LoraExtError, UnknownAdapterError
from vllm_lora_ext.server.registry import TOMBSTONES, Registry, split_version


def loaded(keep: int = 2, *paths: str) -> Registry:
    reg = Registry(keep_versions=keep, id_base=100)
    for p in paths or ("/a/1",):
        reg.commit(reg.new_version("meow", p))
    return reg


def evict(reg: Registry, name: str = "meow") -> list[int]:
    """What the manager does: drop every evictable version at once."""
    gone = reg.evictable(name)
    for v in gone:
        reg.drop(v)
    return [v.number for v in gone]


def test_versions_get_their_own_ids_and_internal_names():
    reg = loaded(2, "/a/1", "/a/2")
    a = reg.get("meow")
    assert a.current == 2
    assert [v.lora_int_id for v in a.versions.values()] == [100, 101]
    assert {v.internal_name for v in a.versions.values()} == {"meow@1", "meow@2"}


def test_admit_leases_current_version_and_release_is_idempotent():
    reg = loaded(1, "/a/1")
    f = reg.admit("meow", "r1")
    assert f.version.refcount == 1 and len(reg.get("meow").flights) == 1
    assert reg.release(f) is True
    assert reg.release(f) is False
    assert f.version.refcount == 0 and not reg.get("meow").flights


def test_lease_is_admit_of_a_served_unpaused_name_and_nothing_else():
    """The gate's fast path: the same lease as admit for a stable name that serves and
    is not paused; None (the general path decides) for anything else."""
    reg = loaded(2, "/a/1", "/a/2")
    f, g = reg.lease("meow", "r1"), reg.admit("meow", "r2")
    assert f is not None and f.version is g.version and f.version.number == 2
    assert not f.exact and f.request_id == "r1" and f.key != g.key
    assert f.version.refcount == 2 and set(reg.get("meow").flights) == {f.key, g.key}
    assert reg.release(f) and f.version.refcount == 1
    assert reg.lease("meow@1", "r") is None and reg.lease("woof", "r") is None
    reg.pause("meow", "wait")
    assert reg.lease("meow", "r3") is None
    reg.resume("meow")
    reg.unload("meow")
    assert reg.lease("meow", "r4") is None and g.version.refcount == 1


def test_requests_may_share_an_external_id():
    """vLLM accepts duplicate external ids; so do we, each with its own lease."""
    reg = loaded()
    a, b = reg.admit("meow", "rollout-0"), reg.admit("meow", "rollout-0")
    assert a.key != b.key and reg.get("meow").current_version.refcount == 2
    reg.release(a)
    assert reg.get("meow").flights == {b.key: b}


def test_old_version_evictable_only_when_idle_and_outside_window():
    reg = loaded(1, "/a/1")
    f = reg.admit("meow", "r1")  # in flight on v1
    reg.commit(reg.new_version("meow", "/a/2"))
    assert evict(reg) == []  # v1 still used
    reg.release(f)
    assert evict(reg) == [1]
    assert list(reg.get("meow").versions) == [2]


def test_window_keeps_newest_versions_even_when_idle():
    reg = loaded(2, "/a/1", "/a/2")
    assert evict(reg) == []
    reg.commit(reg.new_version("meow", "/a/3"))
    assert evict(reg) == [1]


def test_pinned_version_is_never_evicted():
    reg = loaded(1, "/a/1")
    reg.pin("meow", 1, True)
    reg.commit(reg.new_version("meow", "/a/2"))
    assert evict(reg) == []
    reg.pin("meow", 1, False)
    assert evict(reg) == [1]


def test_drop_refuses_a_version_in_use():
    reg = loaded(1, "/a/1")
    f = reg.admit("meow", "r1")
    with pytest.raises(RuntimeError):
        reg.drop(f.version)


def test_rebind_moves_a_continuing_request_to_the_current_version():
    reg = loaded(1, "/a/1")
    f = reg.admit("meow", "r1")
    reg.commit(reg.new_version("meow", "/a/2"))
    old = f.version
    reg.rebind(f)
    assert f.version.number == 2 and f.version.refcount == 1
    assert old.refcount == 0 and evict(reg) == [1]


def test_an_abort_is_never_downgraded_to_a_continue():
    reg = loaded()
    f = reg.admit("meow", "r1")
    assert reg.mark(f, "continue") == "continue"
    assert reg.mark(f, "abort") == "abort"
    assert reg.mark(f, "continue") == "abort" and f.interrupt == "abort"


def test_requests_of_a_name_include_held_ones():
    reg = loaded()
    f = reg.admit("meow", "r1")
    reg.pause("meow", "keep")
    w = reg.hold("meow", "r2")
    assert reg.requests("meow") == ([f], [w])
    reg.unhold(w)
    assert reg.requests("meow") == ([f], [])


def test_older_flights_skip_exact_and_current_ones():
    reg = loaded(3, "/a/1")
    old = reg.admit("meow", "r1")
    exact = reg.admit("meow", "r2", number=1)
    reg.commit(reg.new_version("meow", "/a/2"))
    new = reg.admit("meow", "r3")
    assert reg.older_flights("meow") == [old]
    assert new.version.number == 2 and exact.version.number == 1


def test_by_request_ids_finds_flights_and_held_requests_of_every_name():
    reg = loaded()
    reg.commit(reg.new_version("woof", "/w/1"))
    a = reg.admit("meow", "x")
    b = reg.admit("woof", "x")
    reg.admit("woof", "y")
    reg.pause("meow", "keep")
    w = reg.hold("meow", "x")
    flights, waiters = reg.by_request_ids(["x"])
    assert set(flights) == {a, b} and waiters == [w]


def test_unknown_names_and_bad_names():
    reg = loaded()
    with pytest.raises(UnknownAdapterError):
        reg.get("woof")
    with pytest.raises(UnknownAdapterError):
        reg.admit("meow", "r", number=7)
    with pytest.raises(LoraExtError):
        reg.new_version("me@ow", "/x")
    with pytest.raises(ValueError):
        Registry(keep_versions=0, id_base=1)


def test_explicit_version_numbers_must_grow():
    reg = loaded(2, "/a/1")
    assert reg.new_version("meow", "/a/5", number=5).number == 5
    with pytest.raises(LoraExtError) as err:
        reg.new_version("meow", "/a/1", number=1)
    assert err.value.status == 409
    reg.commit(reg.new_version("meow", "/a/7", number=7))
    assert reg.new_version("meow", "/a/8").number == 8


def test_a_failed_load_leaves_no_state():
    reg = Registry(keep_versions=2, id_base=1)
    reg.new_version("meow", "/a/1")  # never committed
    assert not reg.known("meow") and reg.sizes()["adapters"] == 0


def test_split_version():
    assert split_version("meow@3") == ("meow", 3)
    assert split_version("meow") == ("meow", None)
    assert split_version("a@b") == ("a@b", None)


def test_exact_request_uses_its_version_and_is_never_moved():
    reg = loaded(2, "/a/1", "/a/2")
    f = reg.admit("meow", "r1", number=1)
    assert f.version.number == 1 and f.exact
    reg.rebind(f)
    assert f.version.number == 1


def test_unload_one_version_evicts_it_once_idle():
    reg = loaded(3, "/a/1", "/a/2")
    f = reg.admit("meow", "r1", number=1)
    assert [v.number for v in reg.unload("meow", 1)] == [1]
    assert evict(reg) == []  # still in use
    with pytest.raises(UnknownAdapterError):
        reg.admit("meow", "r2", number=1)  # no new request may name it
    reg.release(f)
    assert evict(reg) == [1]


def test_unloading_the_current_version_is_refused():
    reg = loaded(2, "/a/1", "/a/2")
    with pytest.raises(LoraExtError) as err:
        reg.unload("meow", 2)
    assert err.value.status == 409
    with pytest.raises(UnknownAdapterError):
        reg.unload("meow", 9)


def test_unload_name_stops_resolving_ends_its_pause_and_drains():
    reg = loaded(2, "/a/1", "/a/2")
    f = reg.admit("meow", "r1")
    reg.pause("meow", "keep")
    reg.unload("meow")
    assert "meow" not in reg and reg.known("meow")
    assert evict(reg) == [1]
    with pytest.raises(UnknownAdapterError):
        reg.admit("meow", "r2")
    assert not reg.tidy("meow")  # r1 still runs on v2
    reg.release(f)
    assert evict(reg) == [2]
    assert reg.tidy("meow") and not reg.known("meow")
    # a later load continues the numbering and comes up unpaused
    reg.commit(reg.new_version("meow", "/a/3"))
    assert reg.get("meow").current == 3 and not reg.get("meow").paused


def test_forgotten_names_leave_bounded_state():
    reg = Registry(keep_versions=1, id_base=1)
    for i in range(TOMBSTONES + 50):
        name = f"tenant-{i}"
        reg.commit(reg.new_version(name, "/x"))
        reg.unload(name)
        evict(reg, name)
        assert reg.tidy(name)
    assert reg.sizes() == {
        "adapters": 0,
        "versions": 0,
        "flights": 0,
        "waiters": 0,
        "tombstones": TOMBSTONES,
    }
