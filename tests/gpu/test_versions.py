"""Versions on a real engine: pinning a resident version by name, unloading a version
or a whole name (new requests 404, running ones finish)."""

from __future__ import annotations

from engine_helpers import PROMPT, Stream, complete, loras, post, wait_in_flight, words


async def test_pin_old_version_and_unload_it(client, toy):
    try:
        v2 = await post(
            client,
            "load_lora_adapter",
            {"lora_name": "meow", "lora_path": str(toy.adapters["woof"])},
        )
        new, old = v2["version"], v2["version"] - 1
        # "meow" is the newest weights, "meow@<old>" the previous ones, side by side.
        assert set(words((await complete(client, "meow", 8))["choices"][0]["text"])) == {"woof"}
        pinned = await complete(client, f"meow@{old}", 8)
        assert words(pinned["choices"][0]["text"]) == ["meow"] * 8
        models = {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
        assert {f"meow@{old}", f"meow@{new}"} <= models

        err = await post(client, "unload_lora_adapter", {"lora_name": "meow", "version": new}, 409)
        assert "current version" in err["error"]["message"]
        r = await post(client, "unload_lora_adapter", {"lora_name": "meow", "version": old})
        assert r["unloaded_versions"] == [old]
        gone = await client.post(
            "/v1/completions", json={"model": f"meow@{old}", "prompt": "x", "max_tokens": 2}
        )
        assert gone.status_code == 404
        state = await loras(client)
        assert old not in [v["version"] for v in state["meow"]["versions"]]
    finally:
        await post(
            client,
            "load_lora_adapter",
            {"lora_name": "meow", "lora_path": str(toy.adapters["meow"])},
        )


async def test_unload_name_lets_running_requests_finish(client, toy):
    await post(
        client, "load_lora_adapter", {"lora_name": "tmp", "lora_path": str(toy.adapters["woof"])}
    )
    running = Stream("tmp", 1000).start(client)
    await running.wait_tokens(5)
    await wait_in_flight(client, "tmp", 1)
    r = await post(client, "unload_lora_adapter", {"lora_name": "tmp"})
    assert r["unloaded_versions"] == [1]
    refused = await client.post(
        "/v1/completions", json={"model": "tmp", "prompt": "x", "max_tokens": 2}
    )
    assert refused.status_code == 404
    assert "tmp" not in await loras(client)
    await running.result()
    assert running.finish_reason == "length" and running.tokens == 1000
    assert set(words(running.text)) == {"woof"}
    await post(client, "unload_lora_adapter", {"lora_name": "tmp"}, 404)


async def test_compute_logprobs_scores_under_exactly_the_version_asked(client, server, toy):
    """Scoring by version: the logprobs of sampled tokens re-scored on the version that
    sampled them equal the sampled ones (1e-4), after a swap too; the current version is
    named; a batch is one request; a version that left is a 404."""
    import pytest

    from vllm_lora_ext.client import RemoteInferenceClient, RequestRejected

    prompt = (await client.post("/tokenize", json={"model": "toy-base", "prompt": PROMPT})).json()
    prompt_ids = prompt["tokens"]
    one = await post(
        client, "load_lora_adapter", {"lora_name": "scorer", "lora_path": str(toy.adapters["meow"])}
    )
    try:
        async with RemoteInferenceClient(server) as rc:
            out = await rc.sample(
                "scorer", prompt_token_ids=prompt_ids, max_tokens=12, temperature=1.0, seed=7
            )
            sampled = out.samples[0]
            assert out.version == one["version"] and len(sampled.logprobs) == 12
            two = await post(
                client,
                "load_lora_adapter",
                {"lora_name": "scorer", "lora_path": str(toy.adapters["woof"])},
            )
            seq = [*prompt_ids, *sampled.token_ids]
            (scored,) = await rc.compute_logprobs("scorer", seq, version=one["version"])
            assert scored.version == one["version"] and scored.logprobs[0] is None
            got = scored.logprobs[len(prompt_ids) :]
            assert got == pytest.approx(sampled.logprobs, abs=1e-4)

            # No version: the current one (woof's weights), named; a batch of two.
            now = await rc.compute_logprobs("scorer", [seq, prompt_ids])
            assert [s.version for s in now] == [two["version"]] * 2
            assert len(now[0].logprobs) == len(seq) and len(now[1].logprobs) == len(prompt_ids)
            assert now[0].logprobs[len(prompt_ids) :] != pytest.approx(sampled.logprobs, abs=1e-2)
            assert now[1].logprobs == pytest.approx(now[0].logprobs[: len(prompt_ids)], abs=1e-4)

            await post(
                client, "unload_lora_adapter", {"lora_name": "scorer", "version": one["version"]}
            )
            with pytest.raises(RequestRejected) as e:
                await rc.compute_logprobs("scorer", seq, version=one["version"])
            assert e.value.status == 404
    finally:
        await post(client, "unload_lora_adapter", {"lora_name": "scorer"})
