"""The request path in instructions: what the API process executes per request and per
streamed event (token), stock vLLM with our plugin (``VLLM_PLUGINS=lora_ext``, fair share on)
over stock vLLM without it, same engine arguments, counted by valgrind's callgrind.

Why beside ``request_path.py`` (CPU time) and ``allocations.py`` (allocations): CPU time on
two shared cores resolves +-1.5-2 % per run; allocations are exact but are one kind of
work only (halving ours moved the CPU ratio by less than its noise). An instruction count
covers all the interpreter's work and does not depend on the machine's load: two fresh
servers of one kind differ by 0.2-0.5 %, so a difference of half a percent shows, in
minutes. With ``--cache-sim`` callgrind also simulates the caches and branch predictors,
and the table adds an estimated cycle count (instructions + 10 per L1 miss and
mispredicted branch + 100 per last-level miss): whether the plugin's extra instructions
cost more than their number (a larger footprint would). ``--ll BYTES`` sets the simulated
last level (callgrind takes the host's L3 by default): ``--ll 2097152``, this machine's
L2, is where the plugin's misses show (see ``footprint.py``).

What it is not: time. A count says how much more work the plugin does, not how long that
work takes on a loaded machine; ``request_path.py`` stays the goal's measure.

Only the API process runs under valgrind (instrumented only while requests run; the
engine core is spawned natively), each server alone, one request at a time: with several
at once, how many outputs the engine hands over together depends on timing. Under
valgrind the API process is some 50x slower than the engine, so a stream's tokens arrive
several per event; both servers alike. Needs ``valgrind`` (Debian: valgrind); without it
this says so.

Usage: ``.venv/bin/python bench/instructions.py [--sets 2 --requests 100 --streams 20]
[--cache-sim] [--record bench/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Awaitable
from pathlib import Path

import httpx
from request_path import MODEL, batch, completion_body, engine_args
from results import record
from rich.console import Console
from rich.table import Table

from vllm_lora_ext.toy.assets import build_toy_assets
from vllm_lora_ext.toy.server import ServerProcess, free_port, wait_healthy, warm_up

START_TIMEOUT_S = 1200  # an API process under valgrind starts in about 70 s here
# callgrind's event names: instructions; L1 and last-level misses (instruction read,
# data read, data write); conditional and indirect branches mispredicted.
L1 = ("I1mr", "D1mr", "D1mw")
LL = ("ILmr", "DLmr", "DLmw")
MISPREDICTED = ("Bcm", "Bim")


def valgrind_cmd(out: Path, cache_sim: bool, ll_bytes: int | None = None) -> list[str]:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("instructions: needs valgrind with callgrind (Debian: valgrind)")
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",  # start-up uninstrumented; on around each measured phase
        "--trace-children=no",  # the engine core runs natively
        "--collect-jumps=no",
        f"--callgrind-out-file={out}",
    ]
    if not cache_sim:
        return cmd
    cmd += ["--cache-sim=yes", "--branch-sim=yes"]
    return [*cmd, f"--LL={ll_bytes},16,64"] if ll_bytes else cmd


def control(pid: int, *args: str) -> None:
    """Tell the valgrind'ed API process what to do (instrument, zero, dump): bounded, as
    every wait here."""
    subprocess.run(
        ["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120
    )


def totals(dump: Path) -> dict[str, int]:
    """The event totals of one callgrind dump."""
    events: list[str] = []
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("totals:") and events:  # ("summary:" is 0 in a dump)
            return dict(zip(events, map(int, line.split()[1:]), strict=False))
    raise SystemExit(f"instructions: no totals in {dump}")


async def counted(server: ServerProcess, out: Path, label: str, work: Awaitable[int]) -> tuple:
    """The API process's event totals while ``work`` runs, and what ``work`` returned."""
    pid = server.proc.pid
    before = set(out.parent.glob(f"{out.name}.*"))
    control(pid, "--zero")
    control(pid, "--instr=on")
    try:
        result = await work
    finally:
        control(pid, "--instr=off")
    control(pid, f"--dump={label}")
    for _ in range(600):  # the dump is written by the process itself
        new = set(out.parent.glob(f"{out.name}.*")) - before
        if new:
            await asyncio.sleep(0.5)
            return totals(new.pop()), result
        await asyncio.sleep(0.1)
    raise SystemExit(f"instructions: no dump of {label} from {pid}")


async def streams(c: httpx.AsyncClient, n: int, tokens: int) -> int:
    """``n`` streams of ``tokens`` tokens one after the other; returns the events that
    carried tokens (under valgrind the engine outruns the API process, and an event may
    carry several tokens, more or fewer from run to run: a stream's cost is counted per
    event, which its tokens' number hardly changes)."""
    body = completion_body(tokens, True)
    events = 0
    for _ in range(n):
        async with c.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                events += line.startswith('data: {"') and '"choices":[{' in line
    return events


