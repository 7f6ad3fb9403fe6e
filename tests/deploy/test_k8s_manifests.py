"""The KubeRay manifests agree with the code: the Ray version is the one pinned, the commands
they run parse with the `tandem` CLI, and the router's port is the one the Service targets."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from deploy.cli import build_parser

yaml = pytest.importorskip("yaml")
K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
PYPROJECT = K8S.parents[1] / "pyproject.toml"


def load(name: str) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((K8S / name).read_text())}


def ray_pin() -> str:
    match = re.search(r'"ray\[default\]==([0-9.]+)"', PYPROJECT.read_text())
    assert match, "pyproject.toml pins ray[default]"
    return match.group(1)


def containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_cluster_spec(name: str) -> None:
    docs = load(name)
    spec = docs["RayCluster"]["spec"] if "RayCluster" in docs else docs["RayJob"]["spec"]
    cluster = spec if "headGroupSpec" in spec else spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray_pin()
    images = {c["image"] for c in containers(cluster)}
    assert len(images) == 1  # head, workers and driver share Tandem and Ray
    for group in cluster["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    head = cluster["headGroupSpec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= head["metadata"]["labels"].items()
    assert service["ports"][0]["targetPort"] == ports["tandem"] == 8000


def test_the_job_and_planner_commands_parse() -> None:
    docs = load("rayjob.yaml")
    argv = shlex.split(docs["RayJob"]["spec"]["entrypoint"])
    assert argv[:2] == ["tandem", "serve"]
    serve = build_parser().parse_args(argv[1:])
    assert (serve.host, serve.port, serve.launcher) == ("0.0.0.0", 8000, "ray")
    (planner,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert planner["command"] == ["tandem", "planner"]
    args = build_parser().parse_args(["planner", *planner["args"]])
    assert args.url == "http://tandem:8000" and args.gpu_budget >= 2


def test_the_image_has_the_pinned_ray() -> None:
    assert f"FROM rayproject/ray:{ray_pin()}-" in (K8S / "Dockerfile").read_text()
