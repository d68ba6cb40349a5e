"""``python -m vllm_lora_ext demo``: the extension end to end on the built-in toy model.

Starts the server in a Ray actor with two adapters, then shows what a multi-tenant RL
controller needs: pausing one tenant's adapter leaves the other generating; a ``keep``
pause continues the paused requests server-side after resume with exactly the tokens
asked for; an ``abort`` pause returns them partial. Exits 0 only if all of that held.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

import httpx
from rich.console import Console
from rich.table import Table

PROMPT = "the cat says"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vllm_lora_ext demo", description=__doc__)
    p.add_argument("--model", help="a real model directory instead of the toy model")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="adapters for --model (exactly two: the first is paused, the second keeps going)",
    )
    p.add_argument("--replicas", type=int, default=1, help="server actors to start")
    p.add_argument("--max-tokens", type=int, default=1500, help="length of the long requests")
    p.add_argument("--extra-server-args", default="", help="more vLLM server arguments")
    return p.parse_args(argv)


async def complete(c: httpx.AsyncClient, model: str, max_tokens: int) -> dict:
    r = await c.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    r.raise_for_status()
    return r.json()


async def wait_in_flight(c: httpx.AsyncClient, name: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = {a["lora_name"]: a for a in (await c.get("/skyrl/v1/loras")).json()["adapters"]}
        if state[name]["in_flight"] >= n:
            await asyncio.sleep(0.5)  # let them produce some tokens
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{n} requests of {name} never got in flight")


def text_of(out: dict) -> str:
    return out["choices"][0]["text"]


async def run_scenarios(url: str, paused: str, other: str, max_tokens: int, report: Report):
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        for model in (paused, other):
            await complete(c, model, 4)

        # 1. keep-mode pause of one adapter; the other keeps generating.
        long = [asyncio.create_task(complete(c, paused, max_tokens)) for _ in range(2)]
        await wait_in_flight(c, paused, 2)
        r = (await c.post("/skyrl/v1/pause", json={"lora_name": paused, "mode": "keep"})).json()
        t0 = time.monotonic()
        during = await asyncio.gather(*[complete(c, other, 64) for _ in range(4)])
        other_s = time.monotonic() - t0
        still_paused = not any(t.done() for t in long)
        report.add(
            f"pause '{paused}' (keep) leaves '{other}' generating",
            still_paused and all(d["usage"]["completion_tokens"] == 64 for d in during),
            f"{r.get('interrupted')} {paused} request(s) stopped; 4x64 {other} tokens in "
            f"{other_s:.2f}s while paused",
        )
        await asyncio.sleep(0.5)
        await c.post("/skyrl/v1/resume", json={"lora_name": paused})
        outs = await asyncio.gather(*long)
        exact = all(o["usage"]["completion_tokens"] == max_tokens for o in outs)
        report.add(
            f"'{paused}' continues server-side after resume",
            exact and all(o["choices"][0]["finish_reason"] == "length" for o in outs),
            f"{[o['usage']['completion_tokens'] for o in outs]} tokens (asked {max_tokens}), "
            f"one response each",
        )

        # 2. abort-mode pause: the callers get their partial output back now.
        long = [asyncio.create_task(complete(c, paused, max_tokens)) for _ in range(2)]
        await wait_in_flight(c, paused, 2)
        await c.post("/skyrl/v1/pause", json={"lora_name": paused, "mode": "abort"})
        outs = await asyncio.gather(*long)
        await c.post("/skyrl/v1/resume", json={"lora_name": paused})
        partial = [o["usage"]["completion_tokens"] for o in outs]
        report.add(
            f"pause '{paused}' (abort) returns partial output",
            all(o["choices"][0]["finish_reason"] == "abort" for o in outs)
            and all(0 < n < max_tokens for n in partial),
            f"finish_reason=abort with {partial} of {max_tokens} tokens: "
            f"{text_of(outs[0])[:40]!r}...",
        )
        state = (await c.get("/skyrl/v1/loras")).json()["adapters"]
        report.add(
            "nothing left in flight or paused",
            not any(a["in_flight"] or a["paused"] for a in state),
            ", ".join(f"{a['lora_name']} v{a['version']}" for a in state),
        )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    console = Console()
    import ray

    from ray_actors.server_actor import launch_servers, shutdown_servers
    from vllm_lora_ext.toy import build_toy_assets

    if args.model:
        if len(args.lora) != 2:
            console.print("[red]--model needs exactly two --lora NAME=PATH[/red]")
            return 2
        model, loras = args.model, args.lora
    else:
        with console.status("building the toy model and adapters (cached after the first run)"):
            toy = build_toy_assets()
        model = str(toy.model)
        loras = [f"{n}={p}" for n, p in toy.adapters.items()]
    names = [spec.split("=", 1)[0] for spec in loras]
    server_args = [
        "--model", model, "--enable-lora", "--max-lora-rank", "16",
        "--max-loras", "6", "--max-model-len", "4096", "--dtype", "float32",
        "--kv-cache-memory-bytes", str(512 * 1024 * 1024),
        "--lora-modules", *loras, *args.extra_server_args.split(),
    ]  # fmt: skip
    report = Report()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        with console.status(f"starting {args.replicas} server actor(s) (about 30 s)"):
            actors, urls = launch_servers(server_args, num_servers=args.replicas)
        try:
            console.print(f"servers: {', '.join(urls)}")
            for url in urls:
                with console.status(f"running the scenarios against {url}"):
                    asyncio.run(run_scenarios(url, names[0], names[1], args.max_tokens, report))
        finally:
            shutdown_servers(actors)
    finally:
        ray.shutdown()

    table = Table(title="vllm-lora-ext demo")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for c in report.checks:
        table.add_row(c.name, "[green]ok[/green]" if c.ok else "[red]FAILED[/red]", c.detail)
    console.print(table)
    return 0 if report.ok else 1
