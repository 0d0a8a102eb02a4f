"""Checkpoint integrity: per-file SHA-256 digests taken while the shards are written, verified on
load; which ``iter_*`` directories count as complete and which may be removed; save errors that name
their cause and path.

Digests. megatron-core's torch_dist writer (``FileSystemWriterAsync``, used for sync and async saves)
streams every shard file through one ``open(name, "wb")`` in its writer processes.
:func:`install_digesting_writer` points that module's ``open`` at :class:`_DigestingFile`, which
hashes the bytes as they pass and, on close, leaves ``<shard>.digest`` (size + SHA-256) next to the
shard: no second pass over the data. At the commit, rank 0 folds the sidecars into ``checksums.json``
(small files such as ``common.pt`` and ``.metadata`` are hashed there) before writing the tracker.
``sha256sum`` can recheck any file by hand.

On load, the ranks split the files of the checkpoint (every file is read and hashed once, by one
rank) and agree on the result; a missing, truncated or altered file is named. Checkpoints written
before this module (no ``checksums.json``) load unverified.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
import time
from typing import Optional

import torch
import torch.distributed as dist

from longcat_megatron import collectives
from longcat_megatron.errors import UserInputError

MANIFEST = "checksums.json"
SIDECAR = ".digest"
_CHUNK = 16 << 20


class CheckpointCorruptError(UserInputError):
    """Files of a committed checkpoint are missing, truncated or do not match their digest."""


class CheckpointSaveError(UserInputError):
    """A save failed for a reason the operator can fix (space, permission, quota); names the path."""


# ------------------------------------------------------------------------------- digest on write
class _DigestingFile:
    """A binary file opened for writing that hashes what is written; on close it records
    ``<path>.digest``. A seek (never done by the torch_dist writer) disables the record."""

    def __init__(self, path: str, mode: str):
        self._f = builtins.open(path, mode)
        self._path = path
        self._hash = hashlib.sha256()
        self._size = 0
        self._sequential = True

    def write(self, data) -> int:
        n = self._f.write(data)  # a blocking buffered file writes everything
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._size += view.nbytes
        return n

    def seek(self, *args):
        self._sequential = False
        return self._f.seek(*args)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._sequential:
            _write_json_durably(self._path + SIDECAR,
                                {"size": self._size, "sha256": self._hash.hexdigest()})

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._sequential = False  # a failed write: leave no digest for it
        self.close()
        return False

    def __getattr__(self, name):  # tell, fileno, flush, closed, ...
        return getattr(self._f, name)


def open_digesting(path: str) -> "_DigestingFile":
    """``open(path, "wb")`` that leaves ``<path>.digest`` on close, for :func:`write_manifest`
    (the checkpoint converters write their shards through it)."""
    return _DigestingFile(os.fspath(path), "wb")


def _digesting_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and mode == "wb" and not args and not kwargs:
        return _DigestingFile(os.fspath(file), mode)
    return builtins.open(file, mode, *args, **kwargs)


def install_digesting_writer() -> None:
    """Make megatron-core's torch_dist shard writer record a digest of every file it writes
    (idempotent; forked writer processes inherit it)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    fa.open = _digesting_open


