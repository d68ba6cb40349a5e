"""The request path counted, not timed: Python object allocations per request and per
streamed token in the API process, stock vLLM with our plugin (``VLLM_PLUGINS=lora_ext``,
fair share on) over stock vLLM without it, same engine arguments.

Why a count beside ``request_path.py``: CPU time on two shared cores resolves about
+-1 % in 17 minutes there, and a change of a few tenths of a percent does not show. The
interpreter's allocations (calls of ``_PyObject_Malloc``, and objects the garbage
collector tracks, ``_PyObject_GC_Link``) are counted by Linux uprobes in the API process:
a count does not depend on the machine's load, so it tells what our code adds to the
interpreter's work to a tenth of a percent, in minutes. It is not a stand-in for the CPU
ratio: halving the plugin's extra allocations per request (6 % over stock's to 3 %, at 16
concurrent) left that ratio where it was (RESULTS.md, 2026-11-30).

Each server is loaded alone, one request at a time (``--concurrency 1``): with several at
once, how many outputs the engine hands over together depends on timing, and the counts
move by about 1 %. Needs ``perf`` with uprobes (root, as here); without them it says so.

Usage: ``.venv/bin/python bench/allocations.py [--requests 400 --streams 40 --rounds 3]
[--record bench/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Awaitable
from pathlib import Path

import httpx
from request_path import MODEL, batch, engine_args
from results import record
from rich.console import Console
from rich.table import Table

from vllm_lora_ext.toy.assets import build_toy_assets
from vllm_lora_ext.toy.server import ServerProcess, free_port, start_server, warm_up

GROUP = "loraext"
EVENTS = {"malloc": "_PyObject_Malloc", "gc": "_PyObject_GC_Link"}


def interpreter() -> str:
    """The file holding the interpreter's code: libpython when shared, else the binary."""
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib = Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("LDLIBRARY")
        if lib.exists():
            return str(lib)
    return sys.executable


def add_probes() -> None:
    """One uprobe per counted function (kept if there already)."""
    if shutil.which("perf") is None:
        raise SystemExit("allocations: needs perf (Debian: linux-perf)")
    for name, symbol in EVENTS.items():
        done = subprocess.run(
            ["perf", "probe", "-q", "-x", interpreter(), "-a", f"{GROUP}:{name}={symbol}"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise SystemExit(f"allocations: cannot add a uprobe on {symbol}: {done.stderr}")


def remove_probes() -> None:
    subprocess.run(["perf", "probe", "-q", "-d", f"{GROUP}:*"], capture_output=True)


async def counted(server: ServerProcess, work: Awaitable[int]) -> tuple[dict[str, int], int]:
    """The API process's counts while ``work`` runs (perf attached before, stopped
    after), and what ``work`` returned."""
    events = ",".join(f"{GROUP}:{n}" for n in EVENTS)
    perf = await asyncio.create_subprocess_exec(
        *("perf", "stat", "-x,", "-e", events, "-p", str(server.proc.pid)),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(1.0)  # attached before the first request
        result = await work
        await asyncio.sleep(0.3)
    finally:
        perf.send_signal(signal.SIGINT)
        _, raw = await asyncio.wait_for(perf.communicate(), 60)
    err = raw.decode(errors="replace")
    counts = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith(f"{GROUP}:") and fields[0].isdigit():
            counts[fields[2].split(":", 1)[1]] = int(fields[0])
    if set(counts) != set(EVENTS):
        raise SystemExit(f"allocations: perf counted nothing: {err[-500:]}")
    return counts, result


async def measure(servers: dict[str, ServerProcess], args: argparse.Namespace) -> dict:
    """Per (kind, event, server): counts per unit, one per round."""
    out: dict[tuple[str, str, str], list[float]] = {}
    clients = {n: httpx.AsyncClient(base_url=s.url, timeout=300) for n, s in servers.items()}
    try:
        for c in clients.values():  # first requests pay one-off costs
            await batch(c, 64, args.concurrency, 1, False)
            await batch(c, 8, args.concurrency, args.stream_tokens, True)
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                c = clients[name]
                for kind, n, tokens, stream in (
                    ("request", args.requests, 1, False),
                    ("token", args.streams, args.stream_tokens, True),
                ):
                    counts, got = await counted(
                        servers[name], batch(c, n, args.concurrency, tokens, stream)
                    )
                    units = got if stream else n  # streamed tokens as the server counted them
                    for event, k in counts.items():
                        out.setdefault((kind, event, name), []).append(k / units)
            print(f"round {r + 1}/{args.rounds}", flush=True)
    finally:
        for c in clients.values():
            await c.aclose()
    return out


def render(out: dict, args: argparse.Namespace) -> Table:
    table = Table(title="API-process allocations per request and per streamed token")
    for col in ("unit", "counted", "stock", "plugin", "plugin/stock", "rounds' ratios"):
        table.add_column(col, justify="right")
    labels = {"request": "1-token request", "token": "streamed token"}
    names = {"malloc": "mallocs", "gc": "GC objects"}
    for kind in ("request", "token"):
        for event in EVENTS:
            stock, plugin = out[(kind, event, "stock")], out[(kind, event, "plugin")]
            ratios = [p / s for p, s in zip(plugin, stock, strict=True)]
            table.add_row(
                labels[kind],
                names[event],
                f"{statistics.median(stock):.1f}",
                f"{statistics.median(plugin):.1f}",
                f"{statistics.median(ratios):.4f}",
                f"{min(ratios):.4f}-{max(ratios):.4f}",
            )
    table.caption = (
        "mallocs: calls of the interpreter's _PyObject_Malloc; GC objects: objects made "
        "that the garbage collector tracks (_PyObject_GC_Link). "
        f"{args.rounds} rounds, each: {args.requests} 1-token completions and {args.streams} "
        f"streams of {args.stream_tokens} tokens on adapter '{MODEL}', {args.concurrency} at a "
        "time, per server, each server alone; counted by uprobes in the API process. "
        "Fair share on."
    )
    return table


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--streams", type=int, default=40)
    p.add_argument("--stream-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--record", type=Path)
    args = p.parse_args()
    # The servers' hash seed fixed: sets and dicts laid out alike in each run.
    os.environ.setdefault("PYTHONHASHSEED", "0")
    add_probes()
    toy = build_toy_assets()
    logs = Path(tempfile.mkdtemp(prefix="allocations_"))
    servers: dict[str, ServerProcess] = {}
    try:
        for name, plugins in (("stock", ""), ("plugin", "lora_ext")):
            port = free_port()
            servers[name] = start_server(
                engine_args(toy, port), port, logs / f"{name}.log", {"VLLM_PLUGINS": plugins}
            )
            warm_up(servers[name].url, [MODEL])
        out = asyncio.run(measure(servers, args))
    finally:
        for s in servers.values():
            s.stop()
        remove_probes()
    table = render(out, args)
    Console().print(table)
    if args.record:
        record(args.record, "allocations", table)


if __name__ == "__main__":
    main()
