"""Helper processes (checkpoint-writer Manager) die with the rank that started them.

Kept free of torch imports: it runs first in every spawned helper.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In a helper process: get SIGKILL when the parent (the rank) dies (Linux ``PR_SET_PDEATHSIG``),
    so that no helper outlives its rank as an orphan; exits at once if the parent is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the rank's wrapper (launch/rank.sh) cleans up
        return
    if os.getppid() != parent_pid:
        os._exit(0)