async def measure(server: ServerProcess, out: Path, args: argparse.Namespace) -> dict:
    """Per kind (request, streamed event): event totals per unit."""
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as c:
        await batch(c, 20, 1, 1, False)  # first requests pay one-off costs
        await streams(c, 2, args.stream_tokens)
        req, _ = await counted(
            server, out, "request", batch(c, args.requests, args.concurrency, 1, False)
        )
        tok, events = await counted(
            server, out, "token", streams(c, args.streams, args.stream_tokens)
        )
    return {
        "request": {k: v / args.requests for k, v in req.items()},
        "token": {k: v / events for k, v in tok.items()},
    }


def run_server(name: str, plugins: str, toy, logs: Path, args: argparse.Namespace) -> dict:
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    out = logs / f"{name}.callgrind"
    cmd = valgrind_cmd(out, args.cache_sim, args.ll) + engine_args(toy, port)
    # The hash seed fixed: sets and dicts laid out alike in each server. vLLM's stats
    # log every 10 s of wall time: under valgrind that is more often per request for
    # the slower server, and it is no per-request work (the stats themselves stay on).
    env = {
        **os.environ,
        "VLLM_PLUGINS": plugins,
        "PYTHONHASHSEED": "0",
        "VLLM_LOG_STATS_INTERVAL": "3600",
    }
    server = ServerProcess(cmd, env, logs / f"{name}.log", port)
    try:
        wait_healthy(server.url, server.proc, timeout=START_TIMEOUT_S)
        warm_up(server.url, [MODEL])
        return asyncio.run(measure(server, out, args))
    finally:
        server.stop()


def cycles(e: dict[str, float]) -> float:
    """The usual estimate from simulated events (callgrind's manual, 'CEst')."""
    return e["Ir"] + 10 * sum(e[k] for k in L1 + MISPREDICTED) + 100 * sum(e[k] for k in LL)


def render(runs: dict[str, list[dict]], args: argparse.Namespace) -> Table:
    table = Table(title="API-process instructions per request and per streamed token")
    for col in ("unit", "counted", "stock", "plugin", "plugin/stock", "each set"):
        table.add_column(col, justify="right")
    labels = {"request": "1-token request", "token": "streamed event"}
    measures = [("instructions", lambda e: e["Ir"])]
    if args.cache_sim:
        measures += [
            ("L1 misses", lambda e: sum(e[k] for k in L1)),
            ("LL misses", lambda e: sum(e[k] for k in LL)),
            ("mispredicted", lambda e: sum(e[k] for k in MISPREDICTED)),
            ("est. cycles", cycles),
        ]
    for kind in ("request", "token"):
        for label, of in measures:
            stock = [of(r[kind]) for r in runs["stock"]]
            plugin = [of(r[kind]) for r in runs["plugin"]]
            ratios = [p / s for p, s in zip(plugin, stock, strict=True)]
            table.add_row(
                labels[kind],
                label,
                f"{statistics.mean(stock):,.0f}",
                f"{statistics.mean(plugin):,.0f}",
                f"{sum(plugin) / sum(stock):.4f}",
                " ".join(f"{r:.4f}" for r in ratios),
            )
    table.caption = (
        f"{args.sets} sets of fresh servers, each server alone under callgrind (the API "
        f"process), instrumented while {args.requests} 1-token completions "
        f"({args.concurrency} at a time), then "
        f"{args.streams} streams of {args.stream_tokens} tokens, run on adapter '{MODEL}' "
        "one at a time; per streamed event: the streams' count over their events that carried "
        "tokens (most carry one). Fair "
        "share on. Counts, not time: see request_path for the CPU time."
        + (f" Simulated last level: {args.ll:,} B, 16-way." if args.cache_sim and args.ll else "")
    )
    return table


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sets", type=int, default=2, help="fresh stock and plugin servers")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--streams", type=int, default=20)
    p.add_argument("--stream-tokens", type=int, default=64)
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="1-token requests at a time (streams always go one at a time): how many "
        "outputs the engine hands over together then depends on timing",
    )
    p.add_argument("--cache-sim", action="store_true", help="simulate caches and branches")
    p.add_argument(
        "--ll",
        type=int,
        metavar="BYTES",
        help="the simulated last-level cache's size (16-way; default: the host's)",
    )
    p.add_argument("--record", type=Path)
    args = p.parse_args()
    toy = build_toy_assets()
    logs = Path(tempfile.mkdtemp(prefix="instructions_"))
    runs: dict[str, list[dict]] = {"stock": [], "plugin": []}
    for n in range(args.sets):
        order = [("stock", ""), ("plugin", "lora_ext")]
        for name, plugins in order if n % 2 == 0 else reversed(order):
            runs[name].append(run_server(f"{name}{n}", plugins, toy, logs / str(n), args))
        print(f"set {n + 1}/{args.sets}", flush=True)
    (logs / "runs.json").write_text(json.dumps(runs))
    print(f"counts per unit: {logs / 'runs.json'}", flush=True)
    table = render(runs, args)
    Console().print(table)
    if args.record:
        record(args.record, "instructions", table)


if __name__ == "__main__":
    main()
