"""Ray on loopback for the deploy tests: a local cluster per module, dashboard off, a small
object store, its own temp dir, shut down in teardown (never `ray stop`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

# Read by Ray when it is imported: "local-only Ray", every Ray process on 127.0.0.1; no token
# auth (Ray 2.60 turns it on by default and writes ~/.ray/auth_token).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no report to Ray's servers
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

FAKE_GPUS = 4


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A fresh local Ray cluster with FAKE_GPUS fake GPUs (address="local": never someone
    else's `ray start` cluster on this machine)."""
    ray = pytest.importorskip("ray")
    temp_dir = tempfile.mkdtemp(prefix="tdray-")  # short: Ray's socket paths must fit 107 bytes
    ray.init(
        address="local",
        num_cpus=8,
        num_gpus=FAKE_GPUS,
        include_dashboard=False,
        object_store_memory=80 << 20,
        _temp_dir=temp_dir,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
