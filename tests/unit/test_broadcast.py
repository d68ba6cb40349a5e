"""The filesystem broadcast under fault injection: partial steps are never taken for
complete ones, and retention never deletes a step in use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fakes import write_adapter
from pydantic import ValidationError

from vllm_lora_ext import broadcast
from vllm_lora_ext.broadcast import (
    CorruptStepError,
    NotReadyError,
    PublishConflictError,
    RetentionConfig,
    clean,
    newest_stable,
    publish,
    step_dir,
    verify_step,
)


def adapter(tmp_path: Path, tag: str = "a") -> Path:
    d = write_adapter(tmp_path / f"src-{tag}")
    (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes() + tag.encode() * 64
    )
    return d


def test_publish_writes_manifest_then_sentinel(tmp_path):
    root = tmp_path / "root"
    out = publish(adapter(tmp_path), root, 3)
    assert out.path == step_dir(root, 3)
    names = sorted(p.name for p in out.path.iterdir())
    assert names == ["STABLE", "adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    sentinel = json.loads((out.path / "STABLE").read_text())
    assert sentinel == {"manifest": "manifest.json", "sha256": out.manifest_sha256}
    manifest = verify_step(out.path)
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert not list(root.glob(".*"))  # no temporary left behind


def test_publish_state_dict_and_peft_model(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    sd = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 4)}
    out = publish((sd, {"r": 2, "target_modules": ["q_proj"]}), tmp_path / "r", 0)
    assert json.loads((out.path / "adapter_config.json").read_text())["r"] == 2
    verify_step(out.path)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)

    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    out = publish(model, tmp_path / "r", 1)
    assert (out.path / "adapter_model.safetensors").stat().st_size > 0
    verify_step(out.path)


def test_sentinel_without_files_is_not_ready(tmp_path):
    step = tmp_path / "step_1"
    step.mkdir()
    (step / "STABLE").write_text(json.dumps({"manifest": "manifest.json", "sha256": "x"}))
    with pytest.raises(NotReadyError, match=r"manifest\.json"):
        verify_step(step)
    manifest = {"step": 1, "files": {"adapter_model.safetensors": {"size": 3, "sha256": "y"}}}
    raw = json.dumps(manifest).encode()
    (step / "manifest.json").write_bytes(raw)
    sha = broadcast.hashlib.sha256(raw).hexdigest()
    (step / "STABLE").write_text(json.dumps({"manifest": "manifest.json", "sha256": sha}))
    with pytest.raises(NotReadyError, match=r"adapter_model.safetensors' listed .* not visible"):
        verify_step(step)


def test_files_without_sentinel_are_not_ready(tmp_path):
    out = publish(adapter(tmp_path), tmp_path / "root", 2)
    (out.path / "STABLE").unlink()
    with pytest.raises(NotReadyError, match="no STABLE"):
        verify_step(out.path)
    assert newest_stable(tmp_path / "root") is None


def test_truncated_file_is_not_ready_and_flipped_byte_is_corrupt(tmp_path):
    out = publish(adapter(tmp_path), tmp_path / "root", 2)
    f = out.path / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(NotReadyError, match="bytes so far"):
        verify_step(out.path)
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptStepError, match="xxh3_128"):
        verify_step(out.path)


def test_copy_verified_copies_exactly_the_manifest_or_refuses(tmp_path):
    out = publish(adapter(tmp_path), tmp_path / "root", 2)
    manifest = verify_step(out.path, check_sums=False)
    broadcast.copy_verified(out.path, tmp_path / "copy", manifest)
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(manifest["files"])
    for name in manifest["files"]:
        assert (tmp_path / "copy" / name).read_bytes() == (out.path / name).read_bytes()
    f = out.path / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1  # same size: only the hash of the copied bytes can tell
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptStepError, match=r"adapter_model\.safetensors.*xxh3_128"):
        broadcast.copy_verified(out.path, tmp_path / "copy2", manifest)


def test_sha256_manifests_from_other_publishers_are_still_verified(tmp_path):
    out = publish(adapter(tmp_path), tmp_path / "root", 2)
    manifest = verify_step(out.path)
    for name, meta in manifest["files"].items():
        meta.pop("xxh3_128")
        meta["sha256"] = broadcast.sha256_of(out.path / name)
    broadcast.copy_verified(out.path, tmp_path / "ok", manifest)
    manifest["files"]["adapter_config.json"]["sha256"] = "0" * 64
    with pytest.raises(CorruptStepError, match=r"adapter_config\.json.*sha256"):
        broadcast.copy_verified(out.path, tmp_path / "bad", manifest)
    manifest["files"]["adapter_config.json"] = {"size": 3, "md5": "x"}
    with pytest.raises(CorruptStepError, match="no known checksum"):
        broadcast.copy_verified(out.path, tmp_path / "bad2", manifest)


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "sub/x", "..", ""])
def test_manifest_names_outside_the_step_are_refused(tmp_path, name):
    out = publish(adapter(tmp_path), tmp_path / "root", 2)
    manifest = {"step": 2, "files": {name: {"size": 3, "xxh3_128": "0"}}}
    with pytest.raises(CorruptStepError, match="not a file name"):
        broadcast.copy_verified(out.path, tmp_path / "copy", manifest)
    assert not (tmp_path / "escape").exists()


def test_publisher_killed_between_files_and_sentinel_leaves_no_stable_step(tmp_path):
    root = tmp_path / "root"
    publish(adapter(tmp_path, "old"), root, 1)
    code = (
        "import os, sys; from vllm_lora_ext import broadcast as b; "
        "b._write_atomic = lambda *a: os._exit(9); "
        "b.publish(sys.argv[1], sys.argv[2], 2)"
    )
    src = adapter(tmp_path, "new")
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(root)], timeout=60)
    assert proc.returncode == 9
    assert (root / "step_2" / "manifest.json").exists()  # the data landed, no sentinel
    assert newest_stable(root) == root / "step_1"
    with pytest.raises(NotReadyError):
        verify_step(root / "step_2")


def test_two_trainers_publishing_one_step(tmp_path):
    root = tmp_path / "root"
    src = adapter(tmp_path)
    errors: list[BaseException] = []

    def go() -> None:
        try:
            publish(src, root, 5)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    verify_step(root / "step_5")
    with pytest.raises(PublishConflictError, match="different content"):
        publish(adapter(tmp_path, "other"), root, 5)
    verify_step(root / "step_5")  # the first content still stands


def test_retention_window_must_cover_staleness():
    assert RetentionConfig(max_async_level=2).window == 3
    with pytest.raises(ValidationError, match="adapter not found"):
        RetentionConfig(max_async_level=2, keep_recent=2)


def test_clean_keeps_the_window_and_leased_steps(tmp_path):
    root = tmp_path / "root"
    src = adapter(tmp_path)
    for n in range(6):
        publish(src, root, n)
    lease = broadcast.acquire_lease(root / "step_1", "server-a")
    stale = broadcast.acquire_lease(root / "step_2", "server-dead")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    removed = clean(root, 5, RetentionConfig(max_async_level=1), lease_ttl_s=600)
    assert removed == [0, 2, 3]  # oldest first; the leased step survives
    assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_4", "step_5"]
    verify_step(root / "step_1")
    broadcast.release_lease(lease)
    assert clean(root, 5, RetentionConfig(max_async_level=1)) == [1]


def test_cleaner_racing_a_load_puts_the_step_back(tmp_path, monkeypatch):
    root = tmp_path / "root"
    src = adapter(tmp_path)
    for n in range(3):
        publish(src, root, n)
    real = broadcast.live_leases
    raced = []

    def racing(step, ttl_s):
        found = real(step, ttl_s)
        if Path(step).name == "step_0" and not raced:
            raced.append(broadcast.acquire_lease(step, "loader"))  # lands after the look
        return found

    monkeypatch.setattr(broadcast, "live_leases", racing)
    assert clean(root, 2, RetentionConfig(max_async_level=0)) == [1]
    verify_step(root / "step_0")  # put back whole
    assert (root / "step_0" / ".leases" / "loader").exists()
