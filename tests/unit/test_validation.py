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


def _weights(d, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"r": 8, "rank_pattern": [4]}, "rank_pattern must be an object"),
        ({"r": 8, "rank_pattern": {"q_proj": "4"}}, "invalid rank"),
        ({"r": 8, "alpha_pattern": "x"}, "alpha_pattern must be an object"),
        ({"r": 8, "lora_alpha": "16"}, "invalid lora_alpha"),
        ({"r": True}, "invalid rank"),
        ({"r": 8, "target_modules": [1, 2]}, "target_modules must be"),
    ],
)
def test_config_fields_of_the_wrong_type_are_400_not_500(tmp_path, config, needle):
    d = write_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidAdapterError) as err:
        check_adapter_dir(str(d), 16)
    assert err.value.status == 400 and needle in err.value.message


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"dtype": "F32", "shape": [4], "data_offsets": ["0", 16]}, "corrupt entry"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16]}, "corrupt entry"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [True, 16]}, "corrupt entry"),
        ({"dtype": "F4", "shape": [4], "data_offsets": [0, 16]}, "unsupported dtype"),
        ({"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}, "does not fill"),
        ({"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}, "invalid shape"),
    ],
)
def test_tensor_entries_of_the_wrong_type_or_size_are_400(tmp_path, entry, needle):
    d = write_adapter(tmp_path / "a")
    _weights(d, {"x.lora_A.weight": entry}, bytes(16))
    with pytest.raises(InvalidAdapterError) as err:
        check_adapter_dir(str(d), 16)
    assert err.value.status == 400 and needle in err.value.message


def test_header_errors_print_no_bytes_of_the_file(tmp_path):
    d = write_adapter(tmp_path / "a")
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 6) + b"\xffSECRET")
    with pytest.raises(InvalidAdapterError) as err:
        check_adapter_dir(str(d), 16)
    assert "SECRET" not in err.value.message and "0xff" not in err.value.message


def test_a_base_model_with_a_bad_header_skips_the_module_check(tmp_path):
    """A corrupt header in the base model must not crash our start-up (it did: a 500
    in a header's data_offsets became a TypeError in init_state)."""
    model = tmp_path / "model"
    model.mkdir()
    entry = {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]}
    raw = json.dumps({"model.q_proj.weight": entry}).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    assert model_module_names(str(model)) is None
