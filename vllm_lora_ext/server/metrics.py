"""Prometheus metrics of the extension, served on vLLM's own ``/metrics``.

Events (swaps, interruptions) are counters and a histogram updated where they happen;
state (resident versions, leases in flight, held requests) is read from the registry at
scrape time by :class:`StateCollector`, so it can never drift from the truth.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vllm_lora_ext import broadcast
from vllm_lora_ext.errors import LoraExtError

UNKNOWN = "<unknown>"  # the label of refused loads of names we do not serve

SWAPS = Counter(
    "lora_ext_swaps",
    "Adapter loads (swaps), by adapter name and outcome.",
    ["lora_name", "outcome"],
)
SWAP_LATENCY = Histogram(
    "lora_ext_swap_latency_seconds",
    "Load request to new version serving (checks, staging, add_lora, commit).",
    ["lora_name"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INTERRUPTED = Counter(
    "lora_ext_interrupted_requests",
    "Requests stopped by a pause, an abort or a swap, by how they end: "
    "'abort' (returned partial) or 'continue' (continued server-side).",
    ["lora_name", "how"],
)
CONTINUED = Counter(
    "lora_ext_continued_requests",
    "Requests continued server-side after an interruption (one per continuation).",
    ["lora_name"],
)


SHARE_WAIT = Histogram(
    "lora_ext_tenant_queue_wait_seconds",
    "Time a request waited for its tenant's share of the engine (fair share on).",
    ["tenant"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def count_swap(name: str | None, error: BaseException | None, latency_ms: float = 0.0) -> None:
    """One load's outcome (``name`` None: a name we do not serve, so bad input cannot
    mint series)."""
    if error is None:
        SWAPS.labels(name, "ok").inc()
        SWAP_LATENCY.labels(name).observe(latency_ms / 1000)
        return
    if isinstance(error, broadcast.NotReadyError):
        outcome = "not_ready"
    elif isinstance(error, broadcast.CorruptStepError):
        outcome = "corrupt"
    elif isinstance(error, LoraExtError):
        outcome = "refused"
    else:
        outcome = "error"
    SWAPS.labels(name or UNKNOWN, outcome).inc()


def forget(name: str) -> None:
    """Drop the series of a name that is gone (names come and go; series must not)."""
    for metric, label_sets in (
        (SWAPS, [(name, o) for o in ("ok", "refused", "not_ready", "corrupt", "error")]),
        (SWAP_LATENCY, [(name,)]),
        (INTERRUPTED, [(name, "abort"), (name, "continue")]),
        (CONTINUED, [(name,)]),
        (SHARE_WAIT, [(name,)]),
    ):
        for labels in label_sets:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)


VLLM_LORA_INFO = "vllm:lora_requests_info"


def prune_vllm_lora_info() -> int:
    """Keep only the newest series of vLLM's ``vllm:lora_requests_info`` gauge.

    vLLM labels that gauge with the comma-joined names of the adapters running and
    waiting, sets the current combination to the current time, and keeps every
    combination it ever saw. With one engine-side name per version, nearly every swap
    makes a new series that is never dropped (measured: /metrics grew from 54 KB to
    434 KB over 3,000 swaps). Only the newest series says anything; the rest go.
    """
    gauge = REGISTRY._names_to_collectors.get(VLLM_LORA_INFO)
    names = getattr(gauge, "_labelnames", None)
    if gauge is None or not names:
        return 0
    samples = [s for family in gauge.collect() for s in family.samples]
    if len(samples) <= 1:
        return 0
    newest = max(samples, key=lambda s: s.value)
    stale = [s for s in samples if s is not newest]
    for sample in stale:
        with contextlib.suppress(KeyError):
            gauge.remove(*(sample.labels[n] for n in names))
    return len(stale)


class _HasSnapshot(Protocol):
    def snapshot(self) -> list[dict]: ...


class StateCollector(Collector):
    """Per-name gauges of every live manager in this process, read at scrape time."""

    def __init__(self) -> None:
        self.sources: weakref.WeakSet[_HasSnapshot] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        resident = GaugeMetricFamily(
            "lora_ext_resident_versions",
            "Versions resident per adapter name.",
            labels=["lora_name"],
        )
        in_flight = GaugeMetricFamily(
            "lora_ext_in_flight_requests",
            "Requests holding a version of the adapter (the refcount per name).",
            labels=["lora_name"],
        )
        held = GaugeMetricFamily(
            "lora_ext_held_requests",
            "New requests held because their adapter is paused.",
            labels=["lora_name"],
        )
        paused = GaugeMetricFamily(
            "lora_ext_paused", "1 while the adapter is paused.", labels=["lora_name"]
        )
        queued = GaugeMetricFamily(
            "lora_ext_tenant_queued_requests",
            "Requests waiting for their tenant's share of the engine.",
            labels=["tenant"],
        )
        running = GaugeMetricFamily(
            "lora_ext_tenant_running_sequences",
            "Engine sequences a tenant holds (fair share on).",
            labels=["tenant"],
        )
        service = GaugeMetricFamily(
            "lora_ext_tenant_service_tokens",
            "Tokens a tenant received (prompt + generated) since its counter began.",
            labels=["tenant"],
        )
        for source in list(self.sources):
            for tenant, info in getattr(source, "tenants", dict)().items():
                queued.add_metric([tenant], info["queued"])
                running.add_metric([tenant], info["running"])
                service.add_metric([tenant], info["service_tokens"])
            for a in source.snapshot():
                name = a["lora_name"]
                resident.add_metric([name], len(a["versions"]))
                in_flight.add_metric([name], a["in_flight"])
                held.add_metric([name], a["held"])
                paused.add_metric([name], 1 if a["paused"] else 0)
        yield from (resident, in_flight, held, paused, queued, running, service)


STATE = StateCollector()
REGISTRY.register(STATE)
