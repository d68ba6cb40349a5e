"""Swap cost at real adapter sizes, ours against stock vLLM's in-place reload, one server.

Usage: ``.venv/bin/python bench/swap_cost.py [--ranks 16,64,256] [--swaps 5] [--bf16]
[--record bench/RESULTS.md] [--chart bench/swap_cost.png]``; the same on CUDA (``./dev``
installs the CUDA build there; pass ``--device-args`` for more vLLM flags).

The model is a 2-layer slice shaped like an 8B Llama (hidden 4096, intermediate 11008,
32/8 heads, random weights); the adapters are LoRAs of rank 16 / 64 / 256 on q, k, v, o,
gate, up, down (fp32: 9 / 37 / 147 MB; ``--bf16`` adds bf16 ones). Each swap is written
to a fresh directory first, as a trainer writes a fresh checkpoint every step (a reused
directory hides costs). Per size and swap, alternating which goes first:

- ours: ``POST /skyrl/v1/load_lora_adapter`` (staged copy, own version), answered, then
  a 1-token completion on it: load -> first token on the new version;
- stock: ``POST /v1/load_lora_adapter`` with ``load_inplace`` on the same server (the
  extension leaves vLLM's route stock here: ``LORA_EXT_MANAGE_VLLM_LORA_ROUTES=false``);
- bare ``add_lora``: the engine's own time, from our answer's ``add_lora_ms``;
- the split of our time (checks, stage, add_lora, commit) from ``timings_ms``.

Then: another tenant's inter-token gap p99 while 147 MB swaps run back to back, over the
same without swaps; and a server-side ``keep`` continuation's cost (prompt tokens
recomputed, time to the first continued token) on the same version and on a new one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from results import record
from rich.console import Console
from rich.table import Table

from vllm_lora_ext import broadcast
from vllm_lora_ext.toy.assets import build_toy_assets
from vllm_lora_ext.toy.server import free_port, lora_ext_cmd_args, start_server

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 4096, 11008, 32, 8, 2
MODULES = {
    "q_proj": ("self_attn", HIDDEN, HIDDEN),
    "k_proj": ("self_attn", HIDDEN, HIDDEN * KV_HEADS // HEADS),
    "v_proj": ("self_attn", HIDDEN, HIDDEN * KV_HEADS // HEADS),
    "o_proj": ("self_attn", HIDDEN, HIDDEN),
    "gate_proj": ("mlp", HIDDEN, INTER),
    "up_proj": ("mlp", HIDDEN, INTER),
    "down_proj": ("mlp", INTER, HIDDEN),
}
PROMPT = "the cat says hello"


def build_model(work: Path) -> Path:
    """The 8B-shaped slice, random weights, the toy tokenizer (cached in ``work``)."""
    out = work / "model"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    toy = build_toy_assets()
    tmp = work / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in toy.model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(f, tmp / f.name)
    vocab = json.loads((toy.model / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    return out


def build_adapter(dest: Path, rank: int, dtype: str, model: Path) -> int:
    """A PEFT LoRA of ``rank`` on every linear layer; returns its weight bytes."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(rank)
    tensors = {}
    for layer in range(LAYERS):
        for name, (block, n_in, n_out) in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{block}.{name}"
            a = torch.randn(rank, n_in, generator=gen) / n_in**0.5
            b = torch.randn(n_out, rank, generator=gen) * 0.01
            tensors[f"{key}.lora_A.weight"] = a.to(getattr(torch, dtype))
            tensors[f"{key}.lora_B.weight"] = b.to(getattr(torch, dtype))
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    (dest / "adapter_config.json").write_text(
        json.dumps(
            {
                "r": rank,
                "lora_alpha": rank,
                "target_modules": list(MODULES),
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": str(model),
            }
        )
    )
    return (dest / "adapter_model.safetensors").stat().st_size


def fresh_copy(template: Path, dest: Path) -> Path:
    """What a trainer does every step: a new directory, freshly written files."""
    dest.mkdir(parents=True)
    for f in template.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


async def first_token_ms(c: httpx.AsyncClient, model: str) -> float:
    started = time.monotonic()
    r = await c.post(
        "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0},
    )
    r.raise_for_status()
    return 1000 * (time.monotonic() - started)