def _write_json_durably(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with builtins.open(tmp, "w") as f:
        json.dump(obj, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_digest(path: str) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with builtins.open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def write_manifest(path: str) -> dict:
    """Rank 0 at the commit: fold the writers' sidecar digests into ``checksums.json`` (files without
    one, i.e. small metadata files, are hashed here) and remove the sidecars."""
    files = {}
    sidecars = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == MANIFEST or name.endswith(".tmp") or not os.path.isfile(full):
            continue
        if name.endswith(SIDECAR):
            sidecars.append(full)
            continue
        record = None
        if os.path.isfile(full + SIDECAR):
            with builtins.open(full + SIDECAR) as f:
                record = json.load(f)
            if record.get("size") != os.path.getsize(full):
                record = None  # written again after the digest: hash what is there
        if record is None:
            size, digest = file_digest(full)
            record = {"size": size, "sha256": digest}
        files[name] = record
    manifest = {"algorithm": "sha256", "files": files}
    _write_json_durably(os.path.join(path, MANIFEST), manifest)
    for s in sidecars:
        os.remove(s)
    return manifest


def read_manifest(path: str) -> Optional[dict]:
    full = os.path.join(path, MANIFEST)
    if not os.path.isfile(full):
        return None
    try:
        with builtins.open(full) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(f"{full} cannot be read ({e})") from e


# ---------------------------------------------------------------------------------- verify on load
_OK, _MISSING, _TRUNCATED, _SIZE, _DIGEST = 0, 1, 2, 3, 4


def _check_file(full: str, record: dict) -> int:
    if not os.path.isfile(full):
        return _MISSING
    size = os.path.getsize(full)
    if size < record["size"]:
        return _TRUNCATED
    if size != record["size"]:
        return _SIZE
    return _OK if file_digest(full)[1] == record["sha256"] else _DIGEST


def verify_checkpoint(path: str) -> list[str]:
    """Collective (every rank): check each file of ``path`` listed in its manifest, the files split
    over the ranks so each is read once. Returns the problems (``file: what``), the same list on every
    rank; empty when all match or when the checkpoint predates digests."""
    manifest = read_manifest(path)
    if manifest is None:
        return []
    names = sorted(manifest["files"])
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    codes = torch.zeros(max(len(names), 1), dtype=torch.int32)
    for i in range(rank, len(names), world):
        codes[i] = _check_file(os.path.join(path, names[i]), manifest["files"][names[i]])
    if dist.is_initialized() and world > 1:
        codes = collectives.all_reduce(codes, op=dist.ReduceOp.MAX)
    what = {_MISSING: "missing", _TRUNCATED: "truncated", _SIZE: "size differs from the recorded one",
            _DIGEST: "content does not match its SHA-256 digest"}
    problems = []
    for i, name in enumerate(names):
        code = int(codes[i])
        if code:
            rec = manifest["files"][name]
            full = os.path.join(path, name)
            detail = what[code]
            if code in (_TRUNCATED, _SIZE) and os.path.isfile(full):
                detail += f" ({os.path.getsize(full)} bytes, {rec['size']} recorded)"
            problems.append(f"{full}: {detail}")
    return problems


# ------------------------------------------------------------------ completeness and safe removal
def is_complete(path: str) -> bool:
    """A directory holds a complete checkpoint: its commit wrote the manifest (or, for checkpoints
    older than digests, the run config and megatron's ``.metadata``)."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return True
    return (os.path.isfile(os.path.join(path, "run_config.yaml"))
            and os.path.isfile(os.path.join(path, ".metadata")))


def set_aside(path: str, why: str) -> str:
    """Rename a checkpoint directory out of the ``iter_*`` namespace instead of deleting it."""
    target = f"{path}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(path, target)
    return target


def clear_for_save(path: str, iteration: int, committed: Optional[int]) -> Optional[str]:
    """Make room for a new save of ``iteration`` at ``path`` (rank 0). Removes only an incomplete
    leftover newer than the tracker; a complete checkpoint there is set aside (returned); a directory
    at or below the tracker's iteration is never touched: that save is refused."""
    if not os.path.exists(path):
        return None
    if committed is not None and iteration <= committed:
        raise CheckpointSaveError(
            f"refusing to save iteration {iteration} into {path}: the checkpoint directory's tracker "
            f"already commits iteration {committed}, and committed checkpoints are never overwritten. "
            "Use a new checkpoint.save directory, or resume from this one (checkpoint.load unset)"
        )
    if is_complete(path):
        return set_aside(path, "uncommitted")
    shutil.rmtree(path)
    return None


# ------------------------------------------------------------------------------------ save errors
def free_bytes(path: str) -> int:
    """Bytes available to this user on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def state_bytes(sharded_state: dict) -> int:
    """Bytes of tensor data this rank writes (main replicas of sharded tensors), an estimate."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    total = 0
    for v in nested_values(sharded_state):
        if isinstance(v, ShardedTensor) and v.data is not None:
            if all(r == 0 for r in (v.replica_id if isinstance(v.replica_id, tuple) else (v.replica_id,))):
                total += v.data.numel() * v.data.element_size()
        elif torch.is_tensor(v):
            total += v.numel() * v.element_size()
    return total


def _errnos(exc: BaseException) -> set:
    seen, out = set(), set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            out.add(exc.errno)
        out |= {e.errno for e in getattr(exc, "args", ()) if isinstance(e, OSError) and e.errno}
        text = str(exc)
        for code, marker in ((errno.ENOSPC, "No space left"), (errno.EDQUOT, "Disk quota"),
                             (errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file")):
            if marker in text:
                out.add(code)
        exc = exc.__cause__ or exc.__context__
    return out


def describe_save_error(exc: BaseException, path: str, needed: int) -> Exception:
    """A :class:`CheckpointSaveError` naming the cause (no space, quota, permission) and the path of a
    failed save, or ``exc`` itself when the cause is not one of those."""
    codes = _errnos(exc)
    where = path if os.path.exists(path) else os.path.dirname(path)
    try:
        free = free_bytes(where)
    except OSError:
        free = None
    keep = ("The previous committed checkpoint is untouched; the half-written directory is ignored "
            "on resume.")
    if errno.ENOSPC in codes or (free is not None and free < needed):
        return CheckpointSaveError(
            f"no space left on the file system holding {path}: this rank's part of the checkpoint "
            f"needs about {needed:,} bytes, {'?' if free is None else f'{free:,}'} are free. Free space (lower checkpoint.keep_last, "
            f"delete old iter_* directories) or point checkpoint.save elsewhere. {keep}")
    if errno.EDQUOT in codes:
        return CheckpointSaveError(
            f"disk quota exceeded while saving {path} (about {needed:,} bytes for this rank): raise "
            f"the quota of the user/project on that file system or save elsewhere. {keep}")
    if codes & {errno.EACCES, errno.EPERM, errno.EROFS} or not os.access(where, os.W_OK):
        return CheckpointSaveError(
            f"permission denied writing {path} ({'read-only file system' if errno.EROFS in codes else 'no write permission'}"
            f" for uid {os.getuid()}): fix the directory's permissions or point checkpoint.save "
            f"elsewhere. {keep}")
    return exc


def check_space(path: str, needed: int) -> Optional[str]:
    """The no-space message when the file system holding ``path`` has less than ``needed`` bytes
    (the whole checkpoint's tensor data, all ranks) free, else None."""
    free = free_bytes(path)
    if free < needed:
        return (f"no space left on the file system holding {path}: the checkpoint needs about "
                f"{needed:,} bytes, {free:,} are free. Free space (lower checkpoint.keep_last, delete "
                "old iter_* directories) or point checkpoint.save elsewhere. The previous committed "
                "checkpoint is untouched.")
    return None
