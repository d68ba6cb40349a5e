"""The request path's footprint: how many distinct cache lines (64 bytes) one request
touches in the API process, the plugin's path over vLLM's own, counted by valgrind's
callgrind with the simulated caches flushed before each request.

Why beside ``instructions.py``: per request, CPU time reads 2-3 points above the
instruction count. The difference is cache misses: with callgrind's last-level cache set
to this machine's L2 (``instructions.py --cache-sim --ll 2097152``) the plugin adds ~2,000
misses per request to stock's ~7,000, and the estimated cycles then read what CPU time
reads. A real server's misses move by +-300 from one server to the next (its memory
layout), too much to compare two versions of our code. Here, on the fake engine (vLLM's
own ``AsyncLLM`` request code, a scripted core: ``tests/unit/fakes.py``) in one process,
each request starts from flushed caches, so its misses are the lines it touches: the
same count within ~30 lines from run to run, in about a minute.

Phases, each run ``--requests`` times through a minimal ASGI app that makes one
engine request and answers vLLM's JSON body: ``stock`` (vLLM's ``generate``), ``gate``
(our gate, fair share on), ``gate, no share`` (fair share off), ``gate + book`` (the
spans recorded), ``gate + attribution`` (the endpoint annotated, as ``annotate_routes``
wraps vLLM's) and ``served`` (that behind the admin guard, as the plugin serves a
completion). Each phase's endpoint returns a Starlette response the app then sends, as
FastAPI does. What it is not: the cost of the HTTP server, vLLM's serving layer and the
tokenizer, which both paths share; lines here are all cold, while in a server the C code
stock also runs is often warm.

Usage: ``.venv/bin/python bench/footprint.py [--requests 40] [--record bench/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from instructions import control, totals, valgrind_cmd
from results import record
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
FLUSH_BYTES = 4 << 20  # twice the simulated last-level cache
LL_BYTES = 2 << 20  # this machine's L2
PHASES = ("stock", "gate", "gate, no share", "gate + book", "gate + attribution", "served")
BODY = json.dumps(
    {
        "id": "cmpl-0",
        "object": "text_completion",
        "created": 1733000000,
        "model": "meow",
        "choices": [
            {
                "index": 0,
                "text": " hi",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {"prompt_tokens": 4, "total_tokens": 5, "completion_tokens": 1},
        "kv_transfer_params": None,
    },
    separators=(",", ":"),
).encode()


async def phases() -> tuple[dict[str, Any], Callable[[str], Awaitable[None]]]:
    """Every phase's app, and ``one(name)``: one request through that phase's app (a
    1-token completion on the fake engine, answered with vLLM's JSON body)."""
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from types import SimpleNamespace

    from fakes import FakeEngine, write_adapter
    from starlette.responses import Response
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from vllm_lora_ext.config import LoraExtConfig
    from vllm_lora_ext.server import attribution
    from vllm_lora_ext.server.auth import AdminGuard
    from vllm_lora_ext.server.manager import LoraManager

    tmp = Path(tempfile.mkdtemp(prefix="footprint_"))
    params = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)

    async def engine_of(fair_share: bool | None) -> tuple[FakeEngine, LoRARequest]:
        engine = FakeEngine(manual=True, tokens_per_request=1)
        engine.vllm_config.scheduler_config = SimpleNamespace(max_num_seqs=256)
        if fair_share is None:  # stock: vLLM's generate on a LoRA request
            return engine, LoRARequest("meow", 7, "/alias")
        config = LoraExtConfig(lora_roots=[str(tmp)], fair_share=fair_share)
        manager = LoraManager(engine, config)
        manager.install()
        await manager.load("meow", str(write_adapter(tmp / f"meow-{fair_share}")))
        return engine, LoRARequest("meow", 1, "/alias")

    def endpoint_of(engine: FakeEngine, lora: LoRARequest):
        """A route's endpoint as vLLM's completion endpoint is: it runs the request and
        returns a JSON response."""

        async def endpoint(rid: str) -> Response:
            async def run() -> list:
                return [o async for o in engine.generate("p", params, rid, lora_request=lora)]

            task = asyncio.ensure_future(run())
            for _ in range(4):  # vLLM's add_request awaits: let it reach the core
                await asyncio.sleep(0)
            engine.step()
            outputs = await task
            assert outputs and outputs[-1].finished
            body = BODY.replace(b'"cmpl-0"', f'"{rid[:-2]}"'.encode())
            return Response(body, media_type="application/json")

        return endpoint

    def app_of(endpoint):
        """The app that calls the endpoint and sends its response, as FastAPI does."""

        async def app(scope, receive, send) -> None:
            response = await endpoint(rid=scope["rid"])
            await response(scope, receive, send)

        return app

    def booked(endpoint):
        async def run(rid: str) -> Response:
            with attribution.recording():
                return await endpoint(rid)

        return run

    stock, gate, unshared = [endpoint_of(*await engine_of(f)) for f in (None, True, False)]
    apps = {
        "stock": app_of(stock),
        "gate": app_of(gate),
        "gate, no share": app_of(unshared),
        "gate + book": app_of(booked(gate)),
        "gate + attribution": app_of(attribution._annotated(gate)),
        "served": AdminGuard(app_of(attribution._annotated(gate)), key_of=lambda: None),
    }
    sent: list = []
    counter = iter(range(10**9))

    async def send(message) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def one(name: str) -> None:
        rid = f"cmpl-{next(counter):012d}-0"
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "rid": rid}
        scope |= {"root_path": "", "headers": []}
        await apps[name](scope, receive, send)
        sent.clear()

    return apps, one


