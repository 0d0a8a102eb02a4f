"""The multi-process harness itself: results come back per rank, failures carry the traceback."""

import pytest

from tests.harness import DistributedTestError, run_distributed


def _tp2_allreduce():
    import torch
    import torch.distributed as dist

    from longcat_megatron import runtime

    layout = runtime.initialize(tensor=2)
    x = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(x)
    return layout.data, float(x)


def _fails_on_rank_1():
    import os

    if os.environ["RANK"] == "1":
        raise RuntimeError("boom on rank one")
    return "ok"


def test_results_per_rank():
    assert run_distributed(_tp2_allreduce, 2) == [(1, 3.0), (1, 3.0)]


def test_failing_rank_traceback_reaches_test():
    with pytest.raises(DistributedTestError, match="boom on rank one"):
        run_distributed(_fails_on_rank_1, 2, timeout=60)
