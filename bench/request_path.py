"""The request path at stock cost: API-process CPU time per request and per streamed
token, stock vLLM with our plugin (``VLLM_PLUGINS=lora_ext``, fair share on) over stock
vLLM without it (``VLLM_PLUGINS=``), same engine arguments.

Why it can resolve a few percent on two noisy cores:

- CPU time (user + system, every thread) of the API process alone, not wall time: the
  engine's and the client's work is not in it, and waiting is not counted;
- both servers run at once and each round loads both at the same time with the same
  batch, so drift (other processes, the host's load, page cache) hits both alike at the
  same instant; each round gives one paired ratio, and the result is the median ratio
  with a bootstrap 95% interval over the rounds (its width is the resolution of this
  run). Loading them one after the other (``--alternate``, the order drawn per round)
  pairs rounds seconds apart: its intervals were 2-3x wider here (+-4-6 % over 40
  rounds against +-1-2 % over 24);
- a server process carries its own bias (its memory layout and hash seed: two stock
  servers measured against each other came out 0.98-1.00 per token, each run with an
  interval of +-0.5 %): so the run starts several sets of fresh servers one after the
  other (``--sets``), and the interval resamples the sets, then each set's rounds.
  ``--control`` adds a second stock server to each set, measured as the plugin is: the
  method's own bias, shown beside the result. ``--paired-hash-seed`` gives a set's
  servers one hash seed (a new one per set): the part of that bias from vLLM's own dicts
  and sets is then the same on both sides (it halved the sets' spread per request in the
  one run that compared it, bench/RESULTS.md); the servers of a set start together;
- each API process is pinned to core 0, its engine's OpenMP threads and the client to
  core 1, so an API process never shares its core with a spinning engine (``--no-pin``
  turns this off); loaded at once, the two API processes share core 0 (so their
  absolute costs are higher than alone: the ratio is the result).

Usage: ``.venv/bin/python bench/request_path.py [--sets 4 --rounds 8] [--control]
[--record bench/RESULTS.md]``; ``--pool A/runs.json B/runs.json [--control]`` summarizes the
sets of earlier runs of the same code together (the caption's counts are the first run's
arguments: give them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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
from vllm_lora_ext.toy.server import (
    ServerProcess,
    free_port,
    stock_vllm_cmd,
    warm_up,
)

PROMPT = "the cat says"
MODEL = "meow"  # an adapter: the path our plugin works on


def api_cpu_s(server: ServerProcess) -> float:
    """The API process's CPU clock (every thread, nanosecond resolution: the clock-tick
    counts of ``/proc`` would quantize a round's few hundred milliseconds)."""
    return time.clock_gettime(_process_clock(server.proc.pid))


def api_user_s(server: ServerProcess) -> float:
    """User time alone (clock ticks): the system time of a loopback write includes
    delivering it to the client (the receiver's TCP work runs in the sender's call)."""
    return psutil.Process(server.proc.pid).cpu_times().user


def _process_clock(pid: int) -> int:
    """Linux's CPU-time clock id of another process (``clock_getcpuclockid``)."""
    return (~pid << 3) | 2


def pin(server: ServerProcess, api_core: int, engine_core: int) -> None:
    """The API process (each of its threads) on one core, its children on the other."""
    proc = psutil.Process(server.proc.pid)
    for thread in proc.threads():
        os.sched_setaffinity(thread.id, {api_core})
    for child in proc.children(recursive=True):
        for thread in child.threads():
            try:
                os.sched_setaffinity(thread.id, {engine_core})
            except OSError:  # a thread that ended meanwhile
                pass


def completion_body(tokens: int, stream: bool) -> dict:
    """One completion on the adapter, exactly ``tokens`` long; a stream ends with the
    server's usage (tokens counted by it: an event may carry several)."""
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def batch(c: httpx.AsyncClient, n: int, concurrency: int, tokens: int, stream: bool) -> int:
    """``n`` completions of ``tokens`` tokens, ``concurrency`` at a time; returns the
    completion tokens received."""
    left = iter(range(n))
    got = 0

    async def worker() -> None:
        nonlocal got
        body = completion_body(tokens, stream)
        for _ in left:
            if stream:
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line.startswith('data: {"') and '"usage":{' in line:
                            got += json.loads(line[6:])["usage"]["completion_tokens"]
            else:
                r = await c.post("/v1/completions", json=body)
                r.raise_for_status()
                got += r.json()["usage"]["completion_tokens"]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return got


