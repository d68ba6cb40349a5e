"""Placement math with fake GPU resources (no vLLM, no Ray): replicas packed one per
node group, never overlapping, and a request the cluster cannot hold refused with what
is missing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ray_actors.placement import PlacementError, ReplicaShape, device_of, plan

TWO_BY_TWO = {"node-a": {"GPU": 2, "CPU": 8}, "node-b": {"GPU": 2, "CPU": 8}}


def test_two_tp2_replicas_over_two_2gpu_nodes_take_one_node_each():
    shape = ReplicaShape(tp=2, device="GPU")
    assert shape.bundles() == [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert sorted(plan(TWO_BY_TWO, 2, shape)) == ["node-a", "node-b"]


def test_oversubscription_is_refused_with_what_is_missing():
    with pytest.raises(PlacementError) as err:
        plan(TWO_BY_TWO, 3, ReplicaShape(tp=2))
    msg = str(err.value)
    assert "3 replica(s) of tp=2" in msg and "2 GPU on one node, 2 fit" in msg
    assert "node-a: 6/8 CPU, 0/2 GPU" in msg and "node-b: 6/8 CPU, 0/2 GPU" in msg


def test_a_tp_group_never_spans_nodes():
    one_each = {"a": {"GPU": 1, "CPU": 4}, "b": {"GPU": 1, "CPU": 4}}  # 2 GPUs, not on one node
    with pytest.raises(PlacementError, match="0 fit"):
        plan(one_each, 1, ReplicaShape(tp=2))
    assert plan(one_each, 2, ReplicaShape(tp=1)) in (["a", "b"], ["b", "a"])


def test_cpu_clusters_get_cpu_only_bundles():
    nodes = {"n1": {"CPU": 2}}
    assert device_of(nodes["n1"]) == "CPU" and device_of({"GPU": 1, "CPU": 1}) == "GPU"
    shape = ReplicaShape(tp=2, device="CPU")
    assert shape.bundles() == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert plan(nodes, 1, shape) == ["n1"]
    with pytest.raises(PlacementError, match="2 CPU on one node, 1 fit"):
        plan(nodes, 2, shape)


def test_best_fit_keeps_whole_nodes_for_later_replicas():
    nodes = {"big": {"GPU": 4, "CPU": 8}, "small": {"GPU": 2, "CPU": 8}}
    assert plan(nodes, 1, ReplicaShape(tp=2)) == ["small"]
    assert plan(nodes, 1, ReplicaShape(tp=4)) == ["big"]


@given(
    gpus=st.lists(st.integers(0, 8), min_size=1, max_size=5),
    replicas=st.integers(1, 6),
    tp=st.sampled_from([1, 2, 4]),
    pp=st.sampled_from([1, 2]),
)
def test_plans_never_overlap_and_refusals_are_real(gpus, replicas, tp, pp):
    nodes = {f"n{i}": {"GPU": g, "CPU": 64} for i, g in enumerate(gpus)}
    shape = ReplicaShape(tp=tp, pp=pp)
    whole = sum(g // (tp * pp) for g in gpus)  # replicas the nodes can hold at most
    try:
        placed = plan(nodes, replicas, shape)
    except PlacementError:
        assert whole < replicas  # refused only when it truly does not fit
        return
    assert len(placed) == replicas
    for node, res in nodes.items():
        assert placed.count(node) * tp * pp <= res["GPU"]
