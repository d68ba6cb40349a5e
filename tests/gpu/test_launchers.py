"""The other two ways to run the extension: as a plugin of vLLM's own launcher, and in
a Ray actor. Each starts its own engine and must leave no engine process behind."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import httpx
import psutil
import pytest
from engine_helpers import PROMPT

from vllm_lora_ext.toy.server import free_port, server_args, start_server, stock_vllm_cmd


def _smoke(url: str, headers: dict[str, str] | None = None) -> None:
    """Our routes and vLLM's own, on one app, with the static adapters adopted."""
    with httpx.Client(base_url=url, timeout=120, headers=headers) as c:
        state = c.get("/skyrl/v1/loras").json()["adapters"]
        assert {a["lora_name"]: a["version"] for a in state} == {"meow": 1, "woof": 1}
        models = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert {"toy-base", "meow", "woof"} <= models
        assert c.get("/health").status_code == 200
        metrics = c.get("/metrics").text
        assert "vllm:" in metrics
        assert 'lora_ext_swaps_total{lora_name="meow",outcome="ok"} 1.0' in metrics
        assert 'lora_ext_resident_versions{lora_name="woof"} 1.0' in metrics
        r = c.post(
            "/v1/completions",
            json={"model": "woof", "prompt": PROMPT, "max_tokens": 6, "temperature": 0},
        )
        assert r.json()["choices"][0]["text"].split() == ["woof"] * 6
        assert c.post("/skyrl/v1/pause", json={"lora_name": "meow", "mode": "abort"}).json()[
            "paused"
        ]
        assert c.post("/skyrl/v1/resume", json={"lora_name": "meow"}).status_code == 200


