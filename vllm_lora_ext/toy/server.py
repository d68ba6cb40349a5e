"""A vLLM server subprocess on the toy model, for the tests, the benchmarks and the demo.

Launched through our own CLI (``python -m vllm_lora_ext serve``) or, for comparison,
through stock vLLM's; its arguments give LoRA slot headroom (see the README).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from vllm_lora_ext.toy.assets import ToyAssets

START_TIMEOUT_S = 300
# Slot headroom: the CPU backend applies the last slot's adapter to base-model requests
# when every max_loras slot is occupied (see README). 2 names x keep_versions 2 + 2.
MAX_LORAS = 6


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


def lora_ext_cmd(toy: ToyAssets, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm_lora_ext", "serve", *server_args(toy, port)]


def lora_ext_cmd_args(args: list[str], port: int) -> list[str]:
    """Our CLI server with any vLLM arguments, on loopback at ``port``."""
    return [
        sys.executable, "-m", "vllm_lora_ext", "serve", *args,
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def stock_vllm_cmd(toy: ToyAssets, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *server_args(toy, port)]


def start_server(cmd: list[str], port: int, log: Path, extra_env: dict[str, str]) -> ServerProcess:
    env = {**os.environ, **extra_env}
    server = ServerProcess(cmd, env, log, port)
    server.start()
    return server
