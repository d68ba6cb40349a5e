"""What a load may read: every file under a root once resolved, opened without following
a link, only an adapter's own files staged; servers sharing a stage_dir keep apart."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from fakes import FakeEngine, write_adapter

from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.errors import LoraExtError
from vllm_lora_ext.server import files
from vllm_lora_ext.server.manager import LoraManager


async def manager(tmp_path: Path, **cfg) -> LoraManager:
    m = LoraManager(FakeEngine(), LoraExtConfig(keep_versions=1, **cfg))
    m.install()
    return m


@pytest.fixture
def roots(tmp_path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    write_adapter(outside / "secret")
    return allowed, outside


async def test_a_file_linked_out_of_the_roots_is_refused_before_it_is_read(tmp_path, roots):
    allowed, outside = roots
    m = await manager(tmp_path, lora_roots=[allowed])
    try:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            d = write_adapter(allowed / f"via_{name}")
            (d / name).unlink()
            (outside / "secret" / name).write_bytes(b"\x89PNG garbage not json")
            (d / name).symlink_to(outside / "secret" / name)
            with pytest.raises(LoraExtError) as err:
                await m.load("meow", str(d))
            assert err.value.status == 403, err.value.message
            assert "PNG" not in err.value.message and "0x89" not in err.value.message
        assert "meow" not in m.registry
        # A link that stays inside the roots is fine.
        inside = write_adapter(allowed / "real")
        d = allowed / "linked"
        d.mkdir()
        for name in os.listdir(inside):
            (d / name).symlink_to(inside / name)
        assert (await m.load("meow", str(d))).version.number == 1
    finally:
        await m.shutdown()


async def test_only_an_adapters_own_files_are_staged_and_links_are_not_followed(tmp_path, roots):
    allowed, _ = roots
    m = await manager(tmp_path, lora_roots=[allowed])
    try:
        d = write_adapter(allowed / "ckpt")
        (d / "optimizer.pt").write_bytes(b"x" * 1000)
        (d / "checkpoint-100").mkdir()
        (d / "checkpoint-100" / "adapter_model.safetensors").write_bytes(b"x")
        (d / "everything").symlink_to("/")
        (d / "tokenizer.json").write_text("{}")
        staged = Path((await m.load("meow", str(d))).version.load_path)
        assert sorted(os.listdir(staged)) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
        ]
    finally:
        await m.shutdown()


def test_a_component_swapped_for_a_link_after_the_check_is_not_followed(tmp_path, roots):
    allowed, outside = roots
    d = write_adapter(allowed / "a")
    real = files.under_roots(d / "adapter_config.json", [allowed])
    # Between the check and the open, the directory becomes a link out of the root.
    shutil.rmtree(d)
    d.symlink_to(outside / "secret")
    with pytest.raises(LoraExtError, match="without following a link"):
        files.open_nofollow(real)
    with pytest.raises(LoraExtError) as err:
        files.under_roots(d / "adapter_config.json", [allowed])
    assert err.value.status == 403


def test_nul_bytes_and_unresolvable_paths_are_400(tmp_path):
    for bad in ("/a\x00b", "x\x00"):
        with pytest.raises(LoraExtError) as err:
            files.under_roots(bad, [tmp_path])
        assert err.value.status == 400


async def test_nul_byte_in_lora_path_is_a_400_with_and_without_roots(tmp_path):
    for cfg in ({}, {"lora_roots": [tmp_path]}):
        m = await manager(tmp_path, **cfg)
        try:
            with pytest.raises(LoraExtError) as err:
                await m.load("meow", str(tmp_path) + "/x\x00y")
            assert err.value.status == 400 and "NUL" in err.value.message
        finally:
            await m.shutdown()


async def test_servers_sharing_a_stage_dir_never_touch_each_others_copies(tmp_path):
    shared = tmp_path / "stage"
    a = await manager(tmp_path, stage_dir=shared)
    b = await manager(tmp_path, stage_dir=shared)
    try:
        src = str(write_adapter(tmp_path / "src"))
        va = (await a.load("meow", src)).version
        vb = (await b.load("meow", src)).version
        assert va.load_path != vb.load_path  # both are their server's first copy
        assert a.staging.root != b.staging.root and a.staging.root.parent == shared
        # b's failing load (same serial as a's next) cleans up only its own copy.
        b.engine.fail_add = RuntimeError("engine says no")
        with pytest.raises(LoraExtError):
            await b.load("meow", src)
        va2 = (await a.load("meow", src)).version
        assert os.listdir(va2.load_path) and os.listdir(vb.load_path)
    finally:
        await a.shutdown()
        await b.shutdown()
    assert not os.listdir(shared)