async def load_ours(c, name: str, path: Path) -> tuple[float, dict]:
    """Our load: (ms until answered, the answer)."""
    started = time.monotonic()
    r = await c.post(
        "/skyrl/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
    )
    r.raise_for_status()
    return 1000 * (time.monotonic() - started), r.json()


async def swap_ours(c, name: str, path: Path) -> dict:
    answered, body = await load_ours(c, name, path)
    first = await first_token_ms(c, name)
    return {
        "answered": answered,
        "first_token": answered + first,
        "add_lora": body["add_lora_ms"],
        "timings": body["timings_ms"],
    }


async def swap_stock(c, name: str, path: Path, first: bool) -> dict:
    started = time.monotonic()
    r = await c.post(
        "/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(path), "load_inplace": not first},
    )
    r.raise_for_status()
    answered = 1000 * (time.monotonic() - started)
    return {"answered": answered, "first_token": answered + await first_token_ms(c, name)}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def measure_sizes(
    url: str, work: Path, shm: Path, adapters: dict[str, tuple[Path, int]], swaps: int
) -> list[dict]:
    """Per size: ours from a fresh plain directory (copied), ours from a fresh broadcast
    step in a RAM root (copied and hash-verified in one pass), stock in-place; rotating
    order."""
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        for label, (template, size) in adapters.items():
            names = {k: f"{k}-{label}" for k in ("ours", "bcast", "stock")}
            tag = label.replace(" ", "-")
            # Warm each name once (first activation of a rank costs extra everywhere).
            await swap_ours(c, names["ours"], fresh_copy(template, work / f"w-{tag}-o"))
            step = broadcast.publish(template, shm / tag, 0).path
            await swap_ours(c, names["bcast"], step)
            await swap_stock(c, names["stock"], fresh_copy(template, work / f"w-{tag}-s"), True)
            got: dict[str, list[dict]] = {k: [] for k in names}
            for i in range(swaps):
                plain = fresh_copy(template, work / f"{tag}-o{i}")
                published = broadcast.publish(template, shm / tag, i + 1).path
                stock_dir = fresh_copy(template, work / f"{tag}-s{i}")
                dirs = {"ours": plain, "bcast": published, "stock": stock_dir}
                order = list(dirs)
                for k in order[i % 3 :] + order[: i % 3]:
                    if k == "stock":
                        got[k].append(await swap_stock(c, names[k], dirs[k], False))
                    else:
                        got[k].append(await swap_ours(c, names[k], dirs[k]))
                broadcast.clean(shm / tag, i + 1, broadcast.RetentionConfig(max_async_level=1))
            row = {"adapter": label, "mb": size / 1e6}
            for k, xs in got.items():
                row[f"{k}_answered"] = median([x["answered"] for x in xs])
                row[f"{k}_first"] = median([x["first_token"] for x in xs])
            for k in ("ours", "bcast"):
                row[f"{k}_split"] = {
                    lap: median([x["timings"].get(lap, 0.0) for x in got[k]])
                    for lap in ("checks", "lock", "step", "stage", "add_lora", "commit")
                }
            rows.append(row)
            for k in ("ours", "bcast"):
                await c.post("/skyrl/v1/unload_lora_adapter", json={"lora_name": names[k]})
            await c.post("/v1/unload_lora_adapter", json={"lora_name": names["stock"]})
            shutil.rmtree(shm / tag, ignore_errors=True)
    return rows


async def gaps_ms(c: httpx.AsyncClient, model: str, tokens: int) -> list[float]:
    """Inter-token gaps of one streamed request."""
    stamps: list[float] = []
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    async with c.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.monotonic())
            await asyncio.sleep(0)
    return [1000 * (b - a) for a, b in itertools.pairwise(stamps)]


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98] if len(xs) > 2 else float("nan")


async def swap_loop(
    c: httpx.AsyncClient, who: str, dirs: list[Path], every_s: float, stop: asyncio.Event
) -> int:
    """Swap the 'swapped' adapter (ours from ``dirs``, or stock in place) every
    ``every_s`` until ``stop``; returns how many swaps ran."""
    swaps = 0
    while not stop.is_set():
        d = dirs[swaps % len(dirs)]
        started = time.monotonic()
        if who != "stock":
            await load_ours(c, "swapped", d)
        else:
            r = await c.post(
                "/v1/load_lora_adapter",
                json={"lora_name": "stock-swapped", "lora_path": str(d), "load_inplace": True},
            )
            r.raise_for_status()
        swaps += 1
        with contextlib.suppress(TimeoutError):
            left = every_s - (time.monotonic() - started)
            await asyncio.wait_for(stop.wait(), max(0.0, left))
    return swaps


