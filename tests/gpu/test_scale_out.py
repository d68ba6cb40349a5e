"""Replicas on a Ray cluster: placement groups per replica, each serving on its node's
address, a tensor-parallel replica inside its reservation, and requests the cluster
cannot hold refused before any engine starts. Nodes are simulated on distinct loopback
addresses; nothing listens or connects outside 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from engine_helpers import vllm_metric, words

from vllm_lora_ext.toy.server import server_args

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from ray_actors.placement import PlacementError  # noqa: E402
from ray_actors.server_actor import launch_servers, shutdown_servers  # noqa: E402
from ray_actors.supervisor import follow, start_supervised, stop_supervised  # noqa: E402
from vllm_lora_ext import broadcast  # noqa: E402
from vllm_lora_ext.client import _rendezvous  # noqa: E402

HAS_GPU = bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or any(
    os.path.exists(f"/dev/nvidia{i}") for i in range(8)
)


def complete(url: str, model: str, tokens: int = 6) -> dict:
    body = {
        "model": model,
        "prompt": "the cat says",
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()


def our_sockets() -> list[tuple[str, str, str]]:
    """(local, peer, process) of every TCP socket this test's process tree holds."""
    pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    out = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            cols = line.split()
            found.append((cols[3], cols[4], " ".join(cols[5:])))
    return found


def host_of(endpoint: str) -> str:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    return host.removeprefix("::ffff:")


RAY_OWN = ('"ray::', '"raylet"', '"gcs_server"')


def assert_loopback_only(urls: list[str]) -> None:
    """Every connection stays in 127.0.0.0/8 and each replica listens on its node's
    address only. Ray 2.60's own gRPC servers listen on every interface on a node whose
    IP is not exactly 127.0.0.1 (its localhost-only switch compares the string): that
    listener is Ray's, tolerated here, and no traffic leaves loopback through it."""
    ours = {urlsplit(u).port: urlsplit(u).hostname for u in urls}
    sockets = our_sockets()
    assert sockets, "no sockets seen: the check would prove nothing"
    seen = set()
    for local, peer, proc in sockets:
        host, port = host_of(local), int(local.rsplit(":", 1)[1])
        if peer.endswith(":*"):  # listening
            if port in ours:
                assert host == ours[port], f"replica on {local}, not {ours[port]}: {proc}"
                seen.add(port)
            elif host in ("*", "0.0.0.0", "::"):
                assert any(r in proc for r in RAY_OWN), f"every interface: {local} {proc}"
            else:
                assert ipaddress.ip_address(host).is_loopback, (local, proc)
        else:
            for end in (local, peer):
                assert ipaddress.ip_address(host_of(end)).is_loopback, (local, peer, proc)
    assert seen == set(ours), f"replica listeners not found: {ours}"


# Tasks run this module's functions on other nodes, where it is not importable.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@ray.remote(num_cpus=0)
def fetch(url: str) -> tuple[int, str]:
    """From another node: the replica's health and one completion's text."""
    health = httpx.get(f"{url}/health", timeout=30).status_code
    return health, complete(url, "meow")["choices"][0]["text"]


