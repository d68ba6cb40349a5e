"""Every bad input is a 4xx with a JSON error naming the problem, and leaves the
previous state serving: the adapter still answers with its old weights, nothing new is
registered."""

from __future__ import annotations

import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from engine_helpers import PROMPT, body, complete, loras, post, words
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


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


async def _engine_alive(client) -> None:
    assert (await client.get("/health")).status_code == 200
    out = await complete(client, "woof", 4)
    assert words(out["choices"][0]["text"]) == ["woof"] * 4


def _prompt_logprobs(choice_or_body: dict) -> list:
    return [
        None if lp is None else sorted((k, round(v["logprob"], 3)) for k, v in lp.items())
        for lp in choice_or_body["prompt_logprobs"]
    ]


async def test_prompt_logprobs_in_a_batch_are_served_on_every_route(client):
    """vLLM 0.32's CPU LoRA logits path ended the engine for every tenant when a request
    with prompt_logprobs shared a batch with any other (its n > 1 children, another
    tenant's request, the base model's too): now served, with the prompt logprobs a
    lone request gets."""
    alone = await complete(client, "meow", 4, prompt_logprobs=1)
    want = _prompt_logprobs(alone["choices"][0])
    prompt_ids = (await client.post("/tokenize", json={"model": "meow", "prompt": PROMPT})).json()
    requests = [
        ("/v1/completions", {**body("meow", 4), "n": 2, "temperature": 1, "prompt_logprobs": 1}),
        (
            "/inference/v1/generate",
            {
                "model": "meow",
                "token_ids": prompt_ids["tokens"],
                "sampling_params": {
                    "n": 2,
                    "temperature": 1,
                    "max_tokens": 4,
                    "prompt_logprobs": 1,
                },
            },
        ),
    ]
    for path, payload in requests:
        r = await client.post(path, json=payload)
        assert r.status_code == 200, (path, r.status_code, r.text)
        got = r.json()
        assert _prompt_logprobs(got if "prompt_logprobs" in got else got["choices"][0]) == want
        await _engine_alive(client)
    chat = {
        "model": "meow",
        "messages": [{"role": "user", "content": "the cat says"}],
        "max_tokens": 4,
        "n": 2,
        "temperature": 1,
        "prompt_logprobs": 1,
    }
    assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
    # Beside another tenant's running request: on an adapter and on the base model.
    for model in ("meow", "toy-base"):
        other = asyncio.create_task(complete(client, "woof", 200))
        await asyncio.sleep(0.3)
        lone = await complete(client, model, 4, prompt_logprobs=0)
        assert lone["choices"][0]["prompt_logprobs"]
        assert words((await other)["choices"][0]["text"]) == ["woof"] * 200
        await _engine_alive(client)


SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "n": st.integers(1, 3),
        "temperature": st.sampled_from([0.0, 0.7, 1.0]),
        "top_p": st.sampled_from([0.5, 1.0]),
        "top_k": st.sampled_from([-1, 1, 5]),
        "min_p": st.sampled_from([0.0, 0.2]),
        "seed": st.integers(0, 2**31 - 1),
        "logprobs": st.sampled_from([0, 1, 5]),
        "prompt_logprobs": st.sampled_from([0, 1, 5]),
        "presence_penalty": st.sampled_from([0.0, 1.0]),
        "frequency_penalty": st.sampled_from([0.0, 1.0]),
        "repetition_penalty": st.sampled_from([1.0, 1.3]),
        "min_tokens": st.integers(0, 4),
        "stop": st.sampled_from([["woof"], ["meow", "cat"]]),
        "ignore_eos": st.booleans(),
        "echo": st.booleans(),
        "logit_bias": st.just({"5": 10.0}),
        "allowed_token_ids": st.just([5, 6, 7, 8, 9, 10]),
        "bad_words": st.just(["meow"]),
        "stream": st.booleans(),
        "include_stop_str_in_output": st.booleans(),
        "skip_special_tokens": st.booleans(),
    },
)


async def test_no_sampling_parameters_end_the_engine_on_an_adapter(client):
    """A fuzz of sampling parameters on an adapter, on the real engine: every request is
    answered (200 or a 4xx naming the problem) and the engine serves afterwards. The
    fuzz found prompt logprobs in a shared batch (above), base model included."""
    seen: list[dict] = []

    @settings(
        max_examples=30,
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(sampling=SAMPLING, model=st.sampled_from(["meow", "woof"]))
    def one(sampling: dict, model: str) -> None:
        seen.append(sampling)
        payload = {"model": model, "prompt": "the cat says", "max_tokens": 6, **sampling}
        if payload.get("n", 1) > 1 and payload.get("temperature", 1.0) == 0:
            payload["temperature"] = 1.0  # vLLM's own refusal, not ours to find
        with httpx.Client(base_url=str(client.base_url), timeout=120) as c:
            # Another tenant's request in the same batches (a lone request hides the
            # bugs that only a shared batch shows).
            other = {"model": "woof", "prompt": PROMPT, "max_tokens": 40, "ignore_eos": True}
            with ThreadPoolExecutor(1) as pool:
                background = pool.submit(c.post, "/v1/completions", json=other)
                r = c.post("/v1/completions", json=payload)
                assert background.result().status_code == 200, ("tenant B failed", payload)
            assert r.status_code < 500, (payload, r.status_code, r.text[:500])
            if r.status_code >= 400:
                assert r.json()["error"]["message"], r.text
            health = c.get("/health")
            assert health.status_code == 200, ("engine died after", payload)

    await asyncio.to_thread(one)
    assert len(seen) >= 10
    await _engine_alive(client)
