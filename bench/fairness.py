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
FLOOD_WINDOW_S = 20.0


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


async def light(c: httpx.AsyncClient, n: int, min_s: float) -> tuple[list[float], int]:
    """B's requests one after another: at least ``n``, and for at least ``min_s`` (the
    flood's throughput is measured over the same window). Latencies, tokens."""
    latencies, tokens, t0 = [], 0, time.monotonic()
    while len(latencies) < n or time.monotonic() - t0 < min_s:
        latency, made = await one(c, "woof", 12)
        latencies.append(latency)
        tokens += made
    return latencies, tokens


async def scenario(url: str, floods: list[str], workers: int, n: int) -> dict:
    made: dict[str, int] = dict.fromkeys(floods, 0)
    stop = asyncio.Event()

    async def worker(c: httpx.AsyncClient, model: str) -> None:
        while not stop.is_set():
            _, tokens = await one(c, model, 96)
            made[model] += tokens  # (not `made[model] += await ...`: that loses updates)

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
        latencies, light_tokens = [], 0
        if n:
            latencies, light_tokens = await light(c, n, FLOOD_WINDOW_S if floods else 0)
        else:
            await asyncio.sleep(FLOOD_WINDOW_S)  # the flood alone: its throughput
        window = time.monotonic() - t0
        during = {m: made[m] - before[m] for m in floods}
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "median": statistics.median(latencies) if latencies else 0.0,
        "p99": max(latencies, default=0.0)
        if len(latencies) < 100
        else statistics.quantiles(latencies, n=100)[98],
        "flood_tps": sum(during.values()) / window if floods else 0.0,
        "total_tps": (sum(during.values()) + light_tokens) / window,
        "b_requests": len(latencies),
        "window": window,
    }


async def server_run(toy, fair: bool, args, reserve: int = 1) -> dict:
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "server.log"
    env = {
        "LORA_EXT_FAIR_SHARE": "true" if fair else "false",
        "LORA_EXT_FAIR_SHARE_RESERVE": str(reserve),
    }
    server = start_server(with_max_num_seqs(lora_ext_cmd(toy, port), 8), port, log, env)
    try:
        warm_up(server.url, ["meow", "woof", "toy-base"])
        # A1/A2 of the 3-tenant case: meow and the base model.
        out = {"alone": await scenario(server.url, [], 0, args.b_requests)}
        out["flood"] = await scenario(server.url, ["meow"], args.a_workers, 0)
        out["two"] = await scenario(server.url, ["meow"], args.a_workers, args.b_requests)
        out["three"] = await scenario(
            server.url, ["meow", "toy-base"], args.a_workers, args.b_requests
        )
        return out
    finally:
        server.stop()


POLICIES = ("FCFS", "fair, no reserve", "fair")


def chart(runs: dict[str, dict], path: Path) -> None:
    """B's median latency over B alone per policy and case (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    cases = (("two", "A floods"), ("three", "A1+A2 flood"))
    width = 0.8 / len(POLICIES)
    for k, name in enumerate(POLICIES):
        res = runs[name]
        ys = [res[c]["median"] / res["alone"]["median"] for c, _ in cases]
        xs = [i + (k - 1) * width for i in range(len(cases))]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=[f"{y:.1f}x" for y in ys], fontsize=8)
    ax.axhline(3, color="grey", linestyle="--", linewidth=1, label="goal: 3x")
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)), [label for _, label in cases])
    ax.set_ylabel("B median latency / B alone")
    ax.set_title("A light tenant under a flood (toy model, --max-num-seqs 8)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--a-workers", type=int, default=48)
    p.add_argument("--b-requests", type=int, default=6)
    p.add_argument("--record", type=Path)
    args = p.parse_args()
    toy = build_toy_assets()
    runs = {
        "FCFS": asyncio.run(server_run(toy, False, args)),
        "fair, no reserve": asyncio.run(server_run(toy, True, args, reserve=0)),
        "fair": asyncio.run(server_run(toy, True, args, reserve=1)),
    }
    fcfs = runs["FCFS"]
    table = Table(title="B's latency under a flood, FCFS vs fair share (toy model, 8 seqs)")
    for col in (
        "case",
        "policy",
        "B median s",
        "B p99 s",
        "median / alone",
        "p99 / alone",
        "flood tok/s",
        "flood / FCFS",
        "total / FCFS",
    ):
        table.add_column(col, justify="right")
    for case in ("two", "three"):
        for name in POLICIES:
            res = runs[name]
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
                f"{r['flood_tps'] / fcfs[case]['flood_tps']:.2f}",
                f"{r['total_tps'] / fcfs[case]['total_tps']:.2f}",
            )
    table.add_section()
    for name in POLICIES:
        tps = runs[name]["flood"]["flood_tps"]
        ratio = f"{tps / fcfs['flood']['flood_tps']:.2f}"
        table.add_row("A alone", name, "", "", "", "", f"{tps:.0f}", ratio, ratio)
    table.caption = (
        f"A alone: A's tokens/s over {FLOOD_WINDOW_S:.0f} s with nobody else (what a "
        "reserved slot costs a lone flood). B alone (median): "
        + ", ".join(f"{n} server {runs[n]['alone']['median']:.3f} s" for n in POLICIES)
        + "; flood = A's (A1+A2's) completion tokens/s while B ran; total adds B's "
        f"tokens; B sends one request after another for at least {FLOOD_WINDOW_S:.0f} s "
        "(and 6 requests). fair = fair share with its default reserve of 1 slot."
    )
    Console().print(table)
    if args.record:
        image = args.record.parent / "fairness.png"
        chart(runs, image)
        record(args.record, "fairness", table, image=image)


if __name__ == "__main__":
    main()
