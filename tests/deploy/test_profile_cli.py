"""`tandem profile` writes profile.json (the schema deploy/capacity.py and the planner read) and
two PNG plots; `tandem plan` runs on the result. Quick on a tiny model; SmolLM2 is slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.capacity import Profile
from deploy.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCHEMA_KEYS = {"model", "device", "dtype", "block_size", "prefill", "decode"}


def check_outputs(
    out: Path, input_lens: list[int], batches: list[int], contexts: list[int]
) -> dict:
    raw = json.loads(out.read_text())
    assert set(raw) >= SCHEMA_KEYS
    assert isinstance(raw["block_size"], int) and raw["device"] == "cpu"
    assert [p["input_len"] for p in raw["prefill"]] == input_lens
    assert all(isinstance(p["time_s"], float) and p["time_s"] > 0 for p in raw["prefill"])
    grid = [(d["batch_size"], d["context_len"]) for d in raw["decode"]]
    assert grid == [(b, c) for c in contexts for b in batches]
    assert all(d["step_time_s"] > 0 for d in raw["decode"])
    for suffix in ("_prefill.png", "_decode.png"):
        png = out.with_name(out.stem + suffix)
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    Profile.load(out)  # the planner can read it
    return dict(raw)


def test_profile_a_tiny_model_then_plan(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny.json"
    argv = ["profile", "--model", str(tiny_model_dirs["llama"]), "--out", str(out),
            "--device", "cpu", "--input-lens", "8,32", "--batch-sizes", "1,2",
            "--context-lens", "16,48", "--repeats", "1", "--decode-steps", "2",
            "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    raw = check_outputs(out, [8, 32], [1, 2], [16, 48])
    assert raw["model"] == tiny_model_dirs["llama"].name
    assert raw["weights"] == "checkpoint" and raw["torch_threads"] == 1
    capsys.readouterr()
    plan = ["plan", "--profile", str(out), "--rate", "1", "--isl", "20", "--osl", "8",
            "--slo-ttft", "10", "--slo-itl", "10", "--json"]  # fmt: skip
    assert main(plan) == 0
    rec = json.loads(capsys.readouterr().out)["recommendation"]
    assert rec["num_prefill"] >= 1 and rec["num_decode"] >= 1


def test_profile_a_dummy_config(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "dummy.json"
    config = tiny_model_dirs["qwen3"] / "config.json"
    argv = ["profile", "--dummy-config", str(config), "--out", str(out), "--device", "cpu",
            "--input-lens", "8", "--batch-sizes", "1", "--context-lens", "16", "--repeats", "1",
            "--decode-steps", "1", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    raw = check_outputs(out, [8], [1], [16])
    assert raw["model"] == f"{config.parent.name} (dummy weights)"
    assert raw["weights"] == "dummy (random)"


def test_unknown_dummy_config_is_an_error(tmp_path: Path) -> None:
    argv = ["profile", "--dummy-config", "no-such-shape", "--out", str(tmp_path / "x.json")]
    assert main(argv) == 2


@pytest.mark.slow
@pytest.mark.model
def test_profile_smollm2_with_the_default_sweep(smollm2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    argv = ["profile", "--model", str(smollm2_dir), "--out", str(out), "--device", "cpu",
            "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    raw = check_outputs(out, [32, 128, 512], [1, 4, 16], [128, 512])
    assert raw["model"] == smollm2_dir.name and raw["dtype"] == "float32"
