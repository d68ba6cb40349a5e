"""Reliability soak against a fresh server on the toy model (default 10 minutes).

Usage: ``.venv/bin/python bench/soak.py [--minutes 10] [--record bench/RESULTS.md]``.
Exit code 0 only if the soak held (see ``vllm_lora_ext/soak.py`` for what must hold).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import tempfile
from pathlib import Path

from results import record
from rich.console import Console
from rich.table import Table

from vllm_lora_ext.toy.assets import build_toy_assets
from vllm_lora_ext.toy.server import free_port, lora_ext_cmd, start_server, warm_up
from vllm_lora_ext.toy.soak import SoakConfig, soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--record", type=Path, default=None, help="append the table here")
    args = parser.parse_args()
    toy = build_toy_assets()
    paths = [str(toy.adapters["meow"]), str(toy.adapters["woof"])]
    cfg = SoakConfig(
        duration_s=60 * args.minutes,
        adapters={"soak-a": paths, "soak-b": paths[::-1], "soak-c": paths},
    )
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="soak_")) / "server.log"
    server = start_server(lora_ext_cmd(toy, port), port, log, {})
    try:
        warm_up(server.url, ["meow", "woof"])
        report = asyncio.run(soak(server.url, cfg, server.proc.pid))
    finally:
        server.stop()
    table = Table(
        title=f"soak, {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores: "
        f"{'HELD' if report.ok else 'FAILED'}"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in report.rows():
        table.add_row(k, v)
    table.caption = (
        f"{len(cfg.adapters)} adapters x ({cfg.retry_clients} retrying + {cfg.plain_clients} "
        f"plain clients), {cfg.max_tokens} tokens each, chaos every ~{cfg.chaos_every_s}s"
    )
    Console().print(table)
    for failure in report.failures[:20]:
        print("failure:", failure)
    if args.record:
        record(args.record, "soak", table, width=110)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