def test_two_replicas_on_two_nodes_serve_on_their_node_addresses(toy):
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"node_ip_address": "127.0.0.1", "num_cpus": 1, "include_dashboard": False},
    )
    cluster.add_node(node_ip_address="127.0.0.2", num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        actors, urls = launch_servers(server_args(toy), num_servers=2)
        try:
            hosts = sorted(urlsplit(u).hostname for u in urls)
            assert hosts == ["127.0.0.1", "127.0.0.2"], urls
            nodes = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
            for url in urls:
                other = next(ip for ip in nodes if ip != urlsplit(url).hostname)
                pinned = NodeAffinitySchedulingStrategy(nodes[other], soft=False)
                health, text = ray.get(fetch.options(scheduling_strategy=pinned).remote(url))
                assert health == 200 and set(words(text)) == {"meow"}
            # Bound to its node's address only: the same port on another address is shut.
            remote = next(u for u in urls if urlsplit(u).hostname == "127.0.0.2")
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{urlsplit(remote).port}/health", timeout=5)
            assert_loopback_only(urls)
        finally:
            shutdown_servers(actors)
        assert not ray.util.placement_group_table() or all(
            g["state"] == "REMOVED" for g in ray.util.placement_group_table().values()
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_tp2_replica_runs_in_its_placement_group_with_per_adapter_control(toy):
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with pytest.raises(PlacementError, match="2 CPU on one node, 1 fit"):
            launch_servers([*server_args(toy), "--tensor-parallel-size", "2"], num_servers=2)
        actors, (url,) = launch_servers(
            [*server_args(toy), "--tensor-parallel-size", "2"],
            env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        )
        try:
            (group,) = [
                g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"
            ]
            assert group["strategy"] == "STRICT_PACK" and len(group["bundles"]) == 2
            assert set(words(complete(url, "meow")["choices"][0]["text"])) == {"meow"}
            # A swap reaches both ranks: woof's weights under the name meow, greedy.
            r = httpx.post(
                f"{url}/skyrl/v1/load_lora_adapter",
                json={"lora_name": "meow", "lora_path": str(toy.adapters["woof"])},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            assert set(words(complete(url, "meow")["choices"][0]["text"])) == {"woof"}
            # Per-adapter pause: meow's request is held, woof serves meanwhile.
            assert httpx.post(f"{url}/skyrl/v1/pause", json={"lora_name": "meow"}).is_success
            with ThreadPoolExecutor(1) as pool:
                held = pool.submit(complete, url, "meow")
                for _ in range(200):
                    loras = httpx.get(f"{url}/skyrl/v1/loras").json()["adapters"]
                    if {a["lora_name"]: a["held"] for a in loras}.get("meow") == 1:
                        break
                    time.sleep(0.05)
                else:
                    raise AssertionError(f"meow's request was not held: {loras}")
                assert set(words(complete(url, "woof")["choices"][0]["text"])) == {"woof"}
                assert not held.done()
                assert httpx.post(f"{url}/skyrl/v1/resume", json={"lora_name": "meow"}).is_success
                assert set(words(held.result(timeout=120)["choices"][0]["text"])) == {"woof"}
            # Per-adapter abort: woof's long request ends now, meow keeps serving.
            # Abort once it has made tokens (the engine's own counter: in flight alone
            # can still be before its first token on two starved cores).
            made = vllm_metric(url, "vllm:generation_tokens_total")
            with ThreadPoolExecutor(1) as pool:
                long = pool.submit(complete, url, "woof", 3000)
                for _ in range(600):
                    if vllm_metric(url, "vllm:generation_tokens_total") >= made + 2:
                        break
                    time.sleep(0.05)
                else:
                    raise AssertionError("woof's long request made no tokens in 30 s")
                aborted = httpx.post(
                    f"{url}/skyrl/v1/abort_lora_requests", json={"lora_name": "woof"}
                ).json()
                assert aborted == {"lora_name": "woof", "aborted": 1}
                choice = long.result(timeout=120)["choices"][0]
                assert choice["finish_reason"] == "abort" and len(choice["text"]) > 0
            assert set(words(complete(url, "meow")["choices"][0]["text"])) == {"woof"}
        finally:
            shutdown_servers(actors)
    finally:
        ray.shutdown()


def test_a_replica_lost_with_its_node_mid_sample_comes_back_on_a_new_node(toy, tmp_path):
    """Two replicas on two nodes serve woof's weights as meow@12 (woof paused). A group
    of samples streams from the replica on 127.0.0.2 when that node leaves the cluster;
    127.0.0.3 joins. Every sample ends with exactly max_tokens (what the lost replica
    made is kept, the rest is made on the other), the same tokens as an uninterrupted
    greedy run; the supervisor brings the replica back on the new node with the same
    version, path and pause; the client follows the new replica set on its own. Then
    the other replica's engine dies under its live actor: restarted and restored too."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"node_ip_address": "127.0.0.1", "num_cpus": 1, "include_dashboard": False},
    )
    doomed = cluster.add_node(node_ip_address="127.0.0.2", num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        sup, urls = start_supervised(server_args(toy), num_servers=2, check_every_s=1.0)
        try:
            remote = next(u for u in urls if urlsplit(u).hostname == "127.0.0.2")
            step = broadcast.publish(toy.adapters["woof"], tmp_path / "bc", 12).path
            pids = ray.get(
                next(
                    a
                    for a, u in zip(ray.get(sup.replicas.remote()), urls, strict=True)
                    if u == remote
                ).engine_pids.remote()
            )
            client = follow(sup, down_for_s=2.0, refresh_every_s=1.0)
            results, reference = asyncio.run(
                _sample_through_node_loss(client, cluster, doomed, remote, str(step))
            )
            cluster.add_node(node_ip_address="127.0.0.3", num_cpus=1)  # (main thread only)
            client_urls = asyncio.run(_follow_until_back(client, remote))
            status = ray.get(sup.status.remote())
            assert status["restarts"] == 1 and _only_probe_failures(status), status
            hosts = sorted(urlsplit(u).hostname for u in status["urls"])
            assert hosts == ["127.0.0.1", "127.0.0.3"], status
            assert sorted(client_urls) == sorted(status["urls"])  # the client followed

            for sample in (r.samples[0] for r in results):
                assert sample.attempts >= 2, "the node left after the samples ended"
                assert sample.token_ids == reference.token_ids  # nothing lost or repeated
                assert len(sample.logprobs) == len(sample.token_ids) == LOST_MAX
                assert sample.finish_reason == "length"
                # the lost replica's tokens kept their version (spans on every chunk)
                assert sample.lora_versions == [{"version": 12, "start": 0, "end": LOST_MAX}]

            # An engine that dies under a live actor: vLLM's watchdog stops the server,
            # the supervisor sees it and restarts that replica too, in its place.
            head = next(u for u in status["urls"] if urlsplit(u).hostname == "127.0.0.1")
            actor = next(
                a
                for a, u in zip(
                    ray.get(sup.replicas.remote()), ray.get(sup.urls.remote()), strict=True
                )
                if u == head
            )
            (core,) = ray.get(actor.engine_core_pids.remote())
            os.kill(core, signal.SIGKILL)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not (
                status["restarts"] == 2 and len(status["urls"]) == 2
            ):
                time.sleep(1)
                status = ray.get(sup.status.remote())
            assert status["restarts"] == 2 and _only_probe_failures(status), status
            assert head not in status["urls"], status  # a new replica, on a new port
            hosts = sorted(urlsplit(u).hostname for u in status["urls"])
            assert hosts == ["127.0.0.1", "127.0.0.3"], status

            for url in status["urls"]:
                state = {
                    a["lora_name"]: a for a in httpx.get(f"{url}/skyrl/v1/loras").json()["adapters"]
                }
                assert state["meow"]["version"] == 12 and state["woof"]["paused"], state
                assert {v["path"] for v in state["meow"]["versions"] if v["version"] == 12} == {
                    str(step)
                }
            texts = [complete(u, "meow@12", 12)["choices"][0]["text"] for u in status["urls"]]
            assert texts[0] == texts[1] and set(words(texts[0])) == {"woof"}, texts
            procs = []
            for pid in pids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    procs.append(psutil.Process(pid))
            _gone, alive = psutil.wait_procs(procs, timeout=30)
            assert not alive, f"the lost replica's engine lingers: {alive}"
            assert_loopback_only(status["urls"])
        finally:
            stop_supervised(sup)
    finally:
        ray.shutdown()
        cluster.shutdown()


LOST_MAX = 1200


def _only_probe_failures(status: dict) -> bool:
    """What went wrong was the replicas dying (failed probes, a dying server's timeouts),
    nothing in restoring them (no control call refused)."""
    routes = ("load_lora_adapter", "unload_lora_adapter", "pin_lora_adapter", "pause", "resume")
    return not any(r in f for f in status["failures"] for r in routes)


async def _sample_through_node_loss(client, cluster, doomed, remote: str, step: str):
    async with client:
        await client.load_lora_adapter("meow", step, version=12)
        await client.pause_generation("woof", mode="abort")
        await asyncio.sleep(2.5)  # a supervisor check snapshots what they serve
        urls = [r.url for r in client.replicas]
        session = next(
            f"group-{i}"
            for i in range(1000)
            if max(urls, key=lambda u: _rendezvous(f"group-{i}", u)) == remote
        )
        sampling = {"temperature": 0, "ignore_eos": True}
        group = asyncio.gather(
            *(
                client.sample_with_retry(
                    "meow",
                    version=12,
                    prompt="the cat says",
                    max_tokens=LOST_MAX,
                    session=session,  # a GRPO group: one key, one replica
                    **sampling,
                )
                for _ in range(2)
            )
        )
        for _ in range(1200):
            if group.done() or vllm_metric(remote, "vllm:num_requests_running") >= 2:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # tokens are streaming
        assert not group.done()
        await asyncio.to_thread(cluster.remove_node, doomed)
        async with asyncio.timeout(600):
            results = await group
        reference = await client.sample(
            "meow", version=12, prompt="the cat says", max_tokens=LOST_MAX, **sampling
        )
        return results, reference.samples[0]


async def _follow_until_back(client, lost: str) -> list[str]:
    """Sample until the client lists two replicas, the lost one not among them."""
    async with client, asyncio.timeout(600):
        while len(client.replicas) < 2 or lost in {r.url for r in client.replicas}:
            await client.sample("meow", prompt="the cat says", max_tokens=1)
            await asyncio.sleep(1.0)
        return [r.url for r in client.replicas]


@pytest.mark.skipif(not HAS_GPU, reason="needs 2 GPUs: TP=2 under vLLM's Ray executor")
def test_tp2_replica_on_gpus_uses_the_ray_executor_in_its_placement_group(toy):
    ray.init(include_dashboard=False)
    try:
        if ray.cluster_resources().get("GPU", 0) < 2:
            pytest.skip("needs 2 GPUs on one node")
        actors, (url,) = launch_servers([*server_args(toy), "--tensor-parallel-size", "2"])
        try:
            assert set(words(complete(url, "meow")["choices"][0]["text"])) == {"meow"}
        finally:
            shutdown_servers(actors)
    finally:
        ray.shutdown()
