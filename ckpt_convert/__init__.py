"""Checkpoint conversion between megatron-core ``torch_dist`` checkpoints and Hugging Face directories.

Entry points: ``python -m ckpt_convert.to_hf`` and ``python -m ckpt_convert.from_hf`` (see
``docs/convert.md``). Every reader and writer here streams: one tensor (or one slice of a stacked
tensor) is in memory at a time.
"""


class ConversionError(RuntimeError):
    """Bad input for a conversion; the message names the file/key and the fix."""
