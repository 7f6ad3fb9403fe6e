"""Where a pool's workers go on a Ray cluster: what each one reserves, and which node to prefer.

Each worker reserves one placement-group bundle `{"CPU": num_cpus, "GPU": num_gpus}` before its
actor starts: a tensor-parallel worker's GPUs are one multi-GPU bundle, so they are on one node
(the worker is one process that owns them all) and reserved together or not at all. One
placement group per worker, because Ray cannot grow or shrink a placement group: a pool-wide
group would strand a GPU for every worker scaled away until its last worker left.

The pool's strategy is therefore applied across those groups as a soft node preference:

    pack    the node already running most of this pool (else most Tandem workers):
            fewer nodes, and prefill and decode workers next to each other (KV over NVLink)
    spread  the eligible node running fewest of this pool: a node lost takes fewer workers

Soft: when the preferred node has no room, Ray places the group elsewhere.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class Strategy(enum.Enum):
    PACK = "pack"
    SPREAD = "spread"


@dataclass(frozen=True, slots=True)
class PoolPlacement:
    num_gpus: int = 0  # per worker (its tensor-parallel size); 0: a CPU worker
    num_cpus: float = 1.0  # per worker, Ray's logical CPUs
    strategy: Strategy = Strategy.PACK

    def __post_init__(self) -> None:
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus must be >= 0, got {self.num_cpus}")

    def bundle(self) -> dict[str, float]:
        """The worker's placement-group bundle; empty when it asks for nothing."""
        wanted = {"CPU": self.num_cpus, "GPU": float(self.num_gpus)}
        return {name: amount for name, amount in wanted.items() if amount > 0}


@dataclass(frozen=True, slots=True)
class Node:
    node_id: str
    resources: Mapping[str, float]  # totals, as ray.nodes() reports them


def preferred_node(
    placement: PoolPlacement,
    nodes: Sequence[Node],
    pool_nodes: Sequence[str],
    all_worker_nodes: Sequence[str],
) -> str | None:
    """The node to hint for the next worker of a pool, or None (let Ray choose).

    `pool_nodes`: the node of each running worker of this pool; `all_worker_nodes`: the same
    for every Tandem worker. Only nodes whose totals can hold the bundle are eligible."""
    bundle = placement.bundle()
    eligible = [
        n.node_id
        for n in nodes
        if all(n.resources.get(name, 0.0) >= amount for name, amount in bundle.items())
    ]
    if not eligible:
        return None
    pool, everyone = Counter(pool_nodes), Counter(all_worker_nodes)
    if placement.strategy is Strategy.PACK:
        ranked = sorted(eligible, key=lambda n: (-pool[n], -everyone[n], n))
        best = ranked[0]
        return best if pool[best] or everyone[best] else None
    return min(eligible, key=lambda n: (pool[n], everyone[n], n))
