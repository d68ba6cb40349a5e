"""A real vLLM engine (CPU backend here, CUDA where present) serving the toy model.

The session server is started once, as a subprocess through our own CLI, with both toy
adapters. Tests must leave it as they found it (adapters resumed, nothing in flight).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from vllm_lora_ext.toy.assets import ToyAssets, build_toy_assets
from vllm_lora_ext.toy.server import ServerProcess, free_port, lora_ext_cmd, start_server, warm_up

HOLD_TIMEOUT_S = 4.0
# Short bounded waits so refusals are quick to observe.
SERVER_ENV = {"LORA_EXT_HOLD_TIMEOUT_S": str(HOLD_TIMEOUT_S), "LORA_EXT_STABLE_WAIT_S": "3"}


@pytest.fixture(scope="session")
def toy() -> ToyAssets:
    return build_toy_assets()


@pytest.fixture(scope="session")
def watch_root(tmp_path_factory) -> Path:
    """The broadcast root the session server follows as adapter ``watched``."""
    root = os.environ.get("LORA_EXT_TEST_WATCH_ROOT")
    return Path(root) if root else tmp_path_factory.mktemp("watch")


@pytest.fixture(scope="session")
def server_proc(toy: ToyAssets, watch_root: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        *lora_ext_cmd(toy, port),
        "--watch",
        f"watched={watch_root}",
        # What the RL stacks use: vLLM's LoRA routes, its dev-mode RL routes, and
        # token-in/token-out generation.
        "--allow-runtime-lora-updating",
        "--dev-mode",
        "--enable-scale-out",
        # prime-rl's and AReaL's own routes (tests/gpu/test_stack_replays.py).
        "--lora-stack-routes",
        "prime-rl,areal",
    ]
    server = start_server(cmd, port, log, SERVER_ENV)
    warm_up(server.url, ["meow", "woof", "toy-base"])
    yield server
    server.stop()
    leftover = server.leftover_children()
    for p in leftover:
        p.kill()
    assert not leftover, f"engine processes left after shutdown: {leftover}"


@pytest.fixture(scope="session")
def server(request) -> str:
    """The session server's URL; LORA_EXT_TEST_URL points the tests at a running one
    (started with the same arguments) while debugging."""
    url = os.environ.get("LORA_EXT_TEST_URL")
    if url:
        return url
    return request.getfixturevalue("server_proc").url


@pytest.fixture
async def client(server: str):
    async with httpx.AsyncClient(base_url=server, timeout=120) as c:
        yield c
        # Every test leaves the server serving: nothing paused, nothing in flight.
        for _ in range(100):
            adapters = (await c.get("/skyrl/v1/loras")).json()["adapters"]
            if not any(a["in_flight"] or a["held"] for a in adapters):
                break
            await asyncio.sleep(0.1)
        for a in adapters:  # do not let one failure cascade into the next tests
            if a["paused"]:
                await c.post("/skyrl/v1/resume", json={"lora_name": a["lora_name"]})
        assert not any(a["paused"] for a in adapters), adapters
        assert not any(a["in_flight"] or a["held"] for a in adapters), adapters
