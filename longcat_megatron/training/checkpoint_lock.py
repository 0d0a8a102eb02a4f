"""One run owns its checkpoint directory: an exclusive lock on ``SAVE_DIR/.lock``.

Rank 0 takes a POSIX record lock (``fcntl.lockf``: also honoured over NFS; Lustre needs the ``flock``
mount option) for the whole run and writes its host, pid and SLURM job id into the file. The kernel
drops the lock when the process dies, kill -9 included, so there is nothing to clean up. A second run
on the same directory (e.g. a rerun while the ranks of a killed launcher are still alive) stops with a
message naming the holder instead of racing it for the same iterations.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from typing import Optional

import torch.distributed as dist

from longcat_megatron import collectives
from longcat_megatron.errors import UserInputError

LOCK_NAME = ".lock"


class CheckpointDirLocked(UserInputError):
    """Another live process holds the checkpoint directory."""


class SaveDirLock:
    """The held lock (rank 0) or a placeholder (other ranks); :meth:`release` is idempotent."""

    def __init__(self, fd: Optional[int] = None):
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


def _holder_text() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return (f"host={socket.gethostname()} pid={os.getpid()}"
            + (f" slurm_job={job}" if job else "") + f" since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")


def _try_lock(root: str) -> tuple[Optional[int], str]:
    """(fd, "") when locked, (None, holder description) when another process holds it."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise
        try:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
        finally:
            os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_text().encode(), 0)
    os.fsync(fd)
    return fd, ""


def lock_save_dir(root: Optional[str]) -> SaveDirLock:
    """Collective: rank 0 locks ``root`` for this run; every rank raises :class:`CheckpointDirLocked`
    when another run holds it. No-op without a save directory."""
    if not root:
        return SaveDirLock()
    rank = dist.get_rank() if dist.is_initialized() else 0
    fd, holder = (None, "")
    if rank == 0:
        fd, holder = _try_lock(root)
    if collectives.any_rank(rank == 0 and fd is None):
        who = holder if rank == 0 else "see rank 0's message for the holder"
        raise CheckpointDirLocked(
            f"checkpoint directory {root} is in use by another run ({who}; lock file "
            f"{os.path.join(root, LOCK_NAME)}). Two runs saving into one directory would overwrite "
            "each other's checkpoints: stop the other run (its ranks may outlive a killed launcher: "
            "check the host and pid above), or give this run its own checkpoint.save"
        )
    return SaveDirLock(fd)
