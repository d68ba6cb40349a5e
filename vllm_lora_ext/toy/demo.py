"""``python -m vllm_lora_ext demo``: a real multi-tenant LoRA RL loop on the toy model.

Server actor(s) run in Ray. Each tenant (``meow``, ``woof``) is a tiny RL loop: it
samples a batch with ``sample_with_retry``, scores each completion by the share of its
target word, takes a PPO-clip step on its own LoRA with peft on the CPU, publishes the
adapter through the filesystem broadcast and swaps it in on every replica (zero-stall;
requests in flight are alternately continued server-side and aborted + retried by the
client) while the other tenant keeps sampling. An evaluator per tenant keeps long
greedy requests in flight through all of it. Exit code 0 only if no request was lost
and every tenant's reward rose to the target; a reward-per-step chart is written.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vllm_lora_ext.broadcast import RetentionConfig, clean
from vllm_lora_ext.client import RemoteInferenceClient, RetryPolicy

PROMPT = "the cat says"
MAX_OFF_POLICY = 1
SWAP_EVERY_S = 0.25  # the isolation phase: four swaps a second, far above an RL cadence


@dataclass
class Tenant:
    name: str
    word: str
    root: Path
    trainer: object = None
    rewards: list[float] = field(default_factory=list)
    swap_ms: list[float] = field(default_factory=list)
    eval_tokens: int = 0
    eval_seconds: float = 0.0
    requests: int = 0
    retried: int = 0  # client-side continuations after an abort
    lost: list[str] = field(default_factory=list)
    last_step: Path | None = None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vllm_lora_ext demo", description=__doc__)
    p.add_argument("--steps", type=int, default=12, help="RL steps per tenant")
    p.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="NAME=WORD",
        help="a tenant and the word its reward counts (default: meow=meow, woof=woof)",
    )
    p.add_argument("--replicas", type=int, default=1, help="server actors (data parallel)")
    p.add_argument("--model", help="a real HF model directory instead of the toy model")
    p.add_argument(
        "--batch",
        type=int,
        default=16,
        help="samples per step, one request (more than the server's --max-num-seqs, "
        "32, plus 2 are served in parts: raise it with --extra-server-args)",
    )
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per sample")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs per batch")
    p.add_argument(
        "--target-reward",
        type=float,
        default=0.6,
        help="every tenant's final reward must reach this (0 only asks that it rose)",
    )
    p.add_argument(
        "--chart",
        type=Path,
        default=None,
        help="where the reward-per-step chart goes (PNG; default: beside the broadcast root)",
    )
    p.add_argument("--eval-tokens", type=int, default=128, help="length of evaluator requests")
    p.add_argument("--isolation-s", type=float, default=5.0, help="each isolation phase")
    p.add_argument("--extra-server-args", default="", help="more vLLM server arguments")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (reward at start and at end)")
    return args


def reward(text: str, word: str) -> float:
    words = text.split()
    return words.count(word) / len(words) if words else 0.0


async def train(t: Tenant, rc: RemoteInferenceClient, args, progress, task) -> None:
    retention = RetentionConfig(max_async_level=MAX_OFF_POLICY)
    for step in range(1, args.steps + 1):
        batch = await rc.sample_with_retry(
            t.name, prompt=PROMPT, n=args.batch, max_tokens=args.max_tokens, temperature=1.0
        )
        rewards = [reward(s.text, t.word) for s in batch.samples]
        t.rewards.append(statistics.mean(rewards))
        await asyncio.to_thread(
            t.trainer.step,
            batch.prompt_token_ids,
            [s.token_ids for s in batch.samples],
            [s.logprobs for s in batch.samples],
            rewards,
        )
        t.last_step = await asyncio.to_thread(t.trainer.publish, t.root, step)
        interrupt = "continue" if step % 2 else "abort"
        loaded = await rc.load_lora_adapter(t.name, str(t.last_step), interrupt=interrupt)
        t.swap_ms.append(max(r["latency_ms"] for r in loaded.values()))
        await asyncio.to_thread(clean, t.root, step, retention)
        tps = t.eval_tokens / t.eval_seconds if t.eval_seconds else 0.0
        progress.update(
            task,
            advance=1,
            info=f"reward {t.rewards[-1]:.2f}  swap {t.swap_ms[-1]:.0f} ms  eval {tps:.0f} tok/s",
        )


async def evaluate(t: Tenant, rc: RemoteInferenceClient, args, stop: asyncio.Event) -> None:
    """Long greedy requests kept in flight through the swaps; every one must complete."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            r = await rc.sample_with_retry(
                t.name, prompt=PROMPT, max_tokens=args.eval_tokens, temperature=0, ignore_eos=True
            )
        except Exception as e:
            t.lost.append(f"{type(e).__name__}: {e}")
            continue
        s = r.samples[0]
        t.requests += 1
        t.retried += s.attempts - 1
        if s.finish_reason not in ("length", "stop") or len(s.token_ids) != args.eval_tokens:
            t.lost.append(f"finish {s.finish_reason} with {len(s.token_ids)} tokens")
        t.eval_tokens += len(s.token_ids)
        t.eval_seconds += time.monotonic() - started


