"""preferred_node(): pack and spread across a pool's per-worker placement groups."""

from __future__ import annotations

from deploy.placement import Node, PoolPlacement, Strategy, preferred_node

NODES = [
    Node("a", {"CPU": 16, "GPU": 8}),
    Node("b", {"CPU": 16, "GPU": 8}),
    Node("c", {"CPU": 16}),  # no GPU: never eligible for GPU workers
]
PACK = PoolPlacement(num_gpus=1, strategy=Strategy.PACK)
SPREAD = PoolPlacement(num_gpus=1, strategy=Strategy.SPREAD)


def test_bundle_is_one_multi_gpu_bundle_without_zero_entries() -> None:
    assert PoolPlacement(num_gpus=4, num_cpus=2).bundle() == {"CPU": 2, "GPU": 4.0}
    assert PoolPlacement(num_gpus=0, num_cpus=1).bundle() == {"CPU": 1}
    assert PoolPlacement(num_gpus=0, num_cpus=0).bundle() == {}


def test_pack_follows_the_pool_then_the_other_pool() -> None:
    assert preferred_node(PACK, NODES, [], []) is None  # nothing placed: Ray chooses
    assert preferred_node(PACK, NODES, [], ["b"]) == "b"  # next to the other pool
    assert preferred_node(PACK, NODES, ["a", "b", "a"], ["a", "b", "a", "b", "b"]) == "a"


def test_spread_goes_where_the_pool_is_thinnest() -> None:
    assert preferred_node(SPREAD, NODES, [], []) == "a"
    assert preferred_node(SPREAD, NODES, ["a"], ["a"]) == "b"
    assert preferred_node(SPREAD, NODES, ["a", "b"], ["a", "b", "b"]) == "a"


def test_only_nodes_that_can_hold_the_bundle() -> None:
    big = PoolPlacement(num_gpus=16, strategy=Strategy.SPREAD)
    assert preferred_node(big, NODES, [], []) is None
    cpu = PoolPlacement(num_gpus=0, num_cpus=1, strategy=Strategy.SPREAD)
    assert preferred_node(cpu, NODES, ["a", "b"], ["a", "b"]) == "c"