def _route_table(log: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(open, guarded) as (method, path), from the table the guard logs at start-up."""
    line = next(
        line for line in log.read_text().splitlines() if "open without the admin key:" in line
    )
    opened, guarded = line.split("open without the admin key:", 1)[1].split(" | guarded: ")

    def pairs(text: str) -> list[tuple[str, str]]:
        out = []
        for item in filter(None, (x.strip() for x in text.split(";"))):
            methods, path = item.split(" ", 1)
            out += [(m, path) for m in methods.split(",") if m != "HEAD"]
        return out

    return pairs(opened), pairs(guarded)


def _every_route_needs_the_key_but_the_open_ones(url: str, log: Path) -> None:
    """The live app's whole route table, with a key set and --root-path /api: every
    route but the open list answers 401 without the key, at /path and at /api/path."""
    opened, guarded = _route_table(log)
    paths = {p for _, p in guarded}
    for must in ("/collective_rpc", "/sleep", "/wake_up", "/update_weights", "/pause"):
        assert must in paths, (must, sorted(paths))
    assert ("/inference/v1/abort_requests" in paths) and ("/adapters" in paths)
    assert ("POST", "/v1/completions") in opened and ("GET", "/health") in opened
    with httpx.Client(base_url=url, timeout=60) as c:
        for method, path in guarded:
            concrete = re.sub(r"{[^}]+}", "x", path) if method != "*" else path + "/x"
            for prefix in ("", "/api"):
                for m in ("GET", "POST") if method == "*" else (method,):
                    r = c.request(m, prefix + concrete, json={})
                    assert r.status_code == 401, (m, prefix + concrete, r.status_code, r.text)
        for method, path in opened:
            if "{" in path:
                continue
            for prefix in ("", "/api"):
                r = c.request(method, prefix + path, json={})
                assert r.status_code != 401, (method, prefix + path)


async def _priority_orders_only_its_tenants_queue(url: str) -> None:
    """Under vLLM's priority policy, one request at a time: while woof's long request
    runs, meow's request and then the base model's with priority -10 enter the engine's
    queue (the fair share's headroom). Had the engine seen -10, the base model's would
    run first; it sees 0, so they run in the order they came."""

    async def ask(c: httpx.AsyncClient, model: str, tokens: int, priority: int = 0) -> str:
        body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True}
        r = await c.post("/v1/completions", json={**body, "priority": priority})
        assert r.status_code == 200, r.text
        return model

    async def running(c: httpx.AsyncClient, tenant: str) -> None:
        for _ in range(600):  # (the server's state, polled: it lasts while woof runs)
            listed = {t["tenant"]: t for t in (await c.get("/skyrl/v1/loras")).json()["tenants"]}
            if listed.get(tenant, {}).get("running"):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{tenant} never ran")

    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        long = asyncio.create_task(ask(c, "woof", 1000))
        await running(c, "woof")
        first = asyncio.create_task(ask(c, "meow", 100))
        await running(c, "meow")
        urgent = asyncio.create_task(ask(c, "toy-base", 100, priority=-10))
        await running(c, "__base__")
        assert not long.done()  # both queued in the engine behind it
        done, _ = await asyncio.wait([first, urgent], return_when=asyncio.FIRST_COMPLETED)
        assert [t.result() for t in done] == ["meow"]
        await asyncio.gather(long, first, urgent)


def test_plugin_loads_into_stock_vllm_launcher(toy, tmp_path):
    """Stock vLLM's launcher with the plugin, configured from the environment: admin
    token, allowed roots, metrics; under vLLM's priority policy, one sequence at a time."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    shutil.copytree(toy.adapters["woof"], outside)
    (allowed / "escape").symlink_to(outside)
    port = free_port()
    env = {
        "VLLM_PLUGINS": "lora_ext",
        "LORA_EXT_ADMIN_KEY": "sekret",
        "LORA_EXT_LORA_ROOTS": json.dumps([str(toy.root), str(allowed)]),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_SERVER_DEV_MODE": "1",
    }
    cmd = [*stock_vllm_cmd(toy, port), "--root-path", "/api"]
    cmd += ["--scheduling-policy", "priority", "--max-num-seqs", "1"]
    server = start_server(cmd, port, tmp_path / "stock.log", env)
    try:
        _smoke(server.url, {"Authorization": "Bearer sekret"})
        asyncio.run(_priority_orders_only_its_tenants_queue(server.url))
        _every_route_needs_the_key_but_the_open_ones(server.url, tmp_path / "stock.log")
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for token in (None, "Bearer wrong"):
                r = c.post(
                    "/skyrl/v1/pause",
                    json={"lora_name": "meow"},
                    headers={"Authorization": token} if token else {},
                )
                assert r.status_code == 401 and "admin token" in r.json()["error"]["message"]
            assert c.get("/skyrl/v1/state").status_code == 401
            assert c.get("/skyrl/v1/loras").status_code == 200  # read-only: open
            auth = {"Authorization": "Bearer sekret"}
            for path, status in [
                (outside, 403),
                (allowed / "escape", 403),  # a symlink out of a root
                (allowed / ".." / "outside", 400),
            ]:
                r = c.post(
                    "/skyrl/v1/load_lora_adapter",
                    json={"lora_name": "x", "lora_path": str(path)},
                    headers=auth,
                )
                assert r.status_code == status, r.text
            big = c.post(
                "/skyrl/v1/load_lora_adapter",
                content=b'{"lora_name": "' + b"x" * 100_000 + b'"}',
                headers={**auth, "content-type": "application/json"},
            )
            assert big.status_code == 413
            # vLLM's generation routes are not behind our token; its control routes are,
            # and its LoRA routes go through the extension.
            assert c.get("/v1/models").status_code == 200
            load = {"lora_name": "v1name", "lora_path": str(toy.adapters["meow"])}
            for path, body in (("/v1/load_lora_adapter", load), ("/pause", None)):
                r = c.post(path, json=body)
                assert r.status_code == 401, (path, r.text)
            assert c.post("/v1/load_lora_adapter", json=load, headers=auth).status_code == 200
            names = {
                a["lora_name"] for a in c.get("/skyrl/v1/loras", headers=auth).json()["adapters"]
            }
            assert "v1name" in names
            r = c.post("/v1/unload_lora_adapter", json={"lora_name": "v1name"}, headers=auth)
            assert r.status_code == 200, r.text
        log = (tmp_path / "stock.log").read_text()
        assert '"event": "lora_ext.control", "action": "pause"' in log and '"status": 401' in log
    finally:
        server.stop()
    assert not server.leftover_children()


def test_stock_launcher_without_allowlist_has_no_routes(toy, tmp_path):
    """Endpoint plugins are opt-in: without VLLM_PLUGINS the routes must not appear."""
    port = free_port()
    cmd = stock_vllm_cmd(toy, port)
    env = {"VLLM_PLUGINS": ""}
    server = start_server(cmd, port, tmp_path / "stock.log", env)
    try:
        assert httpx.get(f"{server.url}/skyrl/v1/loras", timeout=10).status_code == 404
    finally:
        server.stop()
    assert not server.leftover_children()


def test_ray_actor_serves_and_shuts_down_cleanly(toy):
    ray = pytest.importorskip("ray")
    from ray_actors.server_actor import launch_servers, shutdown_servers

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        actors, urls = launch_servers(server_args(toy), num_servers=1)
        try:
            assert ray.get(actors[0].health.remote())
            pids = ray.get(actors[0].engine_pids.remote())
            core = ray.get(actors[0].engine_core_pids.remote())
            assert core and set(core) <= set(pids), (core, pids)
            procs = [psutil.Process(p) for p in pids]
            _smoke(urls[0])
        finally:
            shutdown_servers(actors)
        _gone, alive = psutil.wait_procs(procs, timeout=15)
        assert not alive, f"processes left behind: {[(p.pid, p.name()) for p in alive]}"
    finally:
        ray.shutdown()
