"""The reference test plan (SkyRL #1657), strictly asserted, on a real engine."""

from __future__ import annotations

import asyncio

from engine_helpers import Stream, complete, loras, post, wait_in_flight, words

LONG = 2000  # ~10 s on this CPU: long enough to be caught mid-generation


async def settle() -> None:
    """Let tokens already on their way from the engine arrive."""
    await asyncio.sleep(0.3)


async def test_pause_lora_does_not_affect_other_lora(client):
    meows = [Stream("meow", LONG).start(client, return_token_ids=True) for _ in range(2)]
    for s in meows:
        await s.wait_tokens(5)
    paused = await post(client, "pause", {"lora_name": "meow", "mode": "keep"})
    assert paused["interrupted"] == 2  # both really were in flight
    await settle()
    frozen = [s.tokens for s in meows]
    assert all(0 < n < LONG for n in frozen)

    # woof keeps generating, with woof weights, while meow is paused
    woofs = await asyncio.wait_for(
        asyncio.gather(*[complete(client, "woof", 64) for _ in range(4)]), timeout=60
    )
    for w in woofs:
        assert w["usage"]["completion_tokens"] == 64
        assert set(words(w["choices"][0]["text"])) == {"woof"}
    # the base model too, and not with meow's weights
    base = await complete(client, "toy-base", 16)
    assert base["usage"]["completion_tokens"] == 16
    assert set(words(base["choices"][0]["text"])) != {"meow"}

    # a new meow request is held, not rejected
    held = asyncio.create_task(complete(client, "meow", 16))
    await asyncio.sleep(0.5)
    assert not held.done()
    assert (await loras(client))["meow"]["held"] == 1
    assert [s.tokens for s in meows] == frozen, "paused adapter kept generating"
    assert not any(s.task.done() for s in meows)

    await post(client, "resume", {"lora_name": "meow"})
    for s in meows:
        await s.result()
        assert s.finish_reason == "length"
        assert s.tokens == LONG and s.logprobs == LONG and len(s.token_ids) == LONG
        assert set(words(s.text)) == {"meow"}
    h = await asyncio.wait_for(held, 30)
    assert words(h["choices"][0]["text"]) == ["meow"] * 16


