"""Reliability soak: many clients, a swapper as fast as it can go, random pause / abort /
resume, for a set time, against one running server. Used by ``bench/soak.py`` (the
recorded 10-minute run) and, shortened, by the integration tests.

What must hold: no 5xx at all; no request lost or truncated (retrying clients always
end ``length`` with exactly their budget and 1:1 logprobs; plain clients end ``length``
or, only while the soak itself aborted their adapter, ``abort``); resident versions
never exceed ``keep_versions`` plus the requests in flight (each holds one version);
nothing paused, held or in flight once the run ends; server memory roughly flat.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil
from pydantic import BaseModel, Field

from vllm_lora_ext.client import RemoteInferenceClient, RetryPolicy

PROMPT = "the cat says"


class SoakConfig(BaseModel):
    duration_s: float = Field(default=600.0, gt=0)
    adapters: dict[str, list[str]] = Field(
        description="adapter name -> adapter directories the swapper cycles through"
    )
    retry_clients: int = Field(default=3, ge=1, description="per adapter")
    plain_clients: int = Field(default=1, ge=0, description="per adapter, no retry")
    max_tokens: int = Field(default=64, ge=1)
    chaos_every_s: float = Field(default=0.5, gt=0)
    keep_versions: int = Field(default=2, ge=1, description="the server's setting")
    seed: int = 0


@dataclass
class SoakReport:
    seconds: float = 0.0
    completed: int = 0
    aborted_as_asked: int = 0
    retries: int = 0
    swaps: int = 0
    chaos: Counter = field(default_factory=Counter)
    server_errors: Counter = field(default_factory=Counter)  # status -> count
    failures: list[str] = field(default_factory=list)
    max_resident_over_bound: int = 0
    rss_mib: list[tuple[float, float]] = field(default_factory=list)
    leftover: list[str] = field(default_factory=list)

    @property
    def rss_slope_mib_per_min(self) -> float:
        return _slope(self.rss_mib)

    @property
    def rss_slope_late_mib_per_min(self) -> float:
        """Over the second half only: the KV cache and the LoRA caches are touched
        progressively (RSS rises while they warm up), a leak keeps rising."""
        return _slope(self.rss_mib[len(self.rss_mib) // 2 :])

    @property
    def ok(self) -> bool:
        return (
            not self.server_errors
            and not self.failures
            and self.max_resident_over_bound <= 0
            and not self.leftover
            and self.completed > 0
        )

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("duration (s)", f"{self.seconds:.0f}"),
            ("requests completed", str(self.completed)),
            ("aborted as the soak asked (plain clients)", str(self.aborted_as_asked)),
            ("client-side continuations", str(self.retries)),
            ("swaps", str(self.swaps)),
            (
                "pauses / aborts / resumes",
                ", ".join(f"{k} {v}" for k, v in sorted(self.chaos.items())),
            ),
            ("5xx answers", str(sum(self.server_errors.values()))),
            ("lost or truncated requests", str(len(self.failures))),
            ("resident versions over keep + in flight", str(max(0, self.max_resident_over_bound))),
            ("server RSS start -> end (MiB)", self._rss_span()),
            ("server RSS slope, whole run (MiB/min)", f"{self.rss_slope_mib_per_min:+.2f}"),
            ("server RSS slope, second half (MiB/min)", f"{self.rss_slope_late_mib_per_min:+.2f}"),
            ("left paused / held / in flight", str(len(self.leftover))),
        ]

    def _rss_span(self) -> str:
        if not self.rss_mib:
            return "-"
        return f"{self.rss_mib[0][1]:.0f} -> {self.rss_mib[-1][1]:.0f}"


def _slope(points: list[tuple[float, float]]) -> float:
    if len(points) < 3:
        return 0.0
    xs, ys = zip(*points, strict=True)
    return 60 * statistics.linear_regression(xs, ys).slope


class _Counting(httpx.AsyncBaseTransport):
    """Counts every 5xx the server answers (the client retries 503s: we still see them)."""

    def __init__(self, report: SoakReport) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=256))
        self.report = report

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if response.status_code >= 500:
            self.report.server_errors[response.status_code] += 1
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def server_rss_mib(pid: int) -> float:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


async def soak(url: str, cfg: SoakConfig, server_pid: int | None = None) -> SoakReport:
    report = SoakReport()
    rng = random.Random(cfg.seed)
    transport = _Counting(report)
    policy = RetryPolicy(deadline_s=300, max_attempts=200)
    rc = RemoteInferenceClient(url, retry=policy, transport=transport)
    names = list(cfg.adapters)
    aborting: dict[str, int] = dict.fromkeys(names, 0)  # chaos aborts in progress
    stop = asyncio.Event()
    started = time.monotonic()

    for name, paths in cfg.adapters.items():
        await rc.load_lora_adapter(name, paths[0])

    async def retrying(name: str) -> None:
        while not stop.is_set():
            r = await rc.sample_with_retry(
                name, prompt=PROMPT, max_tokens=cfg.max_tokens, ignore_eos=True, temperature=1.0
            )
            s = r.samples[0]
            report.retries += s.attempts - 1
            if s.finish_reason != "length" or len(s.token_ids) != cfg.max_tokens:
                report.failures.append(f"{name}: {s.finish_reason} with {len(s.token_ids)}")
            elif len(s.logprobs) != len(s.token_ids):
                report.failures.append(f"{name}: {len(s.logprobs)} logprobs")
            else:
                report.completed += 1

    async def plain(name: str) -> None:
        while not stop.is_set():
            window = aborting[name]
            r = await rc.sample(name, prompt=PROMPT, max_tokens=cfg.max_tokens, ignore_eos=True)
            s = r.samples[0]
            if s.finish_reason == "length" and len(s.token_ids) == cfg.max_tokens:
                report.completed += 1
            elif s.finish_reason == "abort" and (window or aborting[name]):
                report.aborted_as_asked += 1
            else:
                report.failures.append(f"{name} (plain): {s.finish_reason} {len(s.token_ids)}")

    async def swapper() -> None:
        i = 0
        while not stop.is_set():
            name = names[i % len(names)]
            paths = cfg.adapters[name]
            interrupt = rng.choice([None, None, "continue"])
            await rc.load_lora_adapter(name, paths[i % len(paths)], interrupt=interrupt)
            report.swaps += 1
            i += 1
            await asyncio.sleep(0)

    async def chaos() -> None:
        while not stop.is_set():
            await asyncio.sleep(cfg.chaos_every_s * rng.uniform(0.5, 1.5))
            name = rng.choice(names)
            action = rng.choice(["keep", "abort", "wait", "abort_requests"])
            report.chaos[action] += 1
            if action == "abort_requests":
                aborting[name] += 1
                try:
                    await rc.abort_lora_requests(name)
                finally:
                    await asyncio.sleep(0.2)  # outputs already on their way count as asked
                    aborting[name] -= 1
                continue
            if action == "abort":
                aborting[name] += 1
            try:
                try:
                    await rc.pause_generation(name, mode=action, timeout_s=2.0)
                except Exception as e:  # a wait-mode pause may time out: that is allowed
                    if action != "wait" or "409" not in str(e):
                        raise
                await asyncio.sleep(rng.uniform(0, 0.3))
            finally:
                await rc.resume_generation(name)
                report.chaos["resume"] += 1
                if action == "abort":
                    await asyncio.sleep(0.2)
                    aborting[name] -= 1

    async def monitor() -> None:
        while not stop.is_set():
            for per_url in (await rc.list_loras()).values():
                for name in names:
                    a = per_url.get(name)
                    if a is not None:
                        over = len(a["versions"]) - cfg.keep_versions - a["in_flight"]
                        report.max_resident_over_bound = max(report.max_resident_over_bound, over)
            if server_pid is not None:
                t = time.monotonic() - started
                report.rss_mib.append((t, await asyncio.to_thread(server_rss_mib, server_pid)))
            await asyncio.sleep(1.0)

    workers = [
        *(retrying(n) for n in names for _ in range(cfg.retry_clients)),
        *(plain(n) for n in names for _ in range(cfg.plain_clients)),
        swapper(),
        chaos(),
        monitor(),
    ]
    tasks = [asyncio.create_task(w) for w in workers]
    try:
        done, _ = await asyncio.wait(tasks, timeout=cfg.duration_s, return_when="FIRST_EXCEPTION")
        for t in done:
            if t.exception() is not None:
                report.failures.append(f"worker died: {t.exception()!r}")
    finally:
        stop.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 600)
        for res in results:
            if isinstance(res, BaseException):
                report.failures.append(f"worker ended with {res!r}")
        report.seconds = time.monotonic() - started
        # Nothing may be left paused, held or in flight.
        for name in names:
            await rc.resume_generation(name)
        deadline = time.monotonic() + 60
        while True:
            state = await rc.list_loras()
            report.leftover = [
                f"{url} {n}: paused={a['paused']} held={a['held']} in_flight={a['in_flight']}"
                for url, per_url in state.items()
                for n, a in per_url.items()
                if n in names and (a["paused"] or a["held"] or a["in_flight"])
            ]
            if not report.leftover or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        for name in names:
            await rc.unload_lora_adapter(name)
        await rc.aclose()
        await transport.aclose()
    return report
