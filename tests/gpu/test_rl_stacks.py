"""What SkyRL, prime-rl and AReaL send, replayed against the real engine: their calls go
through vLLM's own routes (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``,
``/inference/v1/generate``, ``/pause``, ``/resume``, ``/abort_requests``) and must get our
guarantees: new weights with fresh-load logprobs, per-adapter holds, isolation,
attribution, engines back to their adapter count after unload, no 5xx."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
from engine_helpers import PROMPT, Stream, complete, loras, post, wait_in_flight, words

LONG = 1500


async def v1_load(c: httpx.AsyncClient, name: str, path, status: int = 200, **extra) -> str:
    r = await c.post(
        "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra}
    )
    assert r.status_code == status, r.text
    return r.text


async def v1_unload(c: httpx.AsyncClient, name: str, status: int = 200) -> str:
    r = await c.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert r.status_code == status, r.text
    return r.text


async def engine_settled(c: httpx.AsyncClient) -> dict:
    async with asyncio.timeout(30):
        while True:
            body = (await c.get("/skyrl/v1/loras")).json()
            if body["engine_adapters"] == sum(len(a["versions"]) for a in body["adapters"]):
                return body
            await asyncio.sleep(0.1)


async def tokenize(c: httpx.AsyncClient, text: str) -> list[int]:
    r = await c.post("/tokenize", json={"model": "toy-base", "prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


async def generate(
    c: httpx.AsyncClient, model: str, token_ids: list[int], cache_salt: str | None = None
) -> dict:
    """SkyRL's and prime-rl's token-in/token-out call."""
    body = {
        "model": model,
        "token_ids": token_ids,
        "sampling_params": {"temperature": 0, "max_tokens": 8, "logprobs": 0},
        "cache_salt": cache_salt,
    }
    r = await c.post("/inference/v1/generate", json=body, headers={"X-Session-ID": "rollout-7"})
    assert r.status_code == 200, r.text
    return {"body": r.json(), "version": r.headers.get("x-lora-version")}


def copy_weights(src: Path, dest: Path) -> None:
    """A trainer rewriting one checkpoint directory in place."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)