async def measure_stall(
    url: str, work: Path, shm: Path, big: Path, small: Path, tokens: int, every_s: float
) -> dict:
    """Another tenant's inter-token gaps while ``big`` swaps every ``every_s``: ours, and
    stock in-place reloads at the same cadence (vLLM's own ``add_lora`` stalls the
    engine loop too), over the gaps without swaps (before and after). The swap
    directories are written first (fresh, one per swap): on this 2-core box a trainer
    writing 147 MB beside the engine would measure the trainer, not the swap."""
    dirs = [fresh_copy(big, work / f"sw{i}") for i in range(12)]
    steps = [broadcast.publish(big, shm / "stall", i).path for i in range(1, 12)]
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await swap_ours(c, "bystander", fresh_copy(small, work / "by"))
        await swap_ours(c, "swapped", dirs[0])
        await swap_stock(c, "stock-swapped", dirs[0], True)
        quiet = await gaps_ms(c, "bystander", tokens)
        counts = {}
        busy: dict[str, list[float]] = {}
        for who, paths in (("ours", dirs[1:]), ("step", steps), ("stock", dirs[1:])):
            stop = asyncio.Event()
            task = asyncio.create_task(swap_loop(c, who, paths, every_s, stop))
            try:
                busy[who] = await gaps_ms(c, "bystander", tokens)
            finally:
                stop.set()
                counts[who] = await task
        quiet += await gaps_ms(c, "bystander", tokens)
        for n in ("bystander", "swapped"):
            await c.post("/skyrl/v1/unload_lora_adapter", json={"lora_name": n})
        await c.post("/v1/unload_lora_adapter", json={"lora_name": "stock-swapped"})
    return {
        "quiet_p99": p99(quiet),
        "quiet_p50": statistics.median(quiet),
        **{f"{w}_p99": p99(g) for w, g in busy.items()},
        **{f"{w}_p50": statistics.median(g) for w, g in busy.items()},
        **{f"{w}_swaps": n for w, n in counts.items()},
        "tokens": tokens,
        "every_s": every_s,
    }


async def prefix_counters(c: httpx.AsyncClient) -> tuple[float, float]:
    text = (await c.get("/metrics")).text

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} ([0-9.e+]+)$", text, re.M))

    return total("vllm:prefix_cache_queries_total"), total("vllm:prefix_cache_hits_total")


