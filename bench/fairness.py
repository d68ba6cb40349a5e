"""A light tenant under a flooding one: first-come first-served (the extension with
``fair_share=false``) against the fair share, in one run, on a saturated engine.

Usage: ``.venv/bin/python bench/fairness.py [--record bench/RESULTS.md]``. The toy model
with ``--max-num-seqs 8`` (two cores saturate as a GPU does under a real burst). Per
server (FCFS, then fair share):

- B alone: B sends ``--b-requests`` requests of 12 tokens one after another;
- 2 tenants: A keeps a backlog (``--a-workers`` closed-loop workers, 96 tokens each, as a
  rollout pool does) while B sends the same requests;
- 3 tenants: A1 and A2 flood (half the workers each), B as before.

Reported: B's median and p99 latency over B alone, A's and the total tokens/s while B
ran, each fair share over FCFS. Latency is wall time of B's requests (what a tenant
sees); throughput counts completion tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from results import record
from rich.console import Console
from rich.table import Table

from vllm_lora_ext.toy.assets import build_toy_assets
from vllm_lora_ext.toy.server import free_port, lora_ext_cmd, start_server, warm_up

PROMPT = "the cat says"


def with_max_num_seqs(cmd: list[str], seqs: int) -> list[str]:
    cmd = list(cmd)
    cmd[cmd.index("--max-num-seqs") + 1] = str(seqs)
    return cmd


async def one(c: httpx.AsyncClient, model: str, tokens: int) -> tuple[float, int]:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 1.0,
        "ignore_eos": True,
    }
    started = time.monotonic()
    r = await c.post("/v1/completions", json=body)
    r.raise_for_status()
    return time.monotonic() - started, r.json()["usage"]["completion_tokens"]


async def light(c: httpx.AsyncClient, n: int) -> list[float]:
    return [(await one(c, "woof", 12))[0] for _ in range(n)]


async def scenario(url: str, floods: list[str], workers: int, n: int) -> dict:
    made: dict[str, int] = dict.fromkeys(floods, 0)
    stop = asyncio.Event()

    async def worker(c: httpx.AsyncClient, model: str) -> None:
        while not stop.is_set():
            made[model] += (await one(c, model, 96))[1]

    limits = httpx.Limits(max_connections=workers + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        tasks = (
            [asyncio.create_task(worker(c, floods[i % len(floods)])) for i in range(workers)]
            if floods
            else []
        )
        await asyncio.sleep(8 if floods else 0)  # the backlog builds
        before = dict(made)
        t0 = time.monotonic()
        latencies = await light(c, n)
        window = time.monotonic() - t0
        during = {m: made[m] - before[m] for m in floods}
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "median": statistics.median(latencies),
        "p99": max(latencies)
        if len(latencies) < 100
        else statistics.quantiles(latencies, n=100)[98],
        "flood_tps": sum(during.values()) / window if floods else 0.0,
        "window": window,
    }


async def server_run(toy, fair: bool, args) -> dict:
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "server.log"
    env = {"LORA_EXT_FAIR_SHARE": "true" if fair else "false"}
    server = start_server(with_max_num_seqs(lora_ext_cmd(toy, port), 8), port, log, env)
    try:
        warm_up(server.url, ["meow", "woof", "toy-base"])
        # A1/A2 of the 3-tenant case: meow and the base model.
        out = {"alone": await scenario(server.url, [], 0, args.b_requests)}
        out["two"] = await scenario(server.url, ["meow"], args.a_workers, args.b_requests)
        out["three"] = await scenario(
            server.url, ["meow", "toy-base"], args.a_workers, args.b_requests
        )
        return out
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--a-workers", type=int, default=48)
    p.add_argument("--b-requests", type=int, default=6)
    p.add_argument("--record", type=Path)
    args = p.parse_args()
    toy = build_toy_assets()
    fcfs = asyncio.run(server_run(toy, False, args))
    fair = asyncio.run(server_run(toy, True, args))
    table = Table(title="B's latency under a flood, FCFS vs fair share (toy model, 8 seqs)")
    for col in (
        "case",
        "policy",
        "B median s",
        "B p99 s",
        "median / alone",
        "p99 / alone",
        "flood tok/s",
        "flood fair/FCFS",
    ):
        table.add_column(col, justify="right")
    for case in ("two", "three"):
        for name, res in (("FCFS", fcfs), ("fair", fair)):
            alone = res["alone"]["median"]
            r = res[case]
            table.add_row(
                {"two": "A floods", "three": "A1+A2 flood"}[case],
                name,
                f"{r['median']:.2f}",
                f"{r['p99']:.2f}",
                f"{r['median'] / alone:.1f}x",
                f"{r['p99'] / alone:.1f}x",
                f"{r['flood_tps']:.0f}",
                f"{r['flood_tps'] / res[case]['flood_tps']:.2f}"
                if name == "FCFS"
                else f"{r['flood_tps'] / fcfs[case]['flood_tps']:.2f}",
            )
    table.caption = (
        f"B alone: FCFS server {fcfs['alone']['median']:.3f} s, fair server "
        f"{fair['alone']['median']:.3f} s median; flood = A's (A1+A2's) completion tokens/s "
        "while B ran, which here is the total minus B's few tokens."
    )
    Console().print(table)
    if args.record:
        record(args.record, "fairness", table)


if __name__ == "__main__":
    main()
