"""Which global sample indices each data-parallel rank reads, micro-batch by micro-batch.

Same order as Megatron-LM's ``MegatronPretrainingSampler``: samples are consumed in global order
``consumed, consumed+1, ...``; every step takes ``micro_batch_size * dp_size`` consecutive samples and
rank ``r`` gets the ``r``-th slice of ``micro_batch_size``. The global order therefore does not depend
on ``dp_size``, and resuming is O(1): start at ``consumed_samples``.
"""

from __future__ import annotations

from typing import Iterator

from longcat_megatron.errors import UserInputError


class SamplerError(UserInputError):
    """Batch sizes, ranks or the resume position are inconsistent; the message says which."""


def check_batch_layout(micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int) -> None:
    """Raise :class:`SamplerError` unless the batch sizes and ranks fit together."""
    if micro_batch_size < 1 or dp_size < 1:
        raise SamplerError(f"micro_batch_size={micro_batch_size} and dp_size={dp_size} must be >= 1")
    if not 0 <= dp_rank < dp_size:
        raise SamplerError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
    if global_batch_size % (micro_batch_size * dp_size) != 0:
        raise SamplerError(
            f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size * dp_size = "
            f"{micro_batch_size} * {dp_size}; change train.global_batch_size or train.micro_batch_size"
        )


def micro_batch_indices(
    *, start: int, stop: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> Iterator[range]:
    """Yield this rank's global sample indices per micro-batch for samples ``[start, stop)``.

    A trailing chunk smaller than ``micro_batch_size * dp_size`` is dropped (as Megatron does).
    """
    if start % (micro_batch_size * dp_size) != 0:
        raise SamplerError(
            f"resume position {start} samples is not a multiple of micro_batch_size * dp_size = "
            f"{micro_batch_size * dp_size}; a checkpoint taken after a full global batch always is"
        )
    step = micro_batch_size * dp_size
    for chunk in range(start, stop - step + 1, step):
        first = chunk + dp_rank * micro_batch_size
        yield range(first, first + micro_batch_size)
