"""A fleet that converges and outlives its supervisor, on real engines in a loopback Ray
cluster (nodes 127.0.0.1-3): control calls recorded and converged onto a replica that was
restarting, the retention window restored, the supervisor killed during traffic and
during a restore (replicas keep serving, the new one adopts them and finishes), and
``scale(3)`` then ``scale(1)`` under load. One cluster and one fleet for all phases."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from engine_helpers import words

from vllm_lora_ext import broadcast
from vllm_lora_ext.toy.server import server_args

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from ray_actors.supervisor import follow, start_supervised, stop_supervised  # noqa: E402

FLEET = "fleet-test"
MAX_TOKENS = 400


def status(sup) -> dict:
    return ray.get(sup.status.remote(), timeout=120)


def wait_status(sup, pred, what: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    st = status(sup)
    while not pred(st):
        assert time.monotonic() < deadline, f"{what}: {st}"
        time.sleep(1)
        st = status(sup)
    return st


def served(url: str) -> dict:
    r = httpx.get(f"{url}/skyrl/v1/loras", timeout=60)
    return {a["lora_name"]: a for a in r.json()["adapters"]}


def greedy(url: str, model: str) -> str:
    body = {"model": model, "prompt": "the cat says", "max_tokens": 10, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, (url, model, r.text)
    return r.json()["choices"][0]["text"]


def slot_of(st: dict, url: str) -> int:
    return next(r["slot"] for r in st["replicas"] if r["url"] == url)


async def samples(client, n: int, **kw) -> list:
    sampling = {"temperature": 1.0, "ignore_eos": True}
    return await asyncio.gather(
        *(
            client.sample_with_retry(
                "meow", prompt="the cat says", max_tokens=MAX_TOKENS, **sampling, **kw
            )
            for _ in range(n)
        )
    )


def assert_whole(results) -> None:
    for r in results:
        (s,) = r.samples
        assert len(s.token_ids) == len(s.logprobs) == MAX_TOKENS, s.finish_reason
        assert s.finish_reason == "length"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(
        initialize_head=True,
        head_node_args={"node_ip_address": "127.0.0.1", "num_cpus": 1, "include_dashboard": False},
    )
    c.add_node(node_ip_address="127.0.0.2", num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="lora-ext-tests")
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def test_the_fleet_converges_and_outlives_its_supervisor(cluster, toy, tmp_path):
    root = tmp_path / "bc"
    steps = {
        n: str(broadcast.publish(toy.adapters[w], root, n).path)
        for n, w in ((12, "meow"), (13, "woof"), (14, "meow"))
    }
    sup, urls = start_supervised(
        server_args(toy), 2, name=FLEET, check_every_s=1.0, max_failed_probes=2
    )
    assert len(urls) == 2
    try:
        client = follow(sup, down_for_s=2.0, refresh_every_s=1.0)
        asyncio.run(_phases(client, sup, cluster, steps))
    finally:
        stop_supervised(sup)
    assert ray.util.list_named_actors() == [] or all(
        not n.startswith(f"lora_ext/{FLEET}") for n in ray.util.list_named_actors()
    )


async def _phases(client, sup, cluster, steps) -> None:
    async with client:
        for n in (12, 13):
            await client.sync_lora("meow", steps[n], version=n)
        await client.load_lora_adapter("tmp", steps[12])

        # -- a replica restarts; a sync and an unload reach it before it is listed --------
        st = status(sup)
        a_url, b_url = st["urls"]
        b_slot = slot_of(st, b_url)
        ray.kill(ray.get_actor(f"lora_ext/{FLEET}/replica-{b_slot}.0"), no_restart=True)
        st = await asyncio.to_thread(
            wait_status, sup, lambda s: b_url not in s["urls"], "b unlisted", 120
        )
        await client.sync_lora("meow", steps[14], version=14)
        await client.unload_lora_adapter("tmp")
        st = await asyncio.to_thread(wait_status, sup, lambda s: len(s["urls"]) == 2, "b back", 600)
        assert st["revision"] >= 5
        for url in st["urls"]:
            state = served(url)
            assert "tmp" not in state and state["meow"]["version"] == 14, (url, state)
            resident = {v["version"] for v in state["meow"]["versions"] if not v["unloaded"]}
            assert {13, 14} <= resident, (url, state)  # 13: inside the window
        texts = {url: greedy(url, "meow@14") for url in st["urls"]}
        assert len(set(texts.values())) == 1 and set(words(texts[a_url])) == {"meow"}, texts
        olds = {url: greedy(url, "meow@13") for url in st["urls"]}
        assert len(set(olds.values())) == 1 and set(words(olds[a_url])) == {"woof"}, olds

        # -- the supervisor dies during traffic: nothing lost, replicas keep serving ------
        before = status(sup)
        traffic = asyncio.ensure_future(samples(client, 2))
        await asyncio.sleep(3)
        ray.kill(sup, no_restart=False)  # Ray restarts it; it re-adopts
        assert_whole(await asyncio.wait_for(traffic, 600))
        after = await asyncio.to_thread(
            wait_status, sup, lambda s: len(s["urls"]) == 2, "adopted", 300
        )
        assert sorted(after["urls"]) == sorted(before["urls"])  # adopted, not restarted
        assert after["revision"] == before["revision"]

        # -- ... and during a restore: the new one finishes it ---------------------------
        a_slot = slot_of(after, a_url)
        gen = next(r for r in after["replicas"] if r["slot"] == a_slot)
        assert gen["restarts"] == 0
        ray.kill(ray.get_actor(f"lora_ext/{FLEET}/replica-{a_slot}.0"), no_restart=True)
        await asyncio.to_thread(
            wait_status,
            sup,
            lambda s: any(
                r["slot"] == a_slot and r["state"] in ("starting", "restarting")
                for r in s["replicas"]
            ),
            "a restarting",
            120,
        )
        ray.kill(sup, no_restart=False)
        st = await asyncio.to_thread(
            wait_status, sup, lambda s: len(s["urls"]) == 2, "restore finished", 600
        )
        for url in st["urls"]:
            assert served(url)["meow"]["version"] == 14

        # -- scale(3) then scale(1) under load ------------------------------------------
        cluster.add_node(node_ip_address="127.0.0.3", num_cpus=1)
        traffic = asyncio.ensure_future(samples(client, 4))
        urls3 = await asyncio.wrap_future(sup.scale.remote(3).future())
        assert len(urls3) == 3
        for url in urls3:
            assert served(url)["meow"]["version"] == 14
        urls1 = await asyncio.wrap_future(sup.scale.remote(1).future())
        assert len(urls1) == 1
        assert_whole(await asyncio.wait_for(traffic, 600))
        more = await samples(client, 2)  # the client follows the new set
        assert_whole(more)
        assert {r.replica for r in more} == set(urls1)
