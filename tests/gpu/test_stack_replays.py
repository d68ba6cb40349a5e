"""One LoRA training step of each RL stack, replayed on the real engine with the exact
requests the stack's current code sends (``--lora-stack-routes prime-rl,areal``):

- prime-rl (main, checked 2026-08; ``utils/client.py``): ``GET /liveness``; per step
  ``POST /load_lora_adapter {"lora_name", "lora_path"}`` under one fixed name with a new
  directory, no pause; sampling with the policy version as ``cache_salt``; prefill scoring
  through ``/inference/v1/generate`` with ``prompt_logprobs``; ``POST
  /v1/unload_lora_adapter`` at the end.
- AReaL 1.0.4 (``engine/vllm_remote.py``, ``infra/remote_inf_engine.py``): completions
  with its flat payload on versioned names ``name-vN``; a weight update is ``POST
  /areal_pause_generation``, ``POST /v1/load_lora_adapter {"lora_path", "lora_name":
  "name-vN+1"}``, ``POST /areal_continue_generation``; an aborted request is resent
  with prompt + tokens so far and what is left of its budget.

Checked: the new weights are served, requests in flight come back whole, no other
adapter is paused."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
from engine_helpers import PROMPT, Stream, complete, loras, post, wait_in_flight, words


def copy_weights(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)


async def tokenize(c: httpx.AsyncClient, text: str) -> list[int]:
    r = await c.post("/tokenize", json={"model": "toy-base", "prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


async def test_prime_rl_lora_step(client, toy, tmp_path):
    r = await client.get("/liveness")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    name = "prime-policy"
    ids = await tokenize(client, PROMPT)
    other = Stream("woof", 400).start(client)  # another tenant, streaming throughout
    previous = None
    try:
        for step, word in enumerate(("meow", "woof", "meow")):
            step_dir = tmp_path / "weights" / f"step_{step}"
            copy_weights(toy.adapters[word], step_dir)
            inflight = None
            if previous is not None:
                inflight = Stream(name, 300).start(client)
                await inflight.wait_tokens(3)
            r = await client.post(
                "/load_lora_adapter", json={"lora_name": name, "lora_path": step_dir.as_posix()}
            )
            assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
            chat = await client.post(
                "/v1/chat/completions",
                json={
                    "model": name,
                    "messages": [{"role": "user", "content": PROMPT}],
                    "max_tokens": 8,
                    "temperature": 0,
                    "logprobs": True,
                    "cache_salt": str(step),
                },
            )
            assert chat.status_code == 200, chat.text
            assert set(words(chat.json()["choices"][0]["message"]["content"])) == {word}
            prefill = await client.post(
                "/inference/v1/generate",
                json={
                    "model": name,
                    "token_ids": ids,
                    "sampling_params": {
                        "max_tokens": 1,
                        "temperature": 1.0,
                        "top_p": 1.0,
                        "prompt_logprobs": 1,
                    },
                },
            )
            assert prefill.status_code == 200, prefill.text
            scored = prefill.json()["prompt_logprobs"]
            assert len(scored) == len(ids) and scored[0] is None and all(scored[1:])
            if inflight is not None:  # finished whole, on the weights it started on
                await inflight.result()
                assert inflight.finish_reason == "length" and inflight.tokens == 300
                assert set(words(inflight.text)) == {previous}
            previous = word
        await other.result()
        assert other.finish_reason == "length" and other.tokens == 400
        assert set(words(other.text)) == {"woof"}
        assert not any(a["paused"] for a in (await loras(client)).values())
    finally:
        r = await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        assert r.status_code == 200, r.text
    assert name not in await loras(client)


async def areal_generate(
    c: httpx.AsyncClient,
    prompt_ids: list[int],
    budget: int,
    version: list[int],
    resumed: asyncio.Event,
) -> tuple[list[int], list[float], int]:
    """AReaL's interruptible generation loop (remote_inf_engine.agenerate), as sent."""
    tokens: list[int] = []
    logprobs: list[float] = []
    rounds = 0
    stop_reason = None
    while stop_reason not in ("stop", "tool_calls", "length") and len(tokens) < budget:
        # Its workflow executor is paused around an update: no resend meanwhile.
        await asyncio.wait_for(resumed.wait(), 120)
        payload = {
            "top_p": 1.0,
            "top_k": -1,
            "max_tokens": budget - len(tokens),
            "temperature": 0.0,
            "stop_token_ids": [],
            "ignore_eos": True,
            "skip_special_tokens": True,
            "return_tokens_as_token_ids": True,
            "logprobs": 0,
            "use_beam_search": False,
            "stream": False,
            "model": f"areal-lora-v{version[0]}",
            "prompt": [*prompt_ids, *tokens],
        }
        r = await c.post("/v1/completions", json=payload)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        stop_reason = choice["finish_reason"]
        tokens += [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
        logprobs += choice["logprobs"]["token_logprobs"]
        rounds += 1
    return tokens, logprobs, rounds


async def test_areal_lora_step(client, toy):
    ids = await tokenize(client, PROMPT)
    version = [0]
    resumed = asyncio.Event()
    resumed.set()
    await post(
        client,
        "load_lora_adapter",
        {"lora_name": "woof-paused", "lora_path": str(toy.adapters["woof"])},
    )
    try:
        r = await client.post(
            "/v1/load_lora_adapter",
            json={"lora_path": str(toy.adapters["meow"]), "lora_name": "areal-lora-v0"},
        )
        assert r.status_code == 200, r.text
        # Another tenant's own pause (per adapter): AReaL's pause and continue leave it.
        await post(client, "pause", {"lora_name": "woof-paused", "mode": "keep"})
        rollout = asyncio.create_task(areal_generate(client, ids, 600, version, resumed))
        await wait_in_flight(client, "areal-lora-v0", 1)

        resumed.clear()  # rollout.pause(), then the weight update
        r = await client.post("/areal_pause_generation", json={})
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        # Held while paused, any model, on every vLLM version.
        held = asyncio.create_task(complete(client, "toy-base", 4))
        r = await client.post(
            "/v1/load_lora_adapter",
            json={"lora_path": str(toy.adapters["woof"]), "lora_name": "areal-lora-v1"},
        )
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.5)
        assert not held.done()
        version[0] = 1
        r = await client.post("/areal_continue_generation", json={})
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        resumed.set()  # rollout.resume()

        assert (await asyncio.wait_for(held, 60))["usage"]["completion_tokens"] == 4
        tokens, logprobs, rounds = await asyncio.wait_for(rollout, 120)
        assert len(tokens) == len(logprobs) == 600 and rounds >= 2  # whole, across the update
        detok = await client.post("/detokenize", json={"model": "toy-base", "tokens": tokens[-20:]})
        assert set(words(detok.json()["prompt"])) == {"woof"}  # the new version's weights
        state = await loras(client)
        assert state["woof-paused"]["paused"] and not state["meow"]["paused"]
        assert set(words((await complete(client, "areal-lora-v1", 8))["choices"][0]["text"])) == {
            "woof"
        }
    finally:
        await post(client, "resume", {"lora_name": "woof-paused"})
        for name in ("areal-lora-v0", "areal-lora-v1", "woof-paused"):
            await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
