"""`python -m deploy.child PARENT_PID MODULE ARGS...`: run `python -m MODULE ARGS...` so that it
is SIGKILLed when PARENT_PID dies.

Why a separate exec step: a Ray actor that owns a worker process can itself be killed with
SIGKILL (`ray.kill`, OOM killer, `kill -9`); its child would then live on, holding its GPU and
port. PR_SET_PDEATHSIG survives execve, and setting it here rather than in a `preexec_fn`
avoids running Python between fork and exec in a process full of threads (Ray's workers).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent_pid, module, *args = sys.argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != int(parent_pid):  # the parent died before prctl: nobody to die with
        raise SystemExit(f"deploy.child: parent {parent_pid} is gone")
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


if __name__ == "__main__":
    main()