async def measure(
    servers: dict[str, ServerProcess], args: argparse.Namespace, seed: int
) -> dict[str, dict[str, list[float]]]:
    """Per kind (request, token) and server: API CPU ms per unit, one value per round."""
    out: dict[str, dict[str, list[float]]] = {
        kind: {name: [] for name in servers}
        for kind in ("request", "token", "request (user)", "token (user)")
    }
    clients = {
        name: httpx.AsyncClient(
            base_url=s.url,
            timeout=300,
            # Idle connections dropped before uvicorn's keep-alive timeout (5 s) closes
            # them under a request reusing one (a round can leave a client idle that long).
            limits=httpx.Limits(max_connections=args.concurrency, keepalive_expiry=1),
        )
        for name, s in servers.items()
    }
    rng = random.Random(seed)

    async def one(name: str, n: int, tokens: int, stream: bool) -> tuple[str, float, float, int]:
        """One batch on one server: (name, API CPU ms, its user part, units served)."""
        before, user = api_cpu_s(servers[name]), api_user_s(servers[name])
        units = await batch(clients[name], n, args.concurrency, tokens, stream)
        cpu_ms = 1000 * (api_cpu_s(servers[name]) - before)
        user_ms = 1000 * (api_user_s(servers[name]) - user)
        return name, cpu_ms, user_ms, units if stream else n

    try:
        for name in servers:  # warm both paths (first requests pay one-off costs)
            await batch(clients[name], 64, args.concurrency, 1, False)
            await batch(clients[name], 16, args.concurrency, args.stream_tokens, True)
        for r in range(args.rounds):
            order = list(servers)
            rng.shuffle(order)
            for kind, n, tokens, stream in (
                ("request", args.requests, 1, False),
                ("token", args.streams, args.stream_tokens, True),
            ):
                if args.alternate:
                    done = [await one(name, n, tokens, stream) for name in order]
                else:  # both at once: the same machine state at the same instant
                    done = await asyncio.gather(*(one(name, n, tokens, stream) for name in order))
                for name, cpu_ms, user_ms, per in done:
                    out[kind][name].append(cpu_ms / per)
                    out[f"{kind} (user)"][name].append(user_ms / per)
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(
                    f"{k} {n} {v[-1]:.3f}"
                    for k, d in out.items()
                    if "user" not in k
                    for n, v in d.items()
                ),
                flush=True,
            )
    finally:
        for c in clients.values():
            await c.aclose()
    return out


def bootstrap_sets(sets: list[list[float]], seed: int, draws: int = 4000) -> tuple[float, float]:
    """95% interval of the median ratio, resampling the sets of servers and then the
    rounds of each set drawn: a process's own bias (its memory layout, hash seed; about
    +-2 % here, the same for all its rounds) is then in the interval, which resampling
    the rounds of one set alone cannot show."""
    rng = random.Random(seed)
    meds = []
    for _ in range(draws):
        drawn = [x for p in rng.choices(sets, k=len(sets)) for x in rng.choices(p, k=len(p))]
        meds.append(statistics.median(drawn))
    meds.sort()
    return meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


def summarize(runs: list[dict[str, dict[str, list[float]]]], seed: int) -> dict[str, dict]:
    """``runs``: one measurement per set of servers. Per kind, and per server measured
    against stock (the plugin; with ``--control``, another stock server too)."""
    res = {}
    for kind in runs[0]:
        for name in runs[0][kind]:
            if name == "stock":
                continue
            per_set = [
                [o / s for o, s in zip(r[kind][name], r[kind]["stock"], strict=True)] for r in runs
            ]
            ratios = [x for p in per_set for x in p]
            stock = [x for r in runs for x in r[kind]["stock"]]
            this = [x for r in runs for x in r[kind][name]]
            lo, hi = bootstrap_sets(per_set, seed)
            q = statistics.quantiles(ratios, n=4)
            res[f"{kind}/{name}"] = {
                "stock": statistics.median(stock),
                "this": statistics.median(this),
                "stock_spread": _spread(stock),
                "this_spread": _spread(this),
                "ratio": statistics.median(ratios),
                "lo": lo,
                "hi": hi,
                "q1": q[0],
                "q3": q[2],
                "sets": [statistics.median(p) for p in per_set],
            }
    return res


def _spread(xs: list[float]) -> float:
    """(p90 - p10) / median of one server's per-round values."""
    d = statistics.quantiles(xs, n=10)
    return (d[-1] - d[0]) / statistics.median(xs)


