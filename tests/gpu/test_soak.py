"""A shortened reliability soak (the recorded run is bench/soak.py): clients, a
swapper as fast as it can go, random pause/abort/resume; nothing lost, no 5xx."""

from __future__ import annotations

from engine_helpers import server_pid

from vllm_lora_ext.toy.soak import SoakConfig, soak


async def test_short_soak(client, server, toy):
    paths = [str(toy.adapters["meow"]), str(toy.adapters["woof"])]
    cfg = SoakConfig(
        duration_s=30,
        adapters={"soak-a": paths, "soak-b": paths[::-1]},
        retry_clients=2,
        plain_clients=1,
        max_tokens=48,
        chaos_every_s=0.5,
    )
    report = await soak(server, cfg, server_pid(server))
    rows = dict(report.rows())
    assert report.ok, rows | {"failures": report.failures[:10], "leftover": report.leftover}
    assert report.swaps > 50 and sum(report.chaos.values()) > 20
    assert report.completed > 20
