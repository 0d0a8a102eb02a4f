"""Step changes of the global batch size at token thresholds (``train.batch_schedule``).

LongCat-Flash-Lite's pretraining raised the batch at 420B tokens. A schedule is a list of entries,
each either a mapping ``{after_tokens: 420e9, global_batch_size: 2048}`` or the string
``"420B:2048"`` (tokens accept ``e`` notation and the suffixes k, M, B/G, T). A step uses the batch
of the last entry whose ``after_tokens`` the run had consumed *before* the step
(``train.global_batch_size`` before the first threshold), so the change happens at the first step
that starts at or past the threshold, and every step holds whole micro-batches.

The data order does not depend on the batch size (samples are consumed in global order, micro-batch
by micro-batch, see :mod:`longcat_megatron.data.sampler`), so the data position after any step is
the sum of the batches so far, and resuming anywhere (before, at or after the change) is exact: the
checkpoint's consumed-sample count determines both the position and the current batch.
Unlike megatron's ``--rampup-batch-size`` (linear increments over a sample count) this is a step
schedule with explicit thresholds; megatron's ``num_microbatches_calculator`` is not used because
the loop passes the micro-batch count of each step to the schedule directly.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from longcat_megatron.errors import UserInputError

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


class BatchScheduleError(UserInputError):
    """``train.batch_schedule`` (or a token count) is malformed; the message names the entry."""


def parse_tokens(text, where: str = "token count") -> int:
    """``11e12``, ``11T``, ``420B``, ``1.5e12``, ``8000000`` -> an integer token count."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
        if not m:
            raise BatchScheduleError(f"{where}: {text!r} is not a token count (use e.g. 11e12, 11T, 420B)")
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value < 0 or not math.isfinite(value):
        raise BatchScheduleError(f"{where}: {text!r} must be a non-negative number of tokens")
    return int(round(value))


def parse(entries: Sequence, where: str = "train.batch_schedule") -> list[tuple[int, int]]:
    """``[(after_tokens, global_batch_size), ...]`` in increasing token order, validated."""
    out: list[tuple[int, int]] = []
    for i, entry in enumerate(entries or []):
        here = f"{where}[{i}]"
        if isinstance(entry, str):
            if ":" not in entry:
                raise BatchScheduleError(f"{here}: {entry!r}: write TOKENS:BATCH, e.g. '420B:2048'")
            tokens, batch = entry.rsplit(":", 1)
        elif isinstance(entry, dict):
            unknown = set(entry) - {"after_tokens", "global_batch_size"}
            if unknown or "after_tokens" not in entry or "global_batch_size" not in entry:
                raise BatchScheduleError(f"{here}: {entry!r}: use {{after_tokens: 420e9, global_batch_size: 2048}}")
            tokens, batch = entry["after_tokens"], entry["global_batch_size"]
        else:
            raise BatchScheduleError(f"{here}: {entry!r}: use 'TOKENS:BATCH' or a mapping")
        t = parse_tokens(tokens, f"{here} tokens")
        try:
            b = int(str(batch).strip())
        except ValueError:
            raise BatchScheduleError(f"{here}: global batch {batch!r} is not an integer") from None
        if b < 1 or t < 1:
            raise BatchScheduleError(f"{here}: tokens and global batch must be >= 1 (got {t}, {b})")
        if out and t <= out[-1][0]:
            raise BatchScheduleError(f"{here}: thresholds must increase ({t} after {out[-1][0]})")
        out.append((t, b))
    return out


def check(base: int, entries: Sequence, micro_batch_size: int, dp: int = 1) -> list[tuple[int, int]]:
    """Parse and check that every batch holds whole micro-batches on ``dp`` data-parallel ranks."""
    schedule = parse(entries)
    for i, (_, b) in enumerate(schedule):
        if b % (micro_batch_size * dp):
            raise BatchScheduleError(
                f"train.batch_schedule[{i}]: global batch {b} is not a multiple of micro_batch_size "
                f"({micro_batch_size}) x data-parallel size ({dp})")
    return schedule


def batch_at(consumed_samples: int, seq_length: int, base: int, schedule: Sequence[tuple[int, int]]) -> int:
    """Global batch of the step that starts after ``consumed_samples`` samples."""
    batch = base
    for tokens, b in schedule:
        if consumed_samples * seq_length >= tokens:
            batch = b
    return batch


def _segments(base: int, schedule, seq_length: int):
    """(start sample threshold, batch) pieces: the batch in force from the first step starting at
    or past the threshold."""
    yield 0, base
    for tokens, b in schedule:
        yield -(-tokens // seq_length), b  # ceil: first sample count whose tokens reach the threshold


def samples_for_iterations(iterations: int, base: int, entries: Sequence, seq_length: int) -> int:
    """Samples consumed after ``iterations`` steps (the data position)."""
    schedule = parse(entries)
    consumed, done = 0, 0
    pieces = list(_segments(base, schedule, seq_length))
    for i, (_, batch) in enumerate(pieces):
        nxt = pieces[i + 1][0] if i + 1 < len(pieces) else None
        steps = iterations - done
        if nxt is not None:
            steps = min(steps, max(0, -(-(nxt - consumed) // batch)))  # steps until the threshold is reached
        consumed += steps * batch
        done += steps
        if done >= iterations:
            break
    return consumed


def iterations_for_tokens(budget_tokens, base: int, entries: Sequence, seq_length: int) -> int:
    """Fewest steps whose tokens reach ``budget_tokens`` (accepts ``11T``, ``11e12`` ...)."""
    budget = parse_tokens(budget_tokens, "token budget")
    need = -(-budget // seq_length)  # samples
    schedule = parse(entries)
    pieces = list(_segments(base, schedule, seq_length))
    consumed, steps = 0, 0
    for i, (_, batch) in enumerate(pieces):
        nxt = pieces[i + 1][0] if i + 1 < len(pieces) else None
        limit = need if nxt is None else min(need, nxt)
        if consumed < limit:
            n = -(-(limit - consumed) // batch)
            consumed += n * batch
            steps += n
        if consumed >= need:
            break
    return steps


def main(argv=None) -> int:
    """``python -m longcat_megatron.training.batch_schedule TOKENS SEQ BATCH [TOKENS:BATCH ...]``
    prints the iterations a token budget takes (for the stage scripts)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3:
        print("usage: python -m longcat_megatron.training.batch_schedule TOKENS SEQ_LENGTH GLOBAL_BATCH "
              "[TOKENS:BATCH ...]", file=sys.stderr)
        return 2
    try:
        print(iterations_for_tokens(args[0], int(args[2]), args[3:], int(args[1])))
    except (UserInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