async def throughput(rc: RemoteInferenceClient, name: str, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while time.monotonic() < deadline:
            r = await rc.sample(name, prompt=PROMPT, max_tokens=32, ignore_eos=True)
            tokens += len(r.samples[0].token_ids)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(3)))
    return tokens / (time.monotonic() - started)


async def isolation(rc: RemoteInferenceClient, a: Tenant, b: Tenant, seconds: float) -> float:
    """b's tokens/s while a is swapped every SWAP_EVERY_S, over b's without swaps."""
    quiet = await throughput(rc, b.name, seconds)
    stop = asyncio.Event()

    async def swapper() -> None:
        while not stop.is_set():
            await rc.load_lora_adapter(a.name, str(a.last_step))
            await asyncio.sleep(SWAP_EVERY_S)

    task = asyncio.create_task(swapper())
    try:
        busy = await throughput(rc, b.name, seconds)
    finally:
        stop.set()
        await task
    return busy / quiet


async def interruptions(urls: list[str]) -> dict[tuple[str, str], float]:
    """Interrupted requests by (name, how) from every replica's /metrics."""
    pattern = re.compile(
        r"^lora_ext_(interrupted|continued)_requests_total\{([^}]*)\} ([0-9.e+]+)$", re.M
    )
    out: dict[tuple[str, str], float] = {}
    async with httpx.AsyncClient(timeout=30) as c:
        for url in urls:
            text = (await c.get(f"{url}/metrics")).text
            for kind, labels, value in pattern.findall(text):
                lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
                how = lab.get("how", "server") if kind == "interrupted" else "continued"
                key = (lab["lora_name"], how)
                out[key] = out.get(key, 0.0) + float(value)
    return out


@dataclass
class Summary:
    tenants: list[Tenant]
    isolation: float | None
    interrupted: dict[tuple[str, str], float]
    resident_ok: bool


