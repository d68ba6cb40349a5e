"""The workers' leak-free LoRA safetensors reader: the same tensors as safetensors,
without the objects safetensors' torch loader keeps per tensor; active only when asked."""

from __future__ import annotations

import gc
import tracemalloc

import safetensors
import torch
from safetensors.torch import save_file

from vllm_lora_ext.server import worker_loader
from vllm_lora_ext.server.worker_loader import SafetensorsFile


def adapter_file(tmp_path) -> str:
    tensors = {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 64),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 8).to(
            torch.bfloat16
        ),
        "base_model.model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(8, 64).half(),
        "empty": torch.empty(0, 4),
    }
    path = str(tmp_path / "adapter_model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_reads_the_same_tensors_as_safetensors(tmp_path):
    path = adapter_file(tmp_path)
    with safetensors.safe_open(path, framework="pt") as theirs, SafetensorsFile(path) as ours:
        assert ours.keys() == list(theirs.keys())
        assert ours.metadata() == theirs.metadata()
        for key in theirs.keys():
            a, b = theirs.get_tensor(key), ours.get_tensor(key)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key


def test_keeps_nothing_per_tensor(tmp_path):
    path = adapter_file(tmp_path)

    def cycle() -> None:
        with SafetensorsFile(path) as f:
            {k: f.get_tensor(k) for k in f.keys()}

    # torch's own caches take a few KB over the first thousand reads and then stop
    # growing: warm them, then count what 2000 more reads keep.
    for _ in range(1000):
        cycle()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(2000):
        cycle()
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 20_000  # safetensors' own reader keeps ~440 KB here (4 tensors x 2000)


def test_installs_only_when_asked(monkeypatch):
    import vllm.lora.lora_model as lora_model

    original = lora_model.safetensors
    monkeypatch.delenv(worker_loader.ENV_FLAG, raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    worker_loader.install()
    assert lora_model.safetensors is original
    monkeypatch.setenv("VLLM_PLUGINS", "lora_ext")
    try:
        worker_loader.install()
        assert lora_model.safetensors.safe_open is SafetensorsFile
    finally:
        lora_model.safetensors = original
