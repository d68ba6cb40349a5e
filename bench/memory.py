"""Server memory per swap and per name, by process, on a fresh toy server.

Usage: ``.venv/bin/python bench/memory.py [--swaps 4000] [--names 10000] [--record
bench/RESULTS.md]``. Two phases, each with traffic:

- swaps: one name reloaded ``--swaps`` times (a request on every version);
- names: ``--names`` distinct names, each loaded, asked once and unloaded.

RSS of each server process (API, engine core, workers) is sampled as it goes; the slope
over the second half of each phase (caches warm up first) says whose memory grows. The
extension's own state sizes (``GET /skyrl/v1/state``) must end where they started.
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
from pathlib import Path

import httpx
import psutil
from results import record
from rich.console import Console
from rich.table import Table

from vllm_lora_ext.toy.assets import build_toy_assets
from vllm_lora_ext.toy.server import free_port, lora_ext_cmd, start_server, warm_up


def processes(pid: int) -> dict[str, psutil.Process]:
    root = psutil.Process(pid)
    out = {"api": root}
    for child in root.children(recursive=True):
        name = child.name()
        label = "engine" if "EngineCore" in name else "worker" if "Worker" in name else name
        out.setdefault(label, child)
    return out


def rss_mib(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {k: p.memory_info().rss / 2**20 for k, p in procs.items()}


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    late = points[len(points) // 2 :]
    if len(late) < 3:
        return 0.0
    xs, ys = zip(*late, strict=True)
    return 1000 * statistics.linear_regression(xs, ys).slope


async def phase(
    url: str, procs: dict, count: int, step, sample_every: int
) -> tuple[dict[str, list[tuple[int, float]]], float]:
    series: dict[str, list[tuple[int, float]]] = {k: [] for k in procs}
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        for i in range(count):
            await step(c, i)
            if i % sample_every == 0 or i == count - 1:
                for k, v in rss_mib(procs).items():
                    series[k].append((i, v))
    return series, time.monotonic() - started


async def run(url: str, pid: int, swaps: int, names: int, paths: list[str]) -> list[tuple]:
    procs = processes(pid)
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        sizes_before = (await c.get("/skyrl/v1/state")).json()["sizes"]
        metrics_before = len((await c.get("/metrics")).text)

    async def swap(c: httpx.AsyncClient, i: int) -> None:
        r = await c.post(
            "/skyrl/v1/load_lora_adapter",
            json={"lora_name": "mem", "lora_path": paths[i % 2]},
        )
        r.raise_for_status()
        r = await c.post(
            "/v1/completions", json={"model": "mem", "prompt": "the cat", "max_tokens": 2}
        )
        r.raise_for_status()

    async def name(c: httpx.AsyncClient, i: int) -> None:
        n = f"tenant-{i}"
        r = await c.post(
            "/skyrl/v1/load_lora_adapter", json={"lora_name": n, "lora_path": paths[i % 2]}
        )
        r.raise_for_status()
        r = await c.post("/v1/completions", json={"model": n, "prompt": "the cat", "max_tokens": 2})
        r.raise_for_status()
        r = await c.post("/skyrl/v1/unload_lora_adapter", json={"lora_name": n})
        r.raise_for_status()

    for label, count, step in (("swaps", swaps, swap), ("names", names, name)):
        if not count:
            continue
        series, seconds = await phase(url, procs, count, step, max(1, count // 40))
        for proc, points in series.items():
            rows.append(
                (
                    label,
                    proc,
                    f"{points[0][1]:.0f} -> {points[-1][1]:.0f}",
                    f"{slope_per_1000(points):+.2f}",
                    f"{1024 * slope_per_1000(points) / 1000:+.2f}",
                )
            )
        rows.append((label, "(time)", f"{seconds:.0f} s for {count}", "", ""))
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        await c.post("/skyrl/v1/unload_lora_adapter", json={"lora_name": "mem"})
        await asyncio.sleep(2)
        sizes_after = (await c.get("/skyrl/v1/state")).json()["sizes"]
        metrics_after = len((await c.get("/metrics")).text)
    before = sizes_before
    changed = {k: f"{before.get(k)} -> {v}" for k, v in sizes_after.items() if v != before.get(k)}
    rows.append(("state", "sizes that changed", str(changed or "none"), "", ""))
    rows.append(("state", "/metrics bytes", f"{metrics_before} -> {metrics_after}", "", ""))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=4000)
    parser.add_argument("--names", type=int, default=10000)
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()
    toy = build_toy_assets()
    paths = [str(toy.adapters["meow"]), str(toy.adapters["woof"])]
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="memory_")) / "server.log"
    server = start_server(lora_ext_cmd(toy, port), port, log, {"LORA_EXT_KEEP_VERSIONS": "2"})
    try:
        warm_up(server.url, ["meow", "woof"])
        rows = asyncio.run(run(server.url, server.proc.pid, args.swaps, args.names, paths))
    finally:
        server.stop()
    table = Table(title=f"memory, {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores")
    for col in ("phase", "process", "RSS MiB start -> end", "MiB / 1000 (2nd half)", "KiB each"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if args.record:
        record(args.record, "memory", table, width=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
