"""The other two ways to run the extension: as a plugin of vLLM's own launcher, and in
a Ray actor. Each starts its own engine and must leave no engine process behind."""

from __future__ import annotations

import httpx
import psutil
import pytest
from engine_helpers import PROMPT

from vllm_lora_ext.toy_server import free_port, server_args, start_server, stock_vllm_cmd


def _smoke(url: str) -> None:
    """Our routes and vLLM's own, on one app, with the static adapters adopted."""
    with httpx.Client(base_url=url, timeout=120) as c:
        state = c.get("/skyrl/v1/loras").json()["adapters"]
        assert {a["lora_name"]: a["version"] for a in state} == {"meow": 1, "woof": 1}
        models = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert {"toy-base", "meow", "woof"} <= models
        assert c.get("/health").status_code == 200
        assert "vllm:" in c.get("/metrics").text
        r = c.post(
            "/v1/completions",
            json={"model": "woof", "prompt": PROMPT, "max_tokens": 6, "temperature": 0},
        )
        assert r.json()["choices"][0]["text"].split() == ["woof"] * 6
        assert c.post("/skyrl/v1/pause", json={"lora_name": "meow", "mode": "abort"}).json()[
            "paused"
        ]
        assert c.post("/skyrl/v1/resume", json={"lora_name": "meow"}).status_code == 200


def test_plugin_loads_into_stock_vllm_launcher(toy, tmp_path):
    port = free_port()
    cmd = stock_vllm_cmd(toy, port)
    server = start_server(cmd, port, tmp_path / "stock.log", {"VLLM_PLUGINS": "lora_ext"})
    try:
        _smoke(server.url)
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
            procs = [psutil.Process(p) for p in ray.get(actors[0].engine_pids.remote())]
            assert any("EngineCore" in p.name() for p in procs), procs
            _smoke(urls[0])
        finally:
            shutdown_servers(actors)
        _gone, alive = psutil.wait_procs(procs, timeout=15)
        assert not alive, f"processes left behind: {[(p.pid, p.name()) for p in alive]}"
    finally:
        ray.shutdown()
