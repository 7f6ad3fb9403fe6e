"""Where Tandem's own top-level packages live, and how child processes are made to find them.

Hazard: `ray[default]` pulls in proto-plus, whose top-level module is also called `proto`. In a
venv that has both, `import proto` outside the repo directory finds proto-plus (site-packages
comes before an editable install's finder). Every entry point and every child process therefore
puts Tandem's source root first on its path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent  # holds runtime/, proto/, router/, ...


def put_first_on_path() -> None:
    """This process: Tandem's packages win over same-named ones in site-packages."""
    root = str(SOURCE_ROOT)
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)
    for name in ("proto",):  # drop a shadowing module imported before this call
        module = sys.modules.get(name)
        if module is not None and not str(getattr(module, "__file__", "")).startswith(root):
            del sys.modules[name]


def child_env(env: dict[str, str]) -> dict[str, str]:
    """A child process's environment with Tandem's source root first on PYTHONPATH."""
    parts = [str(SOURCE_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(parts))}
