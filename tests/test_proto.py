"""The committed gRPC stubs are exactly what the pinned generator makes from proto/*.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    (tmp_path / "proto").mkdir()
    protos = sorted((REPO / "proto").glob("*.proto"))
    for p in protos:
        shutil.copy(p, tmp_path / "proto" / p.name)
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
            "--grpc_python_out=.", "--mypy_out=.", *[f"proto/{p.name}" for p in protos],
        ],
        cwd=tmp_path, check=True, capture_output=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )  # fmt: skip
    generated = sorted(f.name for f in (tmp_path / "proto").iterdir() if "_pb2" in f.name)
    committed = sorted(f.name for f in (REPO / "proto").iterdir() if "_pb2" in f.name)
    assert generated == committed
    for name in generated:
        fresh = (tmp_path / "proto" / name).read_text()
        assert fresh == (REPO / "proto" / name).read_text(), f"{name} is stale: run `make proto`"


def test_stubs_import_and_pin_grpc_1_84() -> None:
    from proto import tandem_pb2, tandem_pb2_grpc

    # 1.84 gencode imports under grpcio 1.84 (the GPU image) and 1.85 (here)
    assert tandem_pb2_grpc.GRPC_GENERATED_VERSION == "1.84.0"
    assert tandem_pb2.GenerateRequest(request_id="r").request_id == "r"
