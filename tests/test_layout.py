"""Repository layout and dependency rules.

- every top-level package resolves to this repo (PyPI's `proto-plus` also ships a `proto` package);
- the import-linter contracts in pyproject.toml hold (`lint-imports` exits 0);
- importing the router and every runtime module loads no torch (checked at run time, in a fresh
  interpreter, which also catches imports import-linter cannot see).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = [
    "router",
    "prefill_worker",
    "decode_worker",
    "kv_transfer",
    "proto",
    "deploy",
    "runtime",
    "engine",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_package_resolves_inside_repo(name: str) -> None:
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"package {name!r} is not importable"
    locations = [Path(p).resolve() for p in spec.submodule_search_locations or []]
    assert locations == [REPO / name], (
        f"{name!r} resolves to {locations or spec.origin}, not {REPO / name} "
        "(shadowed by an installed distribution?)"
    )


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports} missing: run `make venv`"
    proc = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"lint-imports failed:\n{proc.stdout}\n{proc.stderr}"


def _torch_free(package: str, walk: bool) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys

        pkg = importlib.import_module({package!r})
        mods = [pkg.__name__]
        if {walk!r}:
            def onerror(name):
                raise ImportError(f"cannot import {{name}}")
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".", onerror=onerror):
                if info.name.endswith(".__main__"):
                    continue
                importlib.import_module(info.name)
                mods.append(info.name)
        print("imported:", ", ".join(mods))
        if "torch" in sys.modules:
            sys.exit("torch was loaded by: " + ", ".join(mods))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(("package", "walk"), [("router", False), ("runtime", True)])
def test_import_does_not_load_torch(package: str, walk: bool) -> None:
    proc = _torch_free(package, walk)
    assert proc.returncode == 0, f"{package}:\n{proc.stdout}\n{proc.stderr}"


def test_tandem_proto_wins_outside_the_repo(tmp_path: Path) -> None:
    """Regression: ray[default] installs proto-plus, whose top-level `proto` shadows ours in
    site-packages. Entry points and launched children must still import Tandem's."""
    import os

    from runtime.source_root import child_env

    code = "import proto, sys; print(proto.__file__)"
    entry = (
        "from runtime.source_root import put_first_on_path; put_first_on_path(); "
        "import proto; print(proto.__file__)"
    )
    env = child_env(dict(os.environ))
    for snippet in (code, entry):
        out = subprocess.run(
            [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True,
            text=True, check=True,
        ).stdout.strip()  # fmt: skip
        assert Path(out).resolve().is_relative_to(REPO), out
