"""Every bad input is a 4xx with a JSON error naming the problem, and leaves the
previous state serving: the adapter still answers with its old weights, nothing new is
registered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from engine_helpers import complete, loras, post, words


@pytest.mark.parametrize(
    ("path", "payload", "status", "needle"),
    [
        ("abort_lora_requests", {"lora_name": "nope"}, 404, "unknown adapter 'nope'"),
        ("pause", {"lora_name": "nope"}, 404, "unknown adapter 'nope'"),
        ("resume", {"lora_name": "nope"}, 404, "unknown adapter 'nope'"),
        ("pause", {"lora_name": "meow", "mode": "sleep"}, 400, "mode"),
        ("pause", {"lora_name": "meow", "mode": "wait", "timeout_s": -1}, 400, "timeout_s"),
        ("pause", {"lora_name": "", "mode": "keep"}, 400, "lora_name"),
        ("abort_lora_requests", {}, 400, "lora_name"),
        ("abort_lora_requests", {"lora_name": 3}, 400, "lora_name"),
        ("abort_lora_requests", {"lora_name": "meow", "extra": 1}, 400, "extra"),
        ("load_lora_adapter", {"lora_name": "meow"}, 400, "lora_path"),
    ],
)
async def test_control_routes_reject_bad_bodies(client, path, payload, status, needle):
    err = await post(client, path, payload, status)
    assert needle in err["error"]["message"]


async def test_non_json_body_is_a_400(client):
    r = await client.post(
        "/skyrl/v1/pause", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]


def _copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bad_adapters(toy, tmp: Path) -> list[tuple[str, str, int, str]]:
    meow = toy.adapters["meow"]
    cases = [("/does/not/exist", 404, "does not exist")]
    a_file = tmp / "file"
    a_file.write_text("x")
    cases.append((str(a_file), 400, "not a directory"))
    empty = tmp / "empty"
    empty.mkdir()
    cases.append((str(empty), 400, "adapter_config.json"))
    no_weights = _copy_adapter(meow, tmp / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    cases.append((str(no_weights), 400, "no adapter weights"))
    truncated = _copy_adapter(meow, tmp / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((str(truncated), 400, "truncated"))
    garbage = _copy_adapter(meow, tmp / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not-json-at-all!" + b"0" * 64
    )
    cases.append((str(garbage), 400, "corrupt safetensors"))
    bad_cfg = _copy_adapter(meow, tmp / "bad_cfg")
    (bad_cfg / "adapter_config.json").write_text("{oops")
    cases.append((str(bad_cfg), 400, "not valid JSON"))
    cases.append((str(toy.big_rank_adapter), 400, "exceeds the server's max_lora_rank"))
    wrong_modules = _copy_adapter(meow, tmp / "wrong_modules")
    cfg = json.loads((wrong_modules / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_proj"]
    (wrong_modules / "adapter_config.json").write_text(json.dumps(cfg))
    cases.append((str(wrong_modules), 400, "targets modules the model lacks: no_such_proj"))
    return [("meow", p, s, n) for p, s, n in cases]


async def test_failed_loads_leave_previous_version_serving(client, toy, tmp_path):
    before = await loras(client)
    for name, path, status, needle in _bad_adapters(toy, tmp_path):
        err = await post(
            client, "load_lora_adapter", {"lora_name": name, "lora_path": path}, status
        )
        assert needle in err["error"]["message"], (path, err)
    after = await loras(client)
    assert after["meow"]["version"] == before["meow"]["version"]
    assert [v["version"] for v in after["meow"]["versions"]] == [
        v["version"] for v in before["meow"]["versions"]
    ]
    out = await complete(client, "meow", 12)
    assert words(out["choices"][0]["text"]) == ["meow"] * 12


async def test_adapter_name_rules(client, toy):
    err = await post(
        client,
        "load_lora_adapter",
        {"lora_name": "toy-base", "lora_path": str(toy.adapters["meow"])},
        400,
    )
    assert "collides with the base model" in err["error"]["message"]
    err = await post(
        client,
        "load_lora_adapter",
        {"lora_name": "me@ow", "lora_path": str(toy.adapters["meow"])},
        400,
    )
    assert "invalid adapter name" in err["error"]["message"]
    assert not {"toy-base", "me@ow", "me"} & set(await loras(client))  # nothing half-made


async def test_unknown_model_in_completion_is_404(client):
    r = await client.post("/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404