async def test_abort_returns_partial_then_continuation_completes(client):
    meows = [Stream("meow", LONG).start(client, return_token_ids=True) for _ in range(4)]
    woofs = [Stream("woof", LONG).start(client) for _ in range(4)]
    for s in meows + woofs:
        await s.wait_tokens(3)
    done_before = sum(s.task.done() for s in meows + woofs)
    assert done_before == 0, "requests finished before the pause: the test would be vacuous"

    paused = await post(client, "pause", {"lora_name": "meow", "mode": "abort"})
    assert paused["interrupted"] == 4
    for s in meows:
        await s.result(timeout=30)
        assert s.finish_reason == "abort"
        assert 0 < s.tokens < LONG and len(s.token_ids) == s.tokens == s.logprobs
        assert set(words(s.text)) == {"meow"}
    assert not any(s.task.done() for s in woofs), "aborting meow stopped woof"

    await post(client, "resume", {"lora_name": "meow"})
    # Continue each one from prompt + partial tokens with the remaining budget.
    conts = await asyncio.gather(
        *[
            client.post(
                "/v1/completions",
                json={
                    "model": "meow",
                    "prompt": s.prompt_token_ids + s.token_ids,
                    "max_tokens": LONG - s.tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            for s in meows
        ]
    )
    for s, r in zip(meows, conts, strict=True):
        out = r.json()
        assert out["usage"]["completion_tokens"] + s.tokens == LONG
        assert set(words(out["choices"][0]["text"])) == {"meow"}
    for s in woofs:
        await s.result()
        assert s.finish_reason == "length" and s.tokens == LONG
        assert set(words(s.text)) == {"woof"}


async def test_pause_swap_weights_resume_mid_sample(client, toy):
    stream = Stream("meow", LONG).start(client)
    plain = asyncio.create_task(complete(client, "meow", LONG))  # non-streamed path
    await stream.wait_tokens(20)
    await wait_in_flight(client, "meow", 2)
    assert not plain.done()
    try:
        paused = await post(client, "pause", {"lora_name": "meow", "mode": "keep"})
        assert paused["interrupted"] == 2
        loaded = await post(
            client,
            "load_lora_adapter",
            {"lora_name": "meow", "lora_path": str(toy.adapters["woof"])},
        )
        assert loaded["version"] >= 2
        await post(client, "resume", {"lora_name": "meow"})
        await stream.result()
        out = await asyncio.wait_for(plain, 120)
    finally:
        await post(
            client,
            "load_lora_adapter",
            {"lora_name": "meow", "lora_path": str(toy.adapters["meow"])},
        )
    for text, n_tokens, n_logprobs, finish in (
        (stream.text, stream.tokens, stream.logprobs, stream.finish_reason),
        (
            out["choices"][0]["text"],
            out["usage"]["completion_tokens"],
            len(out["choices"][0]["logprobs"]["tokens"]),
            out["choices"][0]["finish_reason"],
        ),
    ):
        w = words(text)
        switch = w.index("woof")
        assert switch >= 1 and set(w[:switch]) == {"meow"} and set(w[switch:]) == {"woof"}, text[
            :300
        ]
        assert n_tokens == LONG and n_logprobs == LONG
        assert finish == "length"


async def test_global_pause_still_works(client):
    streams = [Stream(m, LONG).start(client) for m in ("meow", "woof", "toy-base")]
    for s in streams:
        await s.wait_tokens(3)
    await post(client, "pause", {"mode": "keep"})
    try:
        await settle()
        frozen = [s.tokens for s in streams]
        late = asyncio.create_task(complete(client, "woof", 8))
        await asyncio.sleep(1.0)
        assert [s.tokens for s in streams] == frozen, "global pause did not freeze generation"
        assert not late.done()
    finally:
        await post(client, "resume", {})
    for s in streams:
        await s.result()
        assert s.finish_reason == "length" and s.tokens == LONG
    assert (await asyncio.wait_for(late, 30))["usage"]["completion_tokens"] == 8


async def test_wait_mode_drains_then_times_out_cleanly(client):
    short = asyncio.create_task(complete(client, "meow", 200))
    await wait_in_flight(client, "meow", 1)
    r = await post(client, "pause", {"lora_name": "meow", "mode": "wait", "timeout_s": 60})
    assert r["paused"] and (await loras(client))["meow"]["in_flight"] == 0  # drained
    # (its answer is on its way: the server ends a request before the client reads it)
    assert (await asyncio.wait_for(short, 10))["usage"]["completion_tokens"] == 200
    await post(client, "resume", {"lora_name": "meow"})

    long = Stream("meow", LONG).start(client)
    await long.wait_tokens(3)
    err = await post(client, "pause", {"lora_name": "meow", "mode": "wait", "timeout_s": 0.3}, 409)
    assert "in flight" in err["error"]["message"]
    assert not (await loras(client))["meow"]["paused"]  # a failed pause is undone
    await long.result()
    assert long.tokens == LONG


async def test_held_request_times_out_with_503(client):
    await post(client, "pause", {"lora_name": "woof", "mode": "keep"})
    try:
        r = await client.post(
            "/v1/completions", json={"model": "woof", "prompt": "x", "max_tokens": 4}
        )
        assert r.status_code == 503
        assert "paused" in r.text
        assert (await loras(client))["woof"]["held"] == 0
    finally:
        await post(client, "resume", {"lora_name": "woof"})


async def test_keep_continues_every_sample_of_n(client):
    task = asyncio.create_task(complete(client, "meow", 800, n=3, temperature=1.0, seed=7))
    probe = Stream("meow", LONG).start(client)
    await probe.wait_tokens(5)
    await wait_in_flight(client, "meow", 2)
    paused = await post(client, "pause", {"lora_name": "meow", "mode": "keep"})
    assert paused["interrupted"] == 2  # the n=3 parent counts once, plus the probe
    await asyncio.sleep(0.3)
    assert not task.done()
    await post(client, "resume", {"lora_name": "meow"})
    out = await asyncio.wait_for(task, 120)
    await probe.result()
    assert len(out["choices"]) == 3
    assert out["usage"]["completion_tokens"] == 3 * 800
    for ch in out["choices"]:
        assert ch["finish_reason"] == "length"
        assert len(ch["logprobs"]["tokens"]) == 800


async def test_keep_ends_what_a_continuation_cannot_reproduce(client):
    """A stop string could span the seam (and presence penalties would forget the
    first segment): such a request is not continued after a keep pause, it ends
    partial at once, saying why, while a plain one beside it is continued."""
    exact = Stream("meow", LONG).start(client)
    inexact = Stream("meow", LONG).start(client, stop=["zebra crossing"], presence_penalty=0.5)
    await exact.wait_tokens(5)
    await inexact.wait_tokens(5)
    await post(client, "pause", {"lora_name": "meow", "mode": "keep"})
    await inexact.result(60)  # not waiting for the resume
    assert inexact.finish_reason == "abort" and 0 < inexact.tokens < LONG
    assert str(inexact.stop_reason).startswith("not continued: "), inexact.stop_reason
    await post(client, "resume", {"lora_name": "meow"})
    await exact.result()
    assert exact.finish_reason == "length" and exact.tokens == LONG


async def test_client_disconnect_releases_the_lease(client, server):
    import httpx

    async with httpx.AsyncClient(base_url=server, timeout=60) as other:
        s = Stream("woof", LONG).start(other)
        await s.wait_tokens(5)
        assert (await loras(client))["woof"]["in_flight"] == 1
        s.task.cancel()
    for _ in range(50):
        if (await loras(client))["woof"]["in_flight"] == 0:
            break
        await asyncio.sleep(0.1)
    state = await loras(client)
    assert state["woof"]["in_flight"] == 0
    assert all(v["in_flight"] == 0 for v in state["woof"]["versions"])


async def test_abort_route_counts_and_spares_others(client):
    meows = [Stream("meow", LONG).start(client) for _ in range(3)]
    woof = Stream("woof", LONG).start(client)
    for s in [*meows, woof]:
        await s.wait_tokens(3)
    r = await post(client, "abort_lora_requests", {"lora_name": "meow"})
    assert r == {"lora_name": "meow", "aborted": 3}
    for s in meows:
        await s.result(30)
        assert s.finish_reason == "abort" and 0 < s.tokens < LONG
    assert not woof.task.done()
    again = await post(client, "abort_lora_requests", {"lora_name": "meow"})
    assert again["aborted"] == 0
    await woof.result()
    assert woof.tokens == LONG
