"""The fair share on the real engine: a light tenant's request reaches the engine
before a flooding tenant's backlog drains, in the order vLLM itself logs requests
entering the engine ("Added request", ``--enable-log-requests``), not by wall time;
weights set at run time are listed; a request wider than its share is served in parts
(on an adapter; a 400 on the base model); the flood's waiting requests give their share
back when aborted."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import httpx
from engine_helpers import post

BATCH = 32  # the session server's --max-num-seqs
FLOOD = 60  # above its batch (32 + headroom 2)


def added_order(log: str, tag: str) -> list[str]:
    """This test's external ids in the order vLLM added their requests to the engine."""
    return re.findall(rf"Added request cmpl-{tag}-([ab]-\d+)", log)


async def tenants(c: httpx.AsyncClient) -> dict[str, dict]:
    body = (await c.get("/skyrl/v1/loras")).json()
    return {t["tenant"]: t for t in body["tenants"]}


async def test_a_light_tenant_is_admitted_before_the_floods_backlog(client, server_proc):
    tag = uuid.uuid4().hex[:8]

    async def ask(model: str, rid: str, tokens: int) -> int:
        r = await client.post(
            "/v1/completions",
            json={
                "model": model,
                "prompt": "the cat says",
                "max_tokens": tokens,
                "ignore_eos": True,
            },
            headers={"X-Request-Id": f"{tag}-{rid}"},
        )
        return r.status_code

    flood = [asyncio.create_task(ask("meow", f"a-{i}", 400)) for i in range(FLOOD)]
    try:
        async with asyncio.timeout(120):
            while True:  # (the server's state, polled)
                if (await tenants(client)).get("meow", {}).get("queued", 0) >= FLOOD // 4:
                    break
                await asyncio.sleep(0.2)
        share = (await tenants(client))["meow"]
        queued = share["queued"]
        assert queued >= FLOOD // 4
        # The reserve (fair_share_reserve=1): a running tenant fills at most the batch
        # minus one slot; the rest is for a tenant with nothing running, as B below.
        assert share["running"] <= BATCH - 1, share
        light = asyncio.create_task(ask("woof", "b-0", 4))
        assert await asyncio.wait_for(light, 120) == 200
        order = added_order(server_proc.log.read_text(errors="replace"), tag)
        assert "b-0" in order, order
        before = order.index("b-0")
        # B went in at the next free slot: A's requests still queued when it arrived
        # (at least `queued` of them) entered the engine after it.
        assert FLOOD - before >= queued - 2, (before, queued, order)
        r = await post(client, "abort_lora_requests", {"lora_name": "meow"})
        assert r["aborted"] >= 1
        codes = await asyncio.wait_for(asyncio.gather(*flood), 120)
        assert set(codes) == {200}  # ended partial, not refused
        share = await tenants(client)
        assert share["meow"]["queued"] == 0 and share["meow"]["running"] == 0
        assert share["woof"]["service_tokens"] > 0
    finally:
        for t in flood:
            t.cancel()


async def test_weights_and_caps_at_run_time_are_listed(client):
    r = await post(client, "tenants", {"tenant": "woof", "weight": 2.5, "max_in_flight": 4})
    assert r == {
        "tenant": "woof",
        "weight": 2.5,
        "max_in_flight": 4,
        **{k: r[k] for k in ("running", "queued", "service_tokens")},
    }
    try:
        listed = await tenants(client)
        assert listed["woof"]["weight"] == 2.5 and listed["woof"]["max_in_flight"] == 4
        bad = await client.post("/skyrl/v1/tenants", json={"tenant": "woof", "weight": 0})
        assert bad.status_code == 400 and "weight" in bad.json()["error"]["message"]
        # An infinite weight (JSON 1e999) would never be charged: refused, not listed null.
        for raw in (b"1e999", b"Infinity", b"NaN", b"1e-9"):
            bad = await client.post(
                "/skyrl/v1/tenants",
                content=b'{"tenant": "woof", "weight": ' + raw + b"}",
                headers={"content-type": "application/json"},
            )
            assert bad.status_code == 400 and "weight" in bad.json()["error"]["message"], raw
        assert (await tenants(client))["woof"]["weight"] == 2.5  # the previous one serves
        # One request wider than the tenant's cap, or than the engine's batch (32 + 2),
        # would hold what no share gives: on an adapter it is served in parts, each as
        # wide as the share (every sample whole, attributed); on the base model, which
        # the gate does not continue, a 400, not a fall back to the whole engine.
        for model, n in (("woof", 5), ("meow", 35)):
            body = {
                "model": model,
                "prompt": "hi",
                "max_tokens": 2,
                "n": n,
                "temperature": 1,
                "seed": 3,
                "ignore_eos": True,
            }
            wide = await client.post("/v1/completions", json=body)
            assert wide.status_code == 200, wide.text
            choices = wide.json()["choices"]
            assert sorted(c["index"] for c in choices) == list(range(n))
            assert {c["finish_reason"] for c in choices} == {"length"}
            assert all(c["lora_versions"][-1]["end"] == 2 for c in choices), choices
            assert wide.json()["usage"]["completion_tokens"] == 2 * n
        # Streamed: every sample's tokens arrive under its own index, each ends once.
        stream = {**body, "model": "woof", "n": 5, "stream": True}
        texts: dict[int, str] = {}
        ended: list[int] = []
        async with client.stream("POST", "/v1/completions", json=stream) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                    if c["finish_reason"] is not None:
                        ended.append(c["index"])
        assert sorted(ended) == sorted(texts) == list(range(5)), (ended, texts)
        base = await client.post("/v1/completions", json={**body, "model": "toy-base"})
        assert base.status_code == 400, base.text
        assert "at once (34" in base.json()["error"]["message"]
        assert (await tenants(client))["woof"]["running"] == 0
    finally:
        await post(client, "tenants", {"tenant": "woof", "weight": 1.0, "max_in_flight": None})
    assert (await tenants(client))["woof"]["max_in_flight"] is None
