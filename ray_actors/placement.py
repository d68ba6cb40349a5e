"""Where replicas go: a pure planner over the cluster's nodes, checked before Ray is
asked, so a request the cluster cannot hold is refused with what is missing instead of
a placement group that stays pending forever (or engines that silently share a GPU).

Each replica is one placement group of ``tp x pp`` bundles, packed on one node
(``STRICT_PACK``: a tensor-parallel group never spans nodes), one accelerator per bundle
on GPU clusters and CPU-only bundles on CPU clusters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, Field

Device = Literal["GPU", "CPU"]


class PlacementError(RuntimeError):
    """The cluster cannot hold the replicas asked for; the message says what is missing."""


class ReplicaShape(BaseModel):
    """What one replica needs: ``tp x pp`` workers on one node."""

    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    device: Device = "GPU"
    cpus_per_worker: float = Field(default=1.0, gt=0)

    @property
    def workers(self) -> int:
        return self.tp * self.pp

    def bundles(self) -> list[dict[str, float]]:
        """The replica's placement-group bundles, worker rank order."""
        one = {"CPU": self.cpus_per_worker}
        if self.device == "GPU":
            one["GPU"] = 1.0
        return [dict(one) for _ in range(self.workers)]

    def needs(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for bundle in self.bundles():
            for k, v in bundle.items():
                total[k] = total.get(k, 0.0) + v
        return total


def device_of(cluster: Mapping[str, float]) -> Device:
    return "GPU" if cluster.get("GPU", 0) > 0 else "CPU"


def plan(nodes: Mapping[str, Mapping[str, float]], replicas: int, shape: ReplicaShape) -> list[str]:
    """The node each replica goes on (first fit, fullest node first so whole nodes stay
    free for later replicas), or :class:`PlacementError` naming what is missing."""
    if replicas < 1:
        raise PlacementError("at least one replica is needed")
    need = shape.needs()
    free = {node: dict(res) for node, res in nodes.items()}
    out: list[str] = []
    for _ in range(replicas):
        fits = [n for n, res in free.items() if all(res.get(k, 0) >= v for k, v in need.items())]
        if not fits:
            raise PlacementError(_missing(nodes, free, replicas, len(out), shape))
        node = min(fits, key=lambda n: (free[n].get(shape.device, 0), n))
        for k, v in need.items():
            free[node][k] -= v
        out.append(node)
    return out


def _missing(
    nodes: Mapping[str, Mapping[str, float]],
    free: Mapping[str, Mapping[str, float]],
    replicas: int,
    placed: int,
    shape: ReplicaShape,
) -> str:
    need = shape.needs()
    want = ", ".join(f"{v:g} {k}" for k, v in sorted(need.items()))
    have = "; ".join(
        f"{node}: " + ", ".join(f"{free[node].get(k, 0):g}/{res.get(k, 0):g} {k}" for k in need)
        for node, res in sorted(nodes.items())
    )
    return (
        f"cannot place {replicas} replica(s) of tp={shape.tp} x pp={shape.pp} on "
        f"{shape.device}: each needs {want} on one node, {placed} fit. Free/total per "
        f"node: {have or 'no nodes'}. Add nodes with that much free, or ask for fewer "
        "or smaller replicas."
    )
