"""A real vLLM engine (CPU backend here, CUDA where present) serving the toy model.

The session server is started once, as a subprocess through our own CLI, with both toy
adapters. Tests must leave it as they found it (adapters resumed, nothing in flight).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from vllm_lora_ext.toy import ToyAssets, build_toy_assets

START_TIMEOUT_S = 300
# Slot headroom: the CPU backend applies the last slot's adapter to base-model requests
# when every max_loras slot is occupied (see README). 2 names x keep_versions 2 + 2.
MAX_LORAS = 6
HOLD_TIMEOUT_S = 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(toy: ToyAssets, port: int | None = None) -> list[str]:
    args = [
        "--model",
        str(toy.model),
        "--served-model-name",
        "toy-base",
        "--enable-lora",
        "--max-lora-rank",
        "16",
        "--max-loras",
        str(MAX_LORAS),
        "--max-cpu-loras",
        "12",
        "--max-model-len",
        "4096",
        "--max-num-seqs",
        "32",
        "--dtype",
        "float32",
        "--kv-cache-memory-bytes",
        str(512 * 1024 * 1024),
        "--enable-prefix-caching",
        "--enable-log-requests",
        "--enable-prompt-tokens-details",
        "--lora-modules",
        f"meow={toy.adapters['meow']}",
        f"woof={toy.adapters['woof']}",
    ]
    if port is not None:
        args += ["--host", "127.0.0.1", "--port", str(port)]
    return args


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start-up")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def warm_up(url: str, models: list[str]) -> None:
    """The first request per adapter pays one-off set-up; keep it out of the tests."""
    for model in models:
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": "the cat says", "max_tokens": 4},
            timeout=120,
        )
        r.raise_for_status()


class ServerProcess:
    """A server subprocess, its log file and the processes it spawned."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = log.open("wb")
        # Same session as the tests: with the kernel's per-session CPU autogrouping a new
        # session would make the whole server one scheduling unit against the test client,
        # starving its API process behind the spinning engine processes.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.children: list[psutil.Process] = []

    def start(self) -> None:
        try:
            wait_healthy(self.url, self.proc)
        except BaseException:
            self.stop()
            sys.stderr.write(self.log.read_text(errors="replace")[-5000:])
            raise
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for p in [*psutil.Process(self.proc.pid).children(recursive=True), self.proc]:
                    p.kill()
                self.proc.wait(10)
        self._log_file.close()
        return self.proc.returncode

    def leftover_children(self, grace: float = 15) -> list[psutil.Process]:
        deadline = time.monotonic() + grace
        alive = [c for c in self.children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        while alive and time.monotonic() < deadline:
            time.sleep(0.25)
            alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        return alive


def start_server(cmd: list[str], port: int, log: Path, extra_env: dict[str, str]) -> ServerProcess:
    env = {**os.environ, **extra_env}
    server = ServerProcess(cmd, env, log, port)
    server.start()
    return server


@pytest.fixture(scope="session")
def toy() -> ToyAssets:
    return build_toy_assets()


@pytest.fixture(scope="session")
def server_proc(toy: ToyAssets, tmp_path_factory) -> Iterator[ServerProcess]:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "vllm_lora_ext", "serve", *server_args(toy, port)]
    server = start_server(cmd, port, log, {"LORA_EXT_HOLD_TIMEOUT_S": str(HOLD_TIMEOUT_S)})
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
