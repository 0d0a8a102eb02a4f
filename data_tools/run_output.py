"""Transactional outputs: a run's files appear together, or not at all.

A run writes every file (shards, sidecars, summary, reasons file) into a private directory
``DIR/.NAME.run-<pid>-<random>/`` next to the output prefix ``DIR/NAME``, holding an exclusive
``flock`` on ``lock`` inside it while it runs. :meth:`RunOutput.commit` runs only after everything
is complete: with SIGINT/SIGTERM held back, it deletes the previous run's summary, then all its other
files of the prefix, then renames the new files into place, summary last (so old and new shards
never coexist, and a summary always describes the files beside it). Until ``commit`` the previous run's complete output is untouched; a failed
or interrupted run removes its directory (:meth:`RunOutput.abort`), and a killed one leaves a
directory whose lock is free, which the next run with the same output directory deletes on start
(as it does with the ``*.tmp-<pid>`` files of older versions). A second run writing the same prefix
while one is alive is refused.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import tempfile
from typing import Iterable

from longcat_megatron.errors import UserInputError

RUN_DIR_MARK = ".run-"
_LEGACY_TMP = re.compile(r"\.tmp-(\d+)$")


class OutputBusyError(UserInputError):
    """Another live run is writing the same output prefix."""


def output_file_pattern(name: str) -> re.Pattern:
    """Names a run of the data tools writes for prefix ``name`` (shards, mask, sidecars, summary).
    Shard numbers have 5 digits, or more from the 100,000th input file on."""
    n = re.escape(name)
    return re.compile(rf"^{n}(_loss_mask)?(\.\d{{5,}})?\.(bin|idx|meta\.json)$|^{n}\.(summary\.json|skipped\.tsv)$")


def is_run_dir_name(name: str) -> bool:
    return name.startswith(".") and RUN_DIR_MARK in name


def in_run_dir(path: str) -> bool:
    """True for files inside a run directory (a run in progress, or a killed one's leftovers) and for
    the ``*.tmp-<pid>`` files of older versions: never inputs."""
    parts = os.path.abspath(path).split(os.sep)
    return any(is_run_dir_name(p) for p in parts[:-1]) or bool(_LEGACY_TMP.search(path))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_dead_runs(directory: str) -> list[str]:
    """Delete run directories whose owner is gone and legacy ``*.tmp-<pid>`` files of dead pids."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if is_run_dir_name(name) and os.path.isdir(path):
            lock = os.path.join(path, "lock")
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                fd = None  # died before taking its lock (or is about to): judge by age
                if _age_seconds(path) < 60:
                    continue
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive
                finally:
                    os.close(fd)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        else:
            m = _LEGACY_TMP.search(name)
            if m and os.path.isfile(path) and not _pid_alive(int(m.group(1))):
                os.remove(path)
                removed.append(path)
    return removed


def _age_seconds(path: str) -> float:
    import time

    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 1e9


class RunOutput:
    """The private directory of one run writing ``output_prefix``; see the module docstring."""

    def __init__(self, output_prefix: str):
        self.final_prefix = os.path.abspath(output_prefix)
        self.directory, self.name = os.path.split(self.final_prefix)
        if not self.name:
            raise UserInputError(f"--output-prefix '{output_prefix}' names a directory; add a file name prefix")
        os.makedirs(self.directory, exist_ok=True)
        self.cleaned = clean_dead_runs(self.directory)
        for name in os.listdir(self.directory):
            if name.startswith(f".{self.name}{RUN_DIR_MARK}"):
                raise OutputBusyError(
                    f"another run is writing '{output_prefix}' right now ({os.path.join(self.directory, name)}); "
                    "wait for it to finish or stop it, or choose another --output-prefix"
                )
        self.run_dir = tempfile.mkdtemp(prefix=f".{self.name}{RUN_DIR_MARK}{os.getpid()}-", dir=self.directory)
        self._lock_fd = os.open(os.path.join(self.run_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.prefix = os.path.join(self.run_dir, self.name)  # write every output under this prefix
        self._pattern = output_file_pattern(self.name)

    def owns(self, path: str) -> bool:
        """True for this prefix's outputs and for anything inside a run directory (never inputs)."""
        path = os.path.abspath(path)
        if in_run_dir(path):
            return True
        directory, name = os.path.split(path)
        return directory == self.directory and bool(self._pattern.match(name))

    def previous_outputs(self) -> list[str]:
        """Files of an earlier run of this prefix in the output directory."""
        return sorted(os.path.join(self.directory, n) for n in os.listdir(self.directory)
                      if self._pattern.match(n) and os.path.isfile(os.path.join(self.directory, n)))

    def commit(self, keep: Iterable[str] = ()) -> list[str]:
        """Move the finished files into place (summary last); returns their final paths. Previous
        outputs listed in ``keep`` stay (e.g. the input shards ``OUT.00000.bin`` of a merge into
        ``OUT``).

        SIGINT/SIGTERM wait until it is done; every old file goes before any new one arrives, so even
        a SIGKILL in these milliseconds cannot leave old and new shards side by side.
        """
        kept = {os.path.abspath(p) for p in keep}
        new = sorted(n for n in os.listdir(self.run_dir) if self._pattern.match(n))
        summary = f"{self.name}.summary.json"
        ordered = [n for n in new if n != summary] + ([summary] if summary in new else [])
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            old = [p for p in self.previous_outputs() if p not in kept]
            old_summary = os.path.join(self.directory, summary)
            for path in sorted(old, key=lambda p: p != old_summary):  # the old summary first
                os.remove(path)
            for n in ordered:
                os.replace(os.path.join(self.run_dir, n), os.path.join(self.directory, n))
            self.abort()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return [os.path.join(self.directory, n) for n in ordered]

    def abort(self) -> None:
        """Delete the run directory (the previous output is untouched)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def final(self, path: str) -> str:
        """Where a file written in the run directory ends up after :meth:`commit`."""
        return os.path.join(self.directory, os.path.relpath(path, self.run_dir))

    def __enter__(self) -> "RunOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