async def inner(requests: int) -> None:
    """The measured process: every phase's app, warmed, then each phase's requests with
    the caches flushed before each one, dumped per phase."""
    _, one = await phases()
    flush, zero = bytearray(FLUSH_BYTES), bytes(FLUSH_BYTES)
    for _ in range(50):  # first requests pay one-off costs (specialization, caches)
        for name in PHASES:
            await one(name)
    gc.collect()
    gc.disable()  # a collection lands in one phase or another
    for name in ("flush", *PHASES):
        control(os.getpid(), "--zero")
        control(os.getpid(), "--instr=on")
        for _ in range(requests):
            flush[:] = zero
            if name != "flush":  # the flush alone: what every phase's count includes
                await one(name)
        control(os.getpid(), "--instr=off")
        control(os.getpid(), f"--dump={name}")
        await asyncio.sleep(1)  # the dump is written by this process, as it runs on


def read_dumps(out: Path) -> dict[str, dict[str, int]]:
    """Event totals per phase (its dump's label), from callgrind's dumps."""
    found = {}
    for dump in sorted(out.parent.glob(f"{out.name}.*")):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("desc: Trigger: dump "):
                found[line.removeprefix("desc: Trigger: dump ").strip()] = totals(dump)
                break
    return found


def render(found: dict[str, dict[str, int]], requests: int) -> Table:
    table = Table(title="Cache lines one request touches (flushed caches), over vLLM's path")
    for col in ("path", "lines", "over stock", "code lines over stock", "instructions over stock"):
        table.add_column(col, justify="right")

    def per(e: dict[str, int], *keys: str) -> float:
        """Per request, net of the flush."""
        return sum(e[k] - found["flush"][k] for k in keys) / requests

    def lines(e: dict[str, int]) -> float:
        return per(e, "ILmr", "DLmr", "DLmw")

    base = found["stock"]
    for name in PHASES:
        e = found[name]
        table.add_row(
            name,
            f"{lines(e):,.0f}",
            f"{lines(e) - lines(base):+,.0f}",
            f"{per(e, 'ILmr') - per(base, 'ILmr'):+,.0f}",
            f"{per(e, 'Ir') - per(base, 'Ir'):+,.0f}",
        )
    table.caption = (
        f"{requests} requests per path, each after a {FLUSH_BYTES >> 20} MB flush of "
        "callgrind's simulated caches (last level 2 MB, 16-way), one at a time, on the fake "
        "engine: a 1-token completion on adapter 'meow' answered with vLLM's JSON body. "
        "lines: misses per request, less the flush's own (measured alone); code lines: "
        "instruction fetches. The same code reads the same within ~30 lines."
    )
    return table


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--record", type=Path)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        asyncio.run(inner(args.requests))
        return
    work = Path(tempfile.mkdtemp(prefix="footprint_"))
    out = work / "callgrind"
    cmd = valgrind_cmd(out, cache_sim=True, ll_bytes=LL_BYTES)
    cmd += [sys.executable, __file__, "--inner", f"--requests={args.requests}"]
    with open(work / "log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
    found = read_dumps(out)
    missing = [name for name in ("flush", *PHASES) if name not in found]
    if missing:
        raise SystemExit(f"footprint: no dump of {missing} (see {work / 'log'})")
    table = render(found, args.requests)
    Console().print(table)
    if args.record:
        record(args.record, "footprint", table)


if __name__ == "__main__":
    main()
