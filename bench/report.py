"""Shared by the bench scripts: the machine line and appending a dated section to docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "docs", "benchmarks.md")


def machine() -> str:
    """One line describing this machine and the torch build."""
    import torch

    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def append_section(title: str, body: str, path: str = BENCHMARKS_MD) -> str:
    """Append ``## title (date)`` + machine line + ``body`` to docs/benchmarks.md; returns the path."""
    today = datetime.date.today().isoformat()
    text = f"\n## {title} ({today})\n\nMachine: {machine()}.\n\n{body.rstrip()}\n"
    with open(path, "a") as f:
        f.write(text)
    return path
