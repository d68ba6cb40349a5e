"""Versions on a real engine: pinning a resident version by name, unloading a version
or a whole name (new requests 404, running ones finish)."""

from __future__ import annotations

from engine_helpers import Stream, complete, loras, post, wait_in_flight, words


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
