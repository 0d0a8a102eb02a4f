"""Checkpoint conversion between megatron-core ``torch_dist`` checkpoints and Hugging Face directories.

Entry points: ``python -m ckpt_convert.to_hf`` and ``python -m ckpt_convert.from_hf`` (see
``docs/convert.md``). Every reader and writer here streams: one tensor (or one slice of a stacked
tensor) is in memory at a time.
"""


from longcat_megatron.errors import UserInputError


class ConversionError(UserInputError):
    """Bad input for a conversion; the message names the file/key and the fix."""


def tensor_nbytes(shape: tuple, dtype) -> int:
    """Bytes of a dense tensor of ``shape`` and torch ``dtype``."""
    import torch

    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def default_workers() -> int:
    """Threads for conversion I/O (``--workers`` default): the CPU count, at most 8."""
    import os

    return max(1, min(8, os.cpu_count() or 1))