async def test_skyrl_sequence(client, toy, tmp_path):
    """In-place rewrites loaded through our route, token-in/token-out sampling with a
    session id, a full-weight-sync style global keep pause around adapter traffic, and
    vLLM's unload route."""
    ckpt = tmp_path / "sky"
    copy_weights(toy.adapters["meow"], ckpt)
    await post(client, "load_lora_adapter", {"lora_name": "sky", "lora_path": str(ckpt)})
    prompt_ids = await tokenize(client, PROMPT)
    try:
        first = await generate(client, "sky", prompt_ids)
        (choice,) = first["body"]["choices"]
        assert len(choice["token_ids"]) == 8 and first["version"] == "1"
        assert choice["lora_versions"] == [{"version": 1, "start": 0, "end": 8}]

        copy_weights(toy.adapters["woof"], ckpt)  # the trainer's next step, same directory
        await post(client, "load_lora_adapter", {"lora_name": "sky", "lora_path": str(ckpt)})
        text = (await complete(client, "sky", 8))["choices"][0]["text"]
        assert set(words(text)) == {"woof"}

        # SkyRL's full-weight sync pauses the whole engine in keep mode.
        streams = [Stream("sky", LONG).start(client), Stream("woof", LONG).start(client)]
        for s in streams:
            await s.wait_tokens(5)
        r = await client.post("/pause", params={"mode": "keep", "clear_cache": "false"})
        assert r.status_code == 200, r.text
        assert (await client.get("/is_paused")).json() == {"is_paused": True}
        await asyncio.sleep(0.5)
        frozen = [s.tokens for s in streams]
        await asyncio.sleep(0.5)
        assert [s.tokens for s in streams] == frozen
        assert (await client.post("/resume")).status_code == 200
        assert (await client.get("/is_paused")).json() == {"is_paused": False}
        for s in streams:
            await s.result()
            assert s.finish_reason == "length" and s.tokens == LONG
    finally:
        await v1_unload(client, "sky")
    assert "sky" not in await loras(client)
    await engine_settled(client)
    r = await client.post("/v1/completions", json={"model": "sky", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404
    # SkyRL's client reads vLLM's error format, on our routes too.
    err = await post(client, "pause", {"lora_name": "sky", "mode": "keep"}, 404)
    assert "sky" in err["error"]["message"] and err["error"]["code"] == 404


async def test_prime_rl_sequence(client, toy, tmp_path):
    """Steps written as files then an empty STABLE, loaded in place under one name with
    load_inplace; sampled token-in/token-out with the policy version as cache salt."""
    root = tmp_path / "broadcast"
    prompt_ids = await tokenize(client, PROMPT)
    try:
        for step, word in ((1, "meow"), (2, "woof"), (3, "meow")):
            step_dir = root / f"step_{step}"
            copy_weights(toy.adapters[word], step_dir)
            (step_dir / "STABLE").write_text("")  # prime-rl's sentinel: empty
            msg = await v1_load(client, "prime", step_dir, load_inplace=True)
            assert "successfully" in msg
            out = await generate(client, "prime", prompt_ids, cache_salt=str(step))
            state = (await loras(client))["prime"]
            assert out["version"] == str(state["version"])
            text = (await complete(client, "prime", 8))["choices"][0]["text"]
            assert set(words(text)) == {word}, (step, text)
            assert not (step_dir / ".leases").exists()  # nothing written into their steps
    finally:
        await v1_unload(client, "prime")
    await engine_settled(client)
    await v1_unload(client, "prime", 404)


async def test_areal_sequence(client, toy):
    """Versioned names through vLLM's route; on an abort the request is resent with
    prompt + tokens so far and what is left of max_tokens."""
    try:
        await v1_load(client, "areal-v0", toy.adapters["meow"])
        await v1_load(client, "areal-v1", toy.adapters["woof"])
        err = await v1_load(client, "areal-v0", toy.adapters["woof"], status=400)
        assert "load_inplace" in json.loads(err)["error"]["message"]  # vLLM's 400

        s = Stream("areal-v1", 600).start(client, return_token_ids=True)
        await s.wait_tokens(5)
        await post(client, "abort_lora_requests", {"lora_name": "areal-v1"})
        await s.result()
        assert s.finish_reason == "abort" and s.tokens < 600
        resent = await complete(
            client,
            "areal-v1",
            600 - s.tokens,
            prompt=s.prompt_token_ids + s.token_ids,
        )
        assert resent["usage"]["completion_tokens"] + s.tokens == 600
        assert set(words(resent["choices"][0]["text"])) == {"woof"}
    finally:
        for name in ("areal-v0", "areal-v1"):
            await v1_unload(client, name)
    await engine_settled(client)


async def first_token_logprob(c: httpx.AsyncClient, model: str, prompt: str) -> tuple[float, int]:
    r = await c.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    cached = (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return body["choices"][0]["logprobs"]["token_logprobs"][0], cached


async def test_inplace_reload_through_vllms_route_has_fresh_load_logprobs(client, toy, tmp_path):
    """vLLM's in-place reload of a rewritten directory, put through the extension: the
    new weights with exactly a fresh load's logprobs (stock vLLM reuses the prefix-cache
    blocks computed with the old weights; here they are another version's)."""
    ckpt = tmp_path / "inplace"
    copy_weights(toy.adapters["meow"], ckpt)
    prompt = " ".join(["the cat says hello to the dog and the cow"] * 6)
    try:
        await v1_load(client, "inplace", ckpt)
        # A reloaded name continues its numbering (test_swaps also loads "inplace").
        first = (await loras(client))["inplace"]["version"]
        for _ in range(2):  # the second hits the prefix cache with meow's weights
            await first_token_logprob(client, "inplace", prompt)
        copy_weights(toy.adapters["woof"], ckpt)
        await v1_load(client, "inplace", ckpt, load_inplace=True)
        reloaded, cached = await first_token_logprob(client, "inplace", prompt)
        await v1_load(client, "fresh-woof", toy.adapters["woof"])
        fresh, _ = await first_token_logprob(client, "fresh-woof", prompt)
        assert cached == 0  # no block of the old weights was reused
        assert abs(reloaded - fresh) < 1e-3, (reloaded, fresh)
        state = (await loras(client))["inplace"]
        assert state["version"] == first + 1
        assert [v["version"] for v in state["versions"]] == [first, first + 1]
    finally:
        await v1_unload(client, "inplace")
        await v1_unload(client, "fresh-woof")
    await engine_settled(client)


async def test_global_and_per_adapter_pauses_compose(client):
    """vLLM's global pause over our per-adapter pause: a global resume does not resume
    an adapter paused on its own; each pause ends only through its own resume."""
    meow = Stream("meow", LONG).start(client)
    woof = Stream("woof", 300).start(client)
    await meow.wait_tokens(5)
    await woof.wait_tokens(5)
    await post(client, "pause", {"lora_name": "meow", "mode": "keep"})
    assert (await client.post("/pause", params={"mode": "keep"})).status_code == 200
    try:
        await asyncio.sleep(0.3)
        frozen = woof.tokens
        await asyncio.sleep(0.3)
        assert woof.tokens == frozen  # the global pause froze the running adapter
        assert (await client.post("/resume")).status_code == 200
        await woof.result()
        assert woof.finish_reason == "length" and woof.tokens == 300
        held = asyncio.create_task(complete(client, "meow", 8))
        await asyncio.sleep(0.5)
        assert not held.done() and not meow.task.done()  # still paused on its own
        assert (await loras(client))["meow"]["held"] == 1
    finally:
        await post(client, "resume", {"lora_name": "meow"})
    await meow.result()
    assert meow.finish_reason == "length" and meow.tokens == LONG
    assert (await asyncio.wait_for(held, 60))["usage"]["completion_tokens"] == 8


async def test_global_abort_pause_ends_what_runs_and_leaves_held_requests_held(client):
    running = Stream("woof", LONG).start(client)
    await running.wait_tokens(5)
    await post(client, "pause", {"lora_name": "meow", "mode": "keep"})
    held = asyncio.create_task(complete(client, "meow", 8))
    try:
        await wait_in_flight(client, "woof", 1)
        assert (await client.post("/pause", params={"mode": "abort"})).status_code == 200
        await running.result()
        assert running.finish_reason == "abort"
        assert (await client.post("/resume")).status_code == 200
        await asyncio.sleep(0.3)
        assert not held.done()
    finally:
        await post(client, "resume", {"lora_name": "meow"})
    assert (await asyncio.wait_for(held, 60))["usage"]["completion_tokens"] == 8


async def test_vllms_abort_routes_reach_held_and_between_segment_requests(client):
    """vLLM's /abort_requests (no ids: everything) and /inference/v1/abort_requests (by
    id) end requests the engine does not hold: held by a pause, or stopped by a keep
    pause and waiting to continue."""
    for route, by_id in (("/abort_requests", False), ("/inference/v1/abort_requests", True)):
        between = Stream("meow", LONG, headers={"X-Request-Id": "between"}).start(client)
        await between.wait_tokens(5)
        await post(client, "pause", {"lora_name": "meow", "mode": "keep"})
        held = asyncio.create_task(complete(client, "meow", 8, headers={"X-Request-Id": "held"}))
        async with asyncio.timeout(10):
            while (await loras(client))["meow"]["held"] != 1:  # noqa: ASYNC110 (remote)
                await asyncio.sleep(0.05)
        body = {"request_ids": ["cmpl-between-0", "cmpl-held-0"]} if by_id else {}
        r = await client.post(route, json=body)
        assert r.status_code == 200, (route, r.text)
        await between.result(30)
        assert between.finish_reason == "abort" and between.tokens < LONG
        out = await asyncio.wait_for(held, 30)
        assert out["choices"][0]["finish_reason"] == "abort", route
        await post(client, "resume", {"lora_name": "meow"})


async def test_chat_continues_across_a_keep_pause_with_attribution(client):
    """Chat as completions: a keep pause stops it, resume continues it server-side into
    one answer with its version spans; a second turn builds on the first."""
    messages = [{"role": "user", "content": "what does the cat say"}]
    request = {"model": "meow", "messages": messages, "max_tokens": LONG, "temperature": 0}
    task = asyncio.create_task(client.post("/v1/chat/completions", json=request))
    await wait_in_flight(client, "meow", 1)
    await asyncio.sleep(0.3)
    paused = await post(client, "pause", {"lora_name": "meow", "mode": "keep"})
    assert paused["interrupted"] == 1
    await asyncio.sleep(0.3)
    assert not task.done()
    await post(client, "resume", {"lora_name": "meow"})
    r = await asyncio.wait_for(task, 120)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == LONG
    assert set(words(choice["message"]["content"])) == {"meow"}
    spans = choice["lora_versions"]
    assert spans[0]["start"] == 0 and spans[-1]["end"] == LONG
    assert r.headers["x-lora-version"] == str(spans[-1]["version"])

    turn2 = [*messages, choice["message"], {"role": "user", "content": "and the dog"}]
    r2 = await client.post(
        "/v1/chat/completions",
        json={"model": "woof", "messages": turn2, "max_tokens": 8, "temperature": 0},
    )
    assert r2.status_code == 200, r2.text
    assert set(words(r2.json()["choices"][0]["message"]["content"])) == {"woof"}
    assert r2.json()["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]


async def test_streamed_token_in_token_out_is_attributed(client):
    prompt_ids = await tokenize(client, PROMPT)
    body = {
        "model": "woof",
        "token_ids": prompt_ids,
        "sampling_params": {"temperature": 0, "max_tokens": 12},
        "stream": True,
    }
    spans = None
    tokens = 0
    async with client.stream("POST", "/inference/v1/generate", json=body) as r:
        assert r.status_code == 200
        version = r.headers.get("x-lora-version")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                tokens += len(choice.get("token_ids") or [])
                if choice.get("finish_reason"):
                    spans = choice.get("lora_versions")
    state = (await loras(client))["woof"]
    assert version == str(state["version"]) and tokens == 12
    assert spans == [{"version": state["version"], "start": 0, "end": 12}]


async def test_token_in_token_out_on_a_paused_and_an_aborted_adapter(client):
    """/inference/v1/generate goes through the gate: held while its adapter is paused,
    ended by abort_lora_requests, and another adapter's requests never notice."""
    prompt_ids = await tokenize(client, PROMPT)

    def body(model: str, max_tokens: int) -> dict:
        return {
            "model": model,
            "token_ids": prompt_ids,
            "sampling_params": {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True},
        }

    await post(client, "pause", {"lora_name": "meow", "mode": "keep"})
    try:
        held = asyncio.create_task(client.post("/inference/v1/generate", json=body("meow", 8)))
        async with asyncio.timeout(10):
            while (await loras(client))["meow"]["held"] != 1:  # noqa: ASYNC110 (remote)
                await asyncio.sleep(0.05)
        other = await client.post("/inference/v1/generate", json=body("woof", 8))
        assert other.status_code == 200 and len(other.json()["choices"][0]["token_ids"]) == 8
        assert not held.done()
    finally:
        await post(client, "resume", {"lora_name": "meow"})
    r = await asyncio.wait_for(held, 60)
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 8

    running = asyncio.create_task(client.post("/inference/v1/generate", json=body("meow", LONG)))
    bystander = asyncio.create_task(client.post("/inference/v1/generate", json=body("woof", 400)))
    await wait_in_flight(client, "meow", 1)
    await wait_in_flight(client, "woof", 1)
    await asyncio.sleep(0.3)
    aborted = await post(client, "abort_lora_requests", {"lora_name": "meow"})
    assert aborted["aborted"] == 1
    choice = (await asyncio.wait_for(running, 60)).json()["choices"][0]
    assert choice["finish_reason"] == "abort" and 0 < len(choice["token_ids"]) < LONG
    other = (await asyncio.wait_for(bystander, 60)).json()["choices"][0]
    assert other["finish_reason"] == "length" and len(other["token_ids"]) == 400
