"""Adapter directory checks that turn vLLM's 500s into named 4xx errors."""

from __future__ import annotations

import json
import struct

import pytest
from fakes import write_adapter

from vllm_lora_ext.errors import InvalidAdapterError
from vllm_lora_ext.server.validation import check_adapter_dir, model_module_names


def test_valid_adapter_passes(tmp_path):
    cfg = check_adapter_dir(str(write_adapter(tmp_path / "a")), 16)
    assert cfg["r"] == 8


@pytest.mark.parametrize(
    ("mutate", "status", "needle"),
    [
        (lambda d: (d / "adapter_config.json").unlink(), 400, "adapter_config.json"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), 400, "no adapter weights"),
        (lambda d: (d / "adapter_config.json").write_text("[1]"), 400, "not a JSON object"),
        (lambda d: (d / "adapter_config.json").write_text('{"r": 0}'), 400, "invalid rank"),
        (lambda d: (d / "adapter_config.json").write_text('{"r": 64}'), 400, "exceeds"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"abc"), 400, "too short"),
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 10**9)),
            400,
            "header length",
        ),
    ],
)
def test_broken_adapters_are_named(tmp_path, mutate, status, needle):
    d = write_adapter(tmp_path / "a")
    mutate(d)
    with pytest.raises(InvalidAdapterError) as err:
        check_adapter_dir(str(d), 16)
    assert err.value.status == status and needle in err.value.message


def test_tensor_past_end_of_file_is_truncation(tmp_path):
    d = write_adapter(tmp_path / "a")
    header = json.dumps(
        {"x.lora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    )
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())
    with pytest.raises(InvalidAdapterError, match="truncated"):
        check_adapter_dir(str(d), 16)


def test_missing_path_is_404(tmp_path):
    with pytest.raises(InvalidAdapterError) as err:
        check_adapter_dir(str(tmp_path / "nope"), 16)
    assert err.value.status == 404


def test_target_modules_must_exist_in_the_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    header = json.dumps(
        {
            "model.layers.0.self_attn.q_proj.weight": {
                "dtype": "F32",
                "shape": [0],
                "data_offsets": [0, 0],
            }
        }
    )
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())
    modules = model_module_names(str(model))
    assert modules == {"q_proj"}
    check_adapter_dir(str(write_adapter(tmp_path / "ok")), 16, modules)
    bad = write_adapter(tmp_path / "bad")
    (bad / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["v_proj"]}))
    with pytest.raises(InvalidAdapterError, match="lacks: v_proj"):
        check_adapter_dir(str(bad), 16, modules)
    assert model_module_names(str(tmp_path / "not-local")) is None
