"""Parallel sizes as the model sees them (1 when megatron's parallel state is not initialised)."""

from __future__ import annotations

from megatron.core import parallel_state as ps


def tp_size() -> int:
    """Tensor-parallel world size."""
    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def sequence_parallel_size(tf_config) -> int:
    """How many ranks share one sequence under sequence parallelism (TP size, or 1 without SP)."""
    return tp_size() if tf_config.sequence_parallel else 1
