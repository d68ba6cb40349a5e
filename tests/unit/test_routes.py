"""The /skyrl/v1 routes in-process, over a real LoraManager on a fake engine: admin
token, body limit, allowed roots, one JSON log line per action, and a schema-driven fuzz
of every route (no 5xx, no hang)."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import httpx
import pytest
import schemathesis
from fakes import FakeEngine, write_adapter
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.server.manager import LoraManager
from vllm_lora_ext.server.routes import router


def build_app(tmp_path, engine: FakeEngine | None = None, **cfg) -> tuple[FastAPI, LoraManager]:
    config = LoraExtConfig(hold_timeout_s=0.2, drain_timeout_s=0.2, stable_wait_s=0.2, **cfg)
    manager = LoraManager(engine or FakeEngine(), config)
    manager.install()
    app = FastAPI()
    app.include_router(router)
    app.state.lora_ext = manager
    return app, manager


@pytest.fixture
async def served(tmp_path):
    app, manager = build_app(tmp_path, admin_key="sekret", lora_roots=[tmp_path / "ok"])
    await manager.load("meow", str(write_adapter(tmp_path / "ok" / "meow")))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c, manager
    await manager.shutdown()


AUTH = {"Authorization": "Bearer sekret"}


async def test_tenant_settings_are_bounded_over_the_route(tmp_path):
    """Past the bound a new name's setting is a 400 naming the way out, nothing kept;
    the count is in /state with the rest of the server's per-name state."""
    engine = FakeEngine()
    engine.vllm_config.scheduler_config = SimpleNamespace(max_num_seqs=4)  # share on
    app, manager = build_app(tmp_path, engine, admin_key="sekret")
    manager.gate.share.max_tenants = 2  # (4096 on a server: the same check)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for name in ("a", "b"):
            r = await c.post("/skyrl/v1/tenants", json={"tenant": name, "weight": 2}, headers=AUTH)
            assert r.status_code == 200, r.text
        r = await c.post("/skyrl/v1/tenants", json={"tenant": "c", "weight": 2}, headers=AUTH)
        assert r.status_code == 400 and "reset one" in r.json()["error"]["message"]
        sizes = (await c.get("/skyrl/v1/state", headers=AUTH)).json()["sizes"]
        assert sizes["tenant_settings"] == 2
        r = await c.post("/skyrl/v1/tenants", json={"tenant": "a", "weight": 1}, headers=AUTH)
        assert r.json()["weight"] == 1
        r = await c.post("/skyrl/v1/tenants", json={"tenant": "c", "weight": 2}, headers=AUTH)
        assert r.status_code == 200 and r.json()["weight"] == 2
    await manager.shutdown()


async def test_admin_token_is_required_and_refusals_are_logged(served, caplog):
    c, _ = served
    caplog.set_level(logging.INFO, logger="vllm.lora_ext")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic sekret"}):
        r = await c.post("/skyrl/v1/pause", json={"lora_name": "meow"}, headers=headers)
        assert r.status_code == 401 and "admin token" in r.json()["error"]["message"]
    assert (await c.get("/skyrl/v1/state")).status_code == 401
    assert (await c.get("/skyrl/v1/loras")).status_code == 200  # read-only: open
    ok = await c.post("/skyrl/v1/pause", json={"lora_name": "meow", "mode": "abort"}, headers=AUTH)
    assert ok.status_code == 200
    records = [
        json.loads(r.getMessage()) for r in caplog.records if "lora_ext.control" in r.getMessage()
    ]
    assert [r["status"] for r in records] == [401, 401, 401, 401, 200]
    assert records[-1] | {"latency_ms": 0} == {
        "event": "lora_ext.control",
        "action": "pause",
        "who": "127.0.0.1",
        "lora_name": "meow",
        "mode": "abort",
        "status": 200,
        "outcome": "ok",
        "error": None,
        "latency_ms": 0,
    }


