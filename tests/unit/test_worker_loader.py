"""The workers' leak-free LoRA safetensors reader: the same tensors as safetensors,
without the objects safetensors' torch loader keeps per tensor; active only when asked."""

from __future__ import annotations

import gc
import json
import os
import shutil
import struct
import tracemalloc

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from vllm_lora_ext.server import worker_loader
from vllm_lora_ext.server.worker_loader import SafetensorsFile


def adapter_file(tmp_path) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
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
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from vllm_lora_ext.server import worker_plugin

    original = lora_model.safetensors
    logits = PunicaWrapperCPU.add_lora_logits
    monkeypatch.delenv(worker_loader.ENV_FLAG, raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    worker_plugin.install()
    assert lora_model.safetensors is original and PunicaWrapperCPU.add_lora_logits is logits
    monkeypatch.setenv("VLLM_PLUGINS", "lora_ext")
    try:
        worker_plugin.install()
        assert lora_model.safetensors.safe_open is SafetensorsFile
        assert PunicaWrapperCPU.add_lora_logits is not logits
    finally:
        lora_model.safetensors = original
        PunicaWrapperCPU.add_lora_logits = logits


def _dtypes_torch_has() -> list[torch.dtype]:
    names = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8"]
    names += ["uint64", "uint32", "uint16", "uint8", "bool"]
    names += ["float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


def test_every_safetensors_dtype_reads_as_safetensors_does(tmp_path):
    tensors = {}
    for i, dtype in enumerate(_dtypes_torch_has()):
        tensors[f"t{i}"] = (torch.rand(3, 5) * 100).to(dtype)
    path = str(tmp_path / "all.safetensors")
    save_file(tensors, path)
    with safetensors.safe_open(path, framework="pt") as theirs, SafetensorsFile(path) as ours:
        for key in theirs.keys():
            a, b = theirs.get_tensor(key), ours.get_tensor(key)
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key


def _raw_file(path, header: dict, data: bytes, pad: int = 0) -> str:
    raw = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def test_unaligned_tensors_are_read_right(tmp_path):
    values = torch.arange(6, dtype=torch.float32)
    header = {"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]}}
    for pad in range(4):  # every alignment of the data section
        path = _raw_file(tmp_path / f"u{pad}", header, b"\0" + values.numpy().tobytes(), pad)
        with SafetensorsFile(path) as f:
            assert torch.equal(f.get_tensor("x").flatten(), values)


def test_a_bad_file_is_a_clear_error_not_a_crash(tmp_path):
    data = bytes(24)
    bad = {
        "unknown dtype": {"x": {"dtype": "F4", "shape": [6], "data_offsets": [0, 24]}},
        "shape and span disagree": {"x": {"dtype": "F32", "shape": [7], "data_offsets": [0, 24]}},
        "past the end": {"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}},
        "offsets not ints": {"x": {"dtype": "F32", "shape": [6], "data_offsets": ["0", 24]}},
        "shape not ints": {"x": {"dtype": "F32", "shape": "6", "data_offsets": [0, 24]}},
    }
    for what, header in bad.items():
        path = _raw_file(tmp_path / "bad", header, data)
        with pytest.raises(ValueError, match="bad safetensors entry"):
            SafetensorsFile(path)
            pytest.fail(what)


def test_tensors_outlive_a_rewrite_of_the_file(tmp_path):
    """Read, not mapped: a trainer truncating or rewriting the file in place changes
    nothing already loaded (a private mapping would SIGBUS on the truncated pages)."""
    path = adapter_file(tmp_path)
    with SafetensorsFile(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    copies = {k: t.clone() for k, t in tensors.items()}
    os.truncate(path, 8)
    with open(path, "r+b") as out:
        out.write(b"\xff" * 8)
    for k, t in tensors.items():
        assert torch.equal(t, copies[k]), k


def test_prompt_logit_rows_that_map_to_no_request_get_no_lora_delta():
    """vLLM's CPU LoRA logits path maps rows with one index per request; prompt logits
    have one row per prompt token (the einsum failed and the engine died)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from vllm_lora_ext.server import prompt_logprobs

    original = PunicaWrapperCPU.add_lora_logits
    calls = []
    PunicaWrapperCPU.add_lora_logits = lambda self, y, x, *a, **k: calls.append(x.shape)
    try:
        prompt_logprobs.install()
        wrapper = PunicaWrapperCPU.__new__(PunicaWrapperCPU)
        wrapper._sampler_indices = torch.tensor([0, 1, 0, 0])
        wrapper.indices_len = [0, 2]  # two requests sampled in this batch
        y = torch.zeros(5, 7)
        PunicaWrapperCPU.add_lora_logits(wrapper, y, torch.ones(5, 3), None, None, 1.0)
        assert calls == [] and not y.any()  # 5 prompt rows: no delta, no failure
        PunicaWrapperCPU.add_lora_logits(wrapper, y, torch.ones(2, 3), None, None, 1.0)
        assert calls == [(2, 3)]  # one row per request: vLLM's own path
    finally:
        PunicaWrapperCPU.add_lora_logits = original


def test_lm_head_adapters_are_refused_on_the_cpu_backend(tmp_path, monkeypatch):
    from fakes import write_adapter

    from vllm_lora_ext.errors import InvalidAdapterError
    from vllm_lora_ext.server import prompt_logprobs
    from vllm_lora_ext.server.validation import check_adapter_dir

    d = write_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["lm_head"]}))
    monkeypatch.setattr(prompt_logprobs, "on_cpu", lambda: True)
    with pytest.raises(InvalidAdapterError, match="lm_head"):
        check_adapter_dir(str(d), 16)
    monkeypatch.setattr(prompt_logprobs, "on_cpu", lambda: False)
    check_adapter_dir(str(d), 16)


def test_only_the_servers_own_staged_copies_are_mapped(tmp_path):
    from vllm_lora_ext.server import staging

    assert worker_loader.STAGE_PREFIX == staging.PREFIX
    stage, fd = staging.owned_dir(tmp_path)
    try:
        (stage / "v1").mkdir()
        staged = stage / "v1" / "adapter_model.safetensors"
        trainer = adapter_file(tmp_path / "trainer")
        shutil.copyfile(trainer, staged)
        with SafetensorsFile(staged) as ours, SafetensorsFile(trainer) as theirs:
            assert ours.mapped and not theirs.mapped
            for key in ours.keys():
                assert torch.equal(ours.get_tensor(key), theirs.get_tensor(key)), key
        # A directory merely named like one, with an owner file nobody locks, is not.
        fake = tmp_path / f"{staging.PREFIX}fake"
        fake.mkdir()
        (fake / ".owner").write_text("")
        shutil.copyfile(staged, fake / "a.safetensors")
        assert not SafetensorsFile(fake / "a.safetensors").mapped
    finally:
        os.close(fd)
