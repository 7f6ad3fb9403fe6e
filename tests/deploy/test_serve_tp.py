"""`tandem serve` with tensor-parallel workers: each pool's size reaches its workers' flags, and
pairings the KV hand-off cannot serve are refused at start (kv_transfer/sharded.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from deploy.app import ServeConfig, worker_spec
from deploy.serve_cli import _tp, add_parsers
from router.config import Role


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(), model_dir=str)
    return parser.parse_args(["serve", *argv])


def test_each_pool_gets_its_tensor_parallel_size() -> None:
    ns = _parse("--decode-tensor-parallel-size", "2")
    assert (_tp(ns, "prefill"), _tp(ns, "decode")) == (1, 2)
    ns = _parse("--tensor-parallel-size", "2")
    assert (_tp(ns, "prefill"), _tp(ns, "decode")) == (2, 2)
    config = ServeConfig(Path("/m"), prefill_tp=1, decode_tp=2)
    for role, tp in ((Role.PREFILL, "1"), (Role.DECODE, "2")):
        args = worker_spec(config, "w", role).args
        assert args[args.index("--tensor-parallel-size") + 1] == tp


def test_a_larger_prefill_tp_than_decode_tp_is_refused() -> None:
    with pytest.raises(ValueError, match="prefill TP 2 cannot feed decode TP 1"):
        ServeConfig(Path("/m"), prefill_tp=2, decode_tp=1)


def test_tp_invariant_shards_reach_every_worker_and_must_be_a_multiple_of_both_tps() -> None:
    ns = _parse("--decode-tensor-parallel-size", "2", "--tp-invariant-shards", "2")
    assert ns.tp_invariant_shards == 2
    config = ServeConfig(Path("/m"), prefill_tp=1, decode_tp=2, tp_invariant_shards=2)
    for role in (Role.PREFILL, Role.DECODE):
        args = worker_spec(config, "w", role).args
        assert args[args.index("--tp-invariant-shards") + 1] == "2"
    plain = worker_spec(ServeConfig(Path("/m")), "w", Role.DECODE).args
    assert "--tp-invariant-shards" not in plain
    with pytest.raises(ValueError, match="--tp-invariant-shards 3 must be a multiple"):
        ServeConfig(Path("/m"), prefill_tp=1, decode_tp=2, tp_invariant_shards=3)