async def test_bodies_over_the_limit_are_413_declared_or_streamed(served):
    c, _ = served
    big = b'{"lora_name": "' + b"x" * 70_000 + b'"}'
    r = await c.post(
        "/skyrl/v1/pause", content=big, headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 413

    async def chunks():
        for _ in range(70):
            yield b"x" * 1024

    r = await c.post("/skyrl/v1/pause", content=chunks(), headers=AUTH)
    assert r.status_code == 413


async def test_paths_outside_the_roots_are_refused(served, tmp_path):
    c, manager = served
    outside = write_adapter(tmp_path / "elsewhere")
    (tmp_path / "ok" / "link").symlink_to(outside)
    cases = [
        (str(outside), 403, "outside the allowed roots"),
        (str(tmp_path / "ok" / "link"), 403, "resolves to"),
        (str(tmp_path / "ok" / ".." / "elsewhere"), 400, "'..'"),
        ("ok/meow", 400, "absolute"),
        (str(tmp_path / "ok" / ("a" * 300)), 400, "cannot inspect lora_path"),
        (str(tmp_path / "ok" / ("a" * 300) / "step_1"), 400, "cannot inspect lora_path"),
    ]
    for path, status, needle in cases:
        r = await c.post(
            "/skyrl/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}, headers=AUTH
        )
        assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    assert "x" not in manager.registry


async def test_a_versioned_load_over_http_is_numbered_and_idempotent(served, tmp_path):
    c, _ = served
    body = {
        "lora_name": "meow",
        "lora_path": str(write_adapter(tmp_path / "ok" / "s9")),
        "version": 9,
    }
    first = await c.post("/skyrl/v1/load_lora_adapter", json=body, headers=AUTH)
    again = await c.post("/skyrl/v1/load_lora_adapter", json=body, headers=AUTH)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert (first.json()["version"], first.json()["unchanged"]) == (9, False)
    assert (again.json()["version"], again.json()["unchanged"]) == (9, True)
    assert again.json()["lora_int_id"] == first.json()["lora_int_id"]
    stale = await c.post("/skyrl/v1/load_lora_adapter", json={**body, "version": 4}, headers=AUTH)
    assert stale.status_code == 409 and "not newer" in stale.json()["error"]["message"]


# ---- fuzz -------------------------------------------------------------------------------
def _operations():
    app, _ = build_app(None)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [op.ok() for op in schema.get_all_operations()]


OPERATIONS = _operations()


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: f"{op.method} {op.path}")
def test_fuzz_control_routes_never_5xx_or_hang(op, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    app, manager = build_app(tmp)
    runner = asyncio.Runner()
    runner.run(manager.load("meow", str(write_adapter(tmp / "meow"))))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    strategy = st.one_of(*(op.as_strategy(generation_mode=m) for m in modes))

    async def call(case) -> httpx.Response:
        headers = dict(case.headers or {})
        body = case.body
        if body is not None and not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body, default=str).encode()
            headers.setdefault("content-type", "application/json")
        return await asyncio.wait_for(
            client.request(case.method, case.formatted_path, headers=headers, content=body), 10
        )

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(case) -> None:
        r = runner.run(call(case))
        assert r.status_code < 500, (case.body, r.text)
        if r.status_code >= 400:
            error = r.json().get("error")  # vLLM's format: one shape on every route
            assert isinstance(error, dict) and isinstance(error.get("message"), str), r.text
            assert error["code"] == r.status_code and isinstance(error["type"], str), r.text

    try:
        fuzz()
    finally:
        runner.run(client.aclose())
        runner.run(manager.shutdown())
        runner.close()


def _vllm_app(root_path: str | None):
    """vLLM's own app (its build_app, every optional route on) with the plugin attached:
    no engine is needed to route."""
    import os

    from vllm.entrypoints.launchers.app import build_app

    from vllm_lora_ext.server.app import parse_server_args
    from vllm_lora_ext.server.plugin import ensure_attached

    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        argv = ["--model", "/no/model", "--enable-lora", "--enable-scale-out"]
        args = parse_server_args([*argv, *(["--root-path", root_path] if root_path else [])])
        app = build_app(args, ("generate",), None)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ensure_attached(app, LoraExtConfig(admin_key="k", stage_adapters=False))
    return app


@pytest.mark.parametrize("root_path", [None, "/api"])
async def test_every_route_but_the_open_list_needs_the_admin_key(root_path):
    """Deny by default over vLLM's whole route table, decided on the routed path: with
    --root-path, /api/pause is /pause and is guarded the same."""
    import re

    from starlette.routing import Mount

    from vllm_lora_ext.server.auth import OPEN

    app = _vllm_app(root_path)
    routes = [r for r in app.router.routes if getattr(r, "path", None)]
    paths = {r.path for r in routes}
    for must in ("/collective_rpc", "/sleep", "/update_weights", "/adapters", "/pause"):
        assert must in paths, must  # the route table this test stands on
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    seen_open = set()
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=5) as c:
        for route in routes:
            path = re.sub(r"{[^}]+}", "x", route.path)
            methods = sorted(getattr(route, "methods", None) or ["GET", "POST"])
            for method in (m for m in methods if m != "HEAD"):
                for prefix in ("", *([root_path] if root_path else [])):
                    url = prefix + path + ("/x" if isinstance(route, Mount) else "")
                    r = await c.request(method, url, json={})
                    if (method, route.path) in OPEN and not isinstance(route, Mount):
                        seen_open.add((method, route.path))
                        assert r.status_code != 401, (method, url)
                    else:
                        assert r.status_code == 401, (method, url, r.status_code)
                        assert r.json()["error"]["code"] == 401
                        if method == "POST" and route.path in ("/pause", "/collective_rpc"):
                            r = await c.request(
                                method, url, json={}, headers={"Authorization": "Bearer k"}
                            )
                            assert r.status_code != 401, url
        # A path no route serves is refused too (deny by default), not a 404 leak.
        assert (await c.post("/no/such/route")).status_code == 401
    assert ("POST", "/v1/completions") in seen_open and ("GET", "/skyrl/v1/loras") in seen_open
