"""Versions, leases and retention: the bookkeeping that makes swaps safe."""

from __future__ import annotations

import pytest

from vllm_lora_ext.errors import LoraExtError, UnknownAdapterError
from vllm_lora_ext.server.registry import Registry, split_pinned


def loaded(keep: int = 2, *paths: str) -> Registry:
    reg = Registry(keep_versions=keep, id_base=100)
    for p in paths or ("/a/1",):
        reg.commit(reg.new_version("meow", p))
    return reg


def test_versions_get_their_own_ids_and_internal_names():
    reg = loaded(2, "/a/1", "/a/2")
    a = reg.get("meow")
    assert a.current == 2
    assert [v.lora_int_id for v in a.versions.values()] == [100, 101]
    assert {v.internal_name for v in a.versions.values()} == {"meow@1", "meow@2"}
    assert reg.owner_of("meow@2") == "meow" and reg.owner_of("meow") == "meow"
    assert reg.owner_of("meow@9") is None and reg.owner_of("woof") is None


def test_admit_leases_current_version_and_release_is_idempotent():
    reg = loaded(1, "/a/1")
    f = reg.admit("meow", "r1")
    assert f.version.refcount == 1 and reg.in_flight("meow") == 1
    reg.release(f)
    reg.release(f)
    assert f.version.refcount == 0 and reg.in_flight("meow") == 0


def test_duplicate_request_id_is_refused_without_leaking():
    reg = loaded()
    reg.admit("meow", "r1")
    with pytest.raises(LoraExtError):
        reg.admit("meow", "r1")
    assert reg.get("meow").current_version.refcount == 1


def test_old_version_retired_only_when_idle_and_outside_window():
    reg = loaded(1, "/a/1")
    f = reg.admit("meow", "r1")  # in flight on v1
    retire = reg.commit(reg.new_version("meow", "/a/2"))
    assert retire == []  # v1 still used
    retire = reg.release(f)
    assert [v.number for v in retire] == [1]
    reg.drop(retire[0])
    assert list(reg.get("meow").versions) == [2]


def test_window_keeps_newest_versions_even_when_idle():
    reg = loaded(2, "/a/1", "/a/2")
    assert reg.retirable("meow") == []
    retire = reg.commit(reg.new_version("meow", "/a/3"))
    assert [v.number for v in retire] == [1]


def test_pinned_version_is_never_retired():
    reg = loaded(1, "/a/1")
    reg.get("meow").versions[1].pinned = True
    assert reg.commit(reg.new_version("meow", "/a/2")) == []


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
    retire = reg.rebind(f)
    assert f.version.number == 2 and f.version.refcount == 1
    assert old.refcount == 0 and [v.number for v in retire] == [1]


def test_pause_marks_flights_by_mode():
    reg = loaded()
    f = reg.admit("meow", "r1")
    assert reg.pause("meow", "keep") == [f] and f.interrupt == "continue"
    reg.resume("meow")
    f.interrupt = None
    reg.pause("meow", "abort")
    assert f.interrupt == "abort"
    f.interrupt = None
    reg.pause("meow", "wait")
    assert f.interrupt is None  # wait lets them finish
    assert reg.get("meow").paused


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


def test_version_numbers_never_repeat_after_retirement():
    reg = loaded(1, "/a/1", "/a/2")
    for v in reg.retirable("meow"):
        reg.drop(v)
    assert reg.new_version("meow", "/a/3").number == 3


def test_split_pinned():
    assert split_pinned("meow@3") == ("meow", 3)
    assert split_pinned("meow") == ("meow", None)
    assert split_pinned("a@b") == ("a@b", None)


def test_pinned_request_uses_its_version_and_is_never_moved():
    reg = loaded(2, "/a/1", "/a/2")
    f = reg.admit("meow", "r1", number=1)
    assert f.version.number == 1 and f.pinned
    assert reg.rebind(f) == [] and f.version.number == 1


def test_unload_one_version_retires_it_once_idle():
    reg = loaded(3, "/a/1", "/a/2")
    f = reg.admit("meow", "r1", number=1)
    assert reg.retire("meow", 1) == []  # still in use
    with pytest.raises(UnknownAdapterError):
        reg.admit("meow", "r2", number=1)  # no new request may pin it
    assert [v.number for v in reg.release(f)] == [1]


def test_unloading_the_current_version_is_refused():
    reg = loaded(2, "/a/1", "/a/2")
    with pytest.raises(LoraExtError) as err:
        reg.retire("meow", 2)
    assert err.value.status == 409
    with pytest.raises(UnknownAdapterError):
        reg.retire("meow", 9)


def test_unload_name_stops_resolving_and_drains():
    reg = loaded(2, "/a/1", "/a/2")
    f = reg.admit("meow", "r1")
    retire = reg.retire("meow")
    assert "meow" not in reg and [v.number for v in retire] == [1]
    reg.drop(retire[0])
    with pytest.raises(UnknownAdapterError):
        reg.admit("meow", "r2")
    assert [v.number for v in reg.release(f)] == [2]
    # a later load of the same name never reuses a number (or its internal name)
    assert reg.new_version("meow", "/a/3").number == 3
