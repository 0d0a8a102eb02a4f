"""Dataset manifests: one file naming the many indexed datasets of one corpus.

``python -m data_tools.preprocess --finalize`` (after a preprocessing job array, docs/data.md) writes
``PREFIX.manifest.json``: the corpus's ``.bin/.idx`` prefixes in input order with their document and
token counts. ``data.paths`` accepts it wherever it accepts a prefix:

* ``[data/web.manifest.json]``: its datasets, blended by size as megatron-core does for a list of
  prefixes without weights (= the datasets of one corpus, as if concatenated);
* ``[0.7, data/web.manifest.json, 0.3, data/code]``: weight 0.7 shared by its datasets in
  proportion to their tokens.

Prefixes in the file are relative to its directory, so a moved data directory still works.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from longcat_megatron.errors import UserInputError

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "longcat-megatron/manifest-1"


class ManifestError(UserInputError):
    """A manifest in data.paths is missing or unreadable; the message names it and the fix."""


def is_manifest(path) -> bool:
    return isinstance(path, str) and path.endswith(MANIFEST_SUFFIX)


def read_manifest(path: str) -> list[tuple[str, int]]:
    """(absolute prefix, tokens) of every dataset a manifest names, in its order."""
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"data.paths: manifest '{path}' does not exist. Write it with `python -m "
                            "data_tools.preprocess --finalize ...` (docs/data.md), or fix the path.") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"data.paths: manifest '{path}' is unreadable ({exc}); rewrite it with "
                            "`python -m data_tools.preprocess --finalize ...`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or \
            not isinstance(manifest.get("datasets"), list) or not manifest["datasets"]:
        raise ManifestError(f"data.paths: '{path}' is not a dataset manifest of {MANIFEST_FORMAT} with at "
                            "least one dataset; rewrite it with `python -m data_tools.preprocess --finalize`")
    base = os.path.dirname(os.path.abspath(path))
    return [(os.path.normpath(os.path.join(base, d["prefix"])), int(d["tokens"])) for d in manifest["datasets"]]


def expand_paths(paths: list) -> tuple[list[str], Optional[list[float]]]:
    """(prefixes, weights or None) of ``data.paths`` with every manifest replaced by its datasets.

    ``paths`` must already be well-formed (all prefixes, or weight/prefix pairs)."""
    weighted = any(not isinstance(p, str) for p in paths)
    if not weighted:
        out: list[str] = []
        for p in paths:
            out.extend(prefix for prefix, _ in read_manifest(p)) if is_manifest(p) else out.append(p)
        return out, None
    prefixes: list[str] = []
    weights: list[float] = []
    for w, p in zip(paths[0::2], paths[1::2]):
        if not is_manifest(p):
            prefixes.append(p)
            weights.append(float(w))
            continue
        entries = read_manifest(p)
        total = sum(t for _, t in entries) or 1
        for prefix, tokens in entries:
            prefixes.append(prefix)
            weights.append(float(w) * tokens / total)
    return prefixes, weights