async def run(urls: list[str], tenants: list[Tenant], model: str, args) -> Summary:
    from vllm_lora_ext.toy.ppo import PolicyTrainer

    policy = RetryPolicy(deadline_s=600, max_attempts=100)
    async with RemoteInferenceClient(urls, retry=policy) as rc:
        for i, t in enumerate(tenants):
            t.trainer = await asyncio.to_thread(
                PolicyTrainer, model, lr=args.lr, seed=i, epochs=args.epochs
            )
            t.last_step = await asyncio.to_thread(t.trainer.publish, t.root, 0)
            await rc.load_lora_adapter(t.name, str(t.last_step))
        stop = asyncio.Event()
        evaluators = [asyncio.create_task(evaluate(t, rc, args, stop)) for t in tenants]
        columns = (
            TextColumn("{task.description:>8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        )
        try:
            with Progress(*columns) as progress:
                tasks = {
                    t.name: progress.add_task(t.name, total=args.steps, info="") for t in tenants
                }
                await asyncio.gather(
                    *(train(t, rc, args, progress, tasks[t.name]) for t in tenants)
                )
        finally:
            stop.set()
            await asyncio.gather(*evaluators)
        ratio = None
        if len(tenants) >= 2 and args.isolation_s > 0:
            ratio = await isolation(rc, tenants[0], tenants[1], args.isolation_s)
        state = await rc.list_loras()
        resident_ok = all(
            not a["in_flight"] and not a["paused"] and len(a["versions"]) <= MAX_OFF_POLICY + 2
            for per_url in state.values()
            for a in per_url.values()
        )
    return Summary(tenants, ratio, await interruptions(urls), resident_ok)


def render(summary: Summary, args) -> tuple[Table, bool]:
    table = Table(title=f"vllm-lora-ext RL demo: {args.steps} steps, {args.replicas} replica(s)")
    for col in (
        "tenant", "reward start", "reward end", "swaps", "swap p50 ms", "swap p99 ms",
        "aborted", "continued", "retried", "eval reqs", "lost",
    ):  # fmt: skip
        table.add_column(col, justify="right" if col != "tenant" else "left")
    ok = summary.resident_ok
    for t in summary.tenants:
        start, end = statistics.mean(t.rewards[:2]), statistics.mean(t.rewards[-2:])
        q = statistics.quantiles(t.swap_ms, n=100, method="inclusive")
        rose = end > start and end >= args.target_reward
        ok = ok and rose and not t.lost
        table.add_row(
            t.name,
            f"{start:.2f}",
            f"[{'green' if rose else 'red'}]{end:.2f}[/]",
            str(len(t.swap_ms)),
            f"{q[49]:.1f}",
            f"{q[98]:.1f}",
            f"{summary.interrupted.get((t.name, 'abort'), 0):.0f}",
            f"{summary.interrupted.get((t.name, 'continued'), 0):.0f}",
            str(t.retried),
            str(t.requests),
            f"[{'green' if not t.lost else 'red'}]{len(t.lost)}[/]",
        )
    caption = [
        f"{'all requests completed' if ok else 'FAILED'}; resident versions bounded and "
        f"nothing left in flight: {summary.resident_ok}; reward end (mean of the last two "
        f"steps) must rise and reach {args.target_reward}"
    ]
    if summary.isolation is not None:
        a, b = summary.tenants[0].name, summary.tenants[1].name
        caption.append(
            f"'{b}' tokens/s while '{a}' swaps every {SWAP_EVERY_S}s, over without: "
            f"{summary.isolation:.3f}"
        )
    table.caption = "\n".join(caption)
    return table, ok


def chart(summary: Summary, args, path: Path) -> None:
    """Reward per step for each tenant, and each swap's latency on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    swaps = ax.twinx()
    for i, t in enumerate(summary.tenants):
        steps = range(1, len(t.rewards) + 1)
        color = f"C{i}"
        ax.plot(steps, t.rewards, "o-", color=color, label=f"{t.name}: reward")
        swaps.plot(
            range(1, len(t.swap_ms) + 1), t.swap_ms, "x:", color=color, alpha=0.6,
            label=f"{t.name}: swap ms",
        )  # fmt: skip
    ax.axhline(args.target_reward, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("RL step (batch sampled, PPO step, publish, zero-stall swap)")
    ax.set_ylabel("reward (share of the tenant's word)")
    ax.set_ylim(0, 1)
    swaps.set_ylabel("swap latency (ms)")
    swaps.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + swaps.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="center right")
    ax.set_title(
        f"vllm-lora-ext RL demo: {len(summary.tenants)} tenants, {args.replicas} replica(s)"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=130)  # logs and CI: do not squeeze the table
    # A local Ray instance stays on loopback (by default it listens on every interface).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    import torch

    from ray_actors.server_actor import launch_servers, shutdown_servers
    from vllm_lora_ext.toy.assets import build_toy_assets

    torch.set_num_threads(1)  # the engine needs the other core
    if args.model:
        model = args.model
    else:
        with console.status("building the toy model (cached after the first run)"):
            model = str(build_toy_assets().model)
    specs = args.tenant or ["meow=meow", "woof=woof"]
    work = Path(tempfile.mkdtemp(prefix="lora_ext_demo_"))
    tenants = [
        Tenant(name, word, work / name) for name, _, word in (s.partition("=") for s in specs)
    ]
    keep = MAX_OFF_POLICY + 2
    server_args = [
        "--model", model, "--served-model-name", "base", "--enable-lora",
        "--max-lora-rank", "16", "--max-loras", str(len(tenants) * keep + 2),
        "--max-model-len", "2048", "--dtype", "float32",
        "--kv-cache-memory-bytes", str(512 * 1024 * 1024), *args.extra_server_args.split(),
    ]  # fmt: skip
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        with console.status(f"starting {args.replicas} server actor(s) (about 30 s)"):
            actors, urls = launch_servers(
                server_args, num_servers=args.replicas, config={"max_off_policy": MAX_OFF_POLICY}
            )
        try:
            console.print(f"servers: {', '.join(urls)}; broadcast root: {work}")
            summary = asyncio.run(run(urls, tenants, model, args))
        finally:
            shutdown_servers(actors)
    finally:
        ray.shutdown()
    table, ok = render(summary, args)
    console.print(table)
    chart_path = args.chart or work / "reward.png"
    chart(summary, args, chart_path)
    console.print(f"chart: {chart_path}")
    for t in summary.tenants:
        for reason in t.lost[:5]:
            console.print(f"[red]{t.name}: lost request: {reason}[/red]")
    return 0 if ok else 1