async def stream_stamps(
    c: httpx.AsyncClient,
    model: str,
    prompt: str,
    tokens: int,
    stamps: list[float],
    started: asyncio.Event,
    chunk: asyncio.Event,
) -> None:
    """Stream one request, stamping each chunk (``chunk`` set on each); ``started`` once
    8 chunks arrived."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"stream refused: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.monotonic())
                chunk.set()
                if len(stamps) >= 8:
                    started.set()


async def measure_continuation(url: str, work: Path, adapter: Path, other: Path) -> list[dict]:
    """A long streamed request stopped by a ``keep`` pause and resumed, on its version
    and on a new one: prompt tokens the continuation recomputed (the rest came from the
    prefix cache) and the time from resume to its first continued token. The prompt
    spans several KV blocks (the CPU backend's are 128 tokens)."""
    out = []
    prompt = " ".join(["the cat says hello to the dog"] * 48)
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await swap_ours(c, "cont", fresh_copy(adapter, work / "c0"))
        for case, new_path in (("same version", None), ("new version", other)):
            stamps: list[float] = []
            started, chunk = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(
                stream_stamps(c, "cont", prompt, 400, stamps, started, chunk)
            )
            waiter = asyncio.ensure_future(started.wait())
            await asyncio.wait({task, waiter}, timeout=300, return_when="FIRST_COMPLETED")
            waiter.cancel()
            if task.done():
                task.result()  # it failed (or ended before it could be paused)
                raise RuntimeError("the request ended before it could be paused")
            r = await c.post("/skyrl/v1/pause", json={"lora_name": "cont", "mode": "keep"})
            if r.json().get("interrupted") != 1:
                raise RuntimeError(f"the pause did not interrupt the request: {r.text}")
            await asyncio.sleep(0.5)
            seen = len(stamps)
            if new_path is not None:  # paused: a probe request would be held
                await load_ours(c, "cont", fresh_copy(new_path, work / "c1"))
            counters = await prefix_counters(c)
            chunk.clear()
            resumed_at = time.monotonic()
            await c.post("/skyrl/v1/resume", json={"lora_name": "cont"})
            waiter = asyncio.ensure_future(chunk.wait())
            await asyncio.wait({task, waiter}, timeout=300, return_when="FIRST_COMPLETED")
            waiter.cancel()
            first = stamps[seen] if len(stamps) > seen else None
            await c.post("/skyrl/v1/abort_lora_requests", json={"lora_name": "cont"})
            await task
            await asyncio.sleep(1.0)  # let the engine publish its counters
            after = await prefix_counters(c)
            queried = after[0] - counters[0]
            hit = after[1] - counters[1]
            out.append(
                {
                    "case": case,
                    "recomputed": queried - hit,
                    "cached": hit,
                    "first_ms": 1000 * (first - resumed_at) if first else float("nan"),
                }
            )
        await c.post("/skyrl/v1/unload_lora_adapter", json={"lora_name": "cont"})
    return out


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["mb"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, style, label in (
        ("stock_first", "s--", "stock in-place: load -> first token"),
        ("ours_first", "o-", "ours, plain dir: load -> first token"),
        ("bcast_first", "^-", "ours, broadcast step: load -> first token"),
        ("stock_answered", "s:", "stock: load answered"),
        ("ours_answered", "o:", "ours, plain dir: load answered"),
        ("bcast_answered", "^:", "ours, broadcast step: load answered"),
    ):
        ax.plot(xs, [r[key] for r in rows], style, label=label)
    for r in rows:
        ax.annotate(
            r["adapter"], (r["mb"], r["ours_first"]), textcoords="offset points", xytext=(4, 6)
        )
    ax.set_xlabel("adapter size (MB)")
    ax.set_ylabel("ms (median)")
    ax.set_title("LoRA swap cost by adapter size (8B-shaped 2-layer slice, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="16,64,256")
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="also a bf16 adapter of the top rank")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "swap_cost")
    parser.add_argument("--record", type=Path, default=None)
    parser.add_argument("--chart", type=Path, default=None)
    parser.add_argument("--stall-tokens", type=int, default=80)
    parser.add_argument("--stall-every-s", type=float, default=1.0, help="swap cadence")
    parser.add_argument("--device-args", default="", help="more vLLM server arguments")
    parser.add_argument(
        "--phases", default="sizes,stall,continuation", help="which measurements to run"
    )
    parser.add_argument("--stage-priority", default="low", choices=["normal", "low", "idle"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    console = Console() if Console().is_terminal else Console(width=160)
    with console.status("building the 8B-shaped slice and its adapters"):
        model = build_model(args.work)
        ranks = [int(r) for r in args.ranks.split(",")]
        adapters: dict[str, tuple[Path, int]] = {}
        for rank in ranks:
            d = args.work / f"adapter-r{rank}-f32"
            adapters[f"r{rank} fp32"] = (d, build_adapter(d, rank, "float32", model))
        if args.bf16:
            d = args.work / f"adapter-r{ranks[-1]}-bf16"
            adapters[f"r{ranks[-1]} bf16"] = (d, build_adapter(d, ranks[-1], "bfloat16", model))
    runs = args.work / f"runs-{os.getpid()}"
    port = free_port()
    cmd = lora_ext_cmd_args(
        [
            "--model", str(model), "--served-model-name", "slice", "--enable-lora",
            "--max-lora-rank", str(max(ranks)), "--max-loras", "4", "--max-cpu-loras", "8",
            "--max-model-len", "1024", "--max-num-seqs", "8", "--dtype", "float32",
            "--kv-cache-memory-bytes", str(256 * 1024 * 1024), "--enable-prefix-caching",
            "--allow-runtime-lora-updating", *args.device_args.split(),
        ],
        port,
    )  # fmt: skip
    env = {
        "LORA_EXT_MANAGE_VLLM_LORA_ROUTES": "false",
        "LORA_EXT_KEEP_VERSIONS": "2",
        "LORA_EXT_STAGE_PRIORITY": args.stage_priority,
    }
    server = start_server(cmd, port, args.work / "server.log", env)
    try:
        phases = set(args.phases.split(","))
        rows, stall, cont = [], None, []
        if "sizes" in phases:
            shm = Path(tempfile.mkdtemp(prefix="swap_cost_", dir="/dev/shm"))
            try:
                rows = asyncio.run(measure_sizes(server.url, runs, shm, adapters, args.swaps))
            finally:
                shutil.rmtree(shm, ignore_errors=True)
            console.print_json(data=rows)
        big = adapters[f"r{ranks[-1]} fp32"][0]
        small = adapters[f"r{ranks[0]} fp32"][0]
        if "stall" in phases:
            shm = Path(tempfile.mkdtemp(prefix="swap_cost_", dir="/dev/shm"))
            try:
                stall = asyncio.run(
                    measure_stall(
                        server.url, runs, shm, big, small, args.stall_tokens, args.stall_every_s
                    )
                )
            finally:
                shutil.rmtree(shm, ignore_errors=True)
            console.print_json(data=stall)
        if "continuation" in phases:
            cont = asyncio.run(measure_continuation(server.url, runs, big, small))
    finally:
        server.stop()
        shutil.rmtree(runs, ignore_errors=True)
    table = Table(
        title=f"swap cost, {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores"
    )
    for col in (
        "adapter", "MB", "stock answered", "stock -> 1st", "ours dir answered",
        "ours dir -> 1st", "ratio", "ours step answered", "ours step -> 1st", "ratio",
        "add_lora", "stage dir / step",
    ):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["adapter"],
            f"{r['mb']:.0f}",
            f"{r['stock_answered']:.0f}",
            f"{r['stock_first']:.0f}",
            f"{r['ours_answered']:.0f}",
            f"{r['ours_first']:.0f}",
            f"{r['ours_first'] / r['stock_first']:.2f}",
            f"{r['bcast_answered']:.0f}",
            f"{r['bcast_first']:.0f}",
            f"{r['bcast_first'] / r['stock_first']:.2f}",
            f"{r['ours_split']['add_lora']:.0f}",
            f"{r['ours_split']['stage']:.0f} / {r['bcast_split']['stage']:.0f}",
        )
    notes = [
        f"ms, median of {args.swaps} swaps each. 'dir': a fresh plain directory per swap on "
        "disk (copied to RAM, then loaded); 'step': a fresh broadcast step per swap in a RAM "
        "root (copied and xxh3-verified in one pass: never hard-linked, a trainer could rewrite "
        "a linked file under a live version). Stock in-place reloads a "
        "fresh directory."
    ]
    if stall is not None:
        notes.append(
            f"Another tenant's inter-token gap p99 while a {ranks[-1]}-rank adapter swaps "
            f"every {stall['every_s']:g} s (stage_priority {args.stage_priority}): ours from "
            f"plain dirs {stall['ours_p99']:.0f} ms ({stall['ours_swaps']} swaps), ours from "
            f"RAM-root steps {stall['step_p99']:.0f} ms ({stall['step_swaps']}), stock "
            f"in-place {stall['stock_p99']:.0f} ms ({stall['stock_swaps']}), without "
            f"{stall['quiet_p99']:.0f} ms: ratios "
            + " / ".join(
                f"{stall[k + '_p99'] / stall['quiet_p99']:.2f}" for k in ("ours", "step", "stock")
            )
            + " (p50 "
            + " / ".join(f"{stall[k + '_p50']:.0f}" for k in ("ours", "step", "stock", "quiet"))
            + " ms)."
        )
    if cont:
        notes.append(
            "keep continuation: "
            + "; ".join(
                f"{c['case']}: {c['recomputed']:.0f} prompt tokens recomputed "
                f"({c['cached']:.0f} cached), first continued token {c['first_ms']:.0f} ms"
                for c in cont
            )
        )
    table.caption = " ".join(notes)
    console.print(table)
    if args.chart and rows:
        chart(rows, args.chart)
    if args.record:
        name = "swap cost" if rows else f"swap cost ({args.phases})"
        record(args.record, name, table, width=190, image=args.chart if rows else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
