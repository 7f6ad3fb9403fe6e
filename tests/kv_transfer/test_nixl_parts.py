"""NIXL transfers cut into several WRITEs (NixlTuning.parts, the VRAM default), two real
processes on CPU: the core scenarios of test_two_processes with a source posting 3 parts. The
sink must land a transfer only on its last part's notification, and fencing must wait for every
part."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kv_transfer import test_two_processes as scenarios
from tests.kv_transfer.conftest import Pair


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    p = Pair("nixl", nixl_parts=3)
    try:
        yield p
    finally:
        p.close()


def test_scattered_blocks_land_byte_for_byte_in_parts(pair: Pair) -> None:
    scenarios.test_scattered_blocks_land_byte_for_byte(pair)


def test_64_concurrent_transfers_in_parts_interleave(pair: Pair) -> None:
    scenarios.test_64_concurrent_transfers_interleave(pair)


@pytest.mark.parametrize("cause", ["abort", "lease"])
def test_transfer_in_parts_lost_while_in_flight(pair: Pair, cause: str) -> None:
    scenarios.test_transfer_lost_while_its_write_is_in_flight(pair, cause)


def test_source_killed_mid_transfer_in_parts(pair: Pair) -> None:
    scenarios.test_source_killed_mid_transfer(pair)