def render(res: dict[str, dict[str, float]], args: argparse.Namespace) -> Table:
    table = Table(title="API-process CPU per request and per streamed token, plugin over stock")
    for col in (
        "unit",
        "stock ms",
        "plugin (control) ms",
        "plugin/stock",
        "95% CI",
        "IQR of rounds",
        "each set",
    ):
        table.add_column(col, justify="right")
    for name, prefix in (("plugin", ""), ("control", "control: ")):
        for kind, label in (
            ("request", "1-token request"),
            ("token", "streamed token"),
            ("request (user)", "request, user time"),
            ("token (user)", "token, user time"),
        ):
            r = res.get(f"{kind}/{name}")
            if r is None or (name == "control" and "user" in kind):
                continue
            table.add_row(
                prefix + label,
                f"{r['stock']:.3f} (±{r['stock_spread'] / 2:.0%})",
                f"{r['this']:.3f} (±{r['this_spread'] / 2:.0%})",
                f"{r['ratio']:.3f}",
                f"{r['lo']:.3f}-{r['hi']:.3f}",
                f"{r['q1']:.3f}-{r['q3']:.3f}",
                " ".join(f"{x:.3f}" for x in r["sets"]),
            )
    table.caption = (
        f"{args.sets} sets of fresh servers x {args.rounds} rounds, each round: "
        f"{args.requests} 1-token completions and "
        f"{args.streams} streams of {args.stream_tokens} tokens on adapter '{MODEL}', "
        f"{args.concurrency} concurrent, per server; ratio = median over rounds of the "
        "round's plugin/stock (CI: bootstrap over sets, then over each set's rounds; "
        "each set: its median); ± = half the p10-p90 spread of "
        f"a server's rounds. Pinned: {not args.no_pin}. Servers loaded "
        f"{'one after the other' if args.alternate else 'at once'}. "
        + "Fair share on. "
        + ("A set's servers share one hash seed (one per set). " if args.paired_hash_seed else "")
        + (
            "Control: a second stock server in each set, measured as the plugin is (the "
            "method's own bias: 1.00 within its interval when it has none). "
            if args.control
            else ""
        )
        + "User time: "
        "without the kernel's part (on loopback a write also runs the client's TCP "
        "receive), at clock-tick resolution."
    )
    return table


def engine_args(toy, port: int) -> list[str]:
    cmd = stock_vllm_cmd(toy, port)
    cmd.remove("--enable-log-requests")  # per-request logging would pad both sides alike
    return cmd


def run_set(
    toy, logs: Path, args: argparse.Namespace, number: int
) -> dict[str, dict[str, list[float]]]:
    """Start fresh servers (stock, plugin, and with ``--control`` a second stock one; the
    start order changes per set), measure them together, stop them."""
    logs.mkdir(parents=True)
    env = {} if args.no_pin else {"VLLM_CPU_OMP_THREADS_BIND": "1"}
    if args.paired_hash_seed:  # one hash seed for the set's servers, a new one per set
        env["PYTHONHASHSEED"] = str(1000 * args.seed + number + 1)
    order = [("stock", ""), ("plugin", "lora_ext")] + ([("control", "")] if args.control else [])
    order = order[number % len(order) :] + order[: number % len(order)]
    servers: dict[str, ServerProcess] = {}
    # Started together, on both cores (the previous set pinned this process to one: its
    # children would inherit that): a set's start-up is most of its time otherwise.
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    try:
        ports: set[int] = set()
        for name, plugins in order:
            port = free_port()
            while port in ports:
                port = free_port()
            ports.add(port)
            env_of = {**os.environ, **env, "VLLM_PLUGINS": plugins}
            servers[name] = ServerProcess(
                engine_args(toy, port), env_of, logs / f"{name}.log", port
            )
        for s in servers.values():
            s.start()
            warm_up(s.url, [MODEL])
        if not args.no_pin:
            for s in servers.values():
                pin(s, api_core=0, engine_core=1)
            os.sched_setaffinity(0, {1})
        print(f"set {number + 1}/{args.sets}", flush=True)
        return asyncio.run(measure(servers, args, args.seed + number))
    finally:
        for s in servers.values():
            s.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=8, help="per set of servers")
    p.add_argument(
        "--sets",
        "--pairs",
        type=int,
        default=4,
        help="sets of fresh servers, one after the other (a process's own bias is per set)",
    )
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--stream-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument(
        "--alternate",
        action="store_true",
        help="load one server at a time (the order drawn per round) instead of both at once",
    )
    p.add_argument(
        "--control",
        action="store_true",
        help="a second stock server in each set, measured as the plugin is (an A/A "
        "control: the method's own bias)",
    )
    p.add_argument(
        "--paired-hash-seed",
        action="store_true",
        help="the servers of a set share one hash seed (drawn per set): the part of a "
        "process's bias that comes from vLLM's own dicts and sets is then the same on both",
    )
    p.add_argument("--record", type=Path)
    p.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        help="no servers: summarize the sets of earlier runs together (their runs.json, "
        "written beside each run's logs); they must have measured the same code",
    )
    args = p.parse_args()
    if args.pool:
        runs = [r for f in args.pool for r in json.loads(f.read_text())]
        args.sets = len(runs)
    else:
        toy = build_toy_assets()
        logs = Path(tempfile.mkdtemp(prefix="request_path_"))
        runs = []
        for i in range(args.sets):
            runs.append(run_set(toy, logs / str(i), args, i))
            # For --pool, after every set: a run stopped early keeps the sets it made.
            (logs / "runs.json").write_text(json.dumps(runs))
            print(f"per-round values: {logs / 'runs.json'}", flush=True)
    table = render(summarize(runs, args.seed), args)
    Console().print(table)
    if args.record:
        record(args.record, "request_path", table)


if __name__ == "__main__":
    main()
