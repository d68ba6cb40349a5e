"""The request path's warm cost: CPU time per request of each of ``footprint.py``'s
phases (stock vLLM's ``generate``, the gate, the book, the annotated endpoint, the
admin guard) in one process, warm, over stock's.

Why beside ``footprint.py``: that one counts the cache lines a request touches from cold
caches; this one times the code itself, warm. Both are in-process on the fake engine
(vLLM's own ``AsyncLLM`` request code, a scripted core), so neither includes the HTTP
server, vLLM's serving layer or the tokenizer; on this machine stock's path here is
~300 us of a real server's ~3 ms per request, so a microsecond here is about 0.03 points
of ``request_path.py``'s ratio. It found what the footprint did not: the JSON splice's
bytes scans cost 8 us warm (bench/RESULTS.md).

Rounds of ``--requests`` requests per phase, the phases interleaved, ``--rounds``
times; per phase the median round (CPU time of this process), and its difference from
stock's. Two runs of the same code read up to ~8 us apart (c9ab8d8 read +60 and
+68 us served over stock, by an earlier probe and by this script): compare
commits in one sitting, several runs each.

Usage: ``.venv/bin/python bench/warm_path.py [--rounds 30 --requests 300]
[--record bench/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from footprint import PHASES, phases
from results import record
from rich.console import Console
from rich.table import Table


async def measure(rounds: int, requests: int) -> dict[str, list[float]]:
    """Per phase, CPU microseconds per request of each round."""
    _, one = await phases()
    for _ in range(200):  # first requests pay one-off costs (specialization, caches)
        for name in PHASES:
            await one(name)
    per: dict[str, list[float]] = {name: [] for name in PHASES}
    for _ in range(rounds):
        for name in PHASES:
            start = time.process_time()
            for _ in range(requests):
                await one(name)
            per[name].append((time.process_time() - start) / requests * 1e6)
    return per


def render(per: dict[str, list[float]], rounds: int, requests: int) -> Table:
    table = Table(title="CPU per request, warm, in-process (fake engine), over vLLM's path")
    for col in ("path", "us per request", "over stock", "p10-p90 of rounds"):
        table.add_column(col, justify="right")
    base = statistics.median(per["stock"])
    for name in PHASES:
        values = sorted(per[name])
        mid = statistics.median(values)
        lo, hi = values[len(values) // 10], values[-1 - len(values) // 10]
        table.add_row(name, f"{mid:.1f}", f"{mid - base:+.1f}", f"{lo:.1f}-{hi:.1f}")
    table.caption = (
        f"{rounds} rounds x {requests} requests per path, the paths interleaved; median "
        "round. Each request: a 1-token completion on adapter 'meow', answered with vLLM's "
        "JSON body (footprint.py's phases). Not the HTTP server, vLLM's serving layer or "
        "the tokenizer, which both paths share."
    )
    return table


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--record", type=Path)
    args = p.parse_args()
    per = asyncio.run(measure(args.rounds, args.requests))
    table = render(per, args.rounds, args.requests)
    Console().print(table)
    if args.record:
        record(args.record, "warm_path", table)


if __name__ == "__main__":
    main()
