"""One test per CPU/gloo adaptation (longcat_megatron.cpu_compat) and per no-TE fix
(longcat_megatron.mcore_fixes). Each runs in fresh processes so the pytest process stays clean."""

import pytest

from tests.harness import run_distributed


def _init(world_tp=1):
    from longcat_megatron import runtime

    return runtime.initialize(tensor=world_tp)


def _current_device_and_streams():
    import torch

    _init()
    assert torch.cuda.current_device() == torch.device("cpu")
    # megatron's rotary embedding allocates on torch.cuda.current_device()
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    freqs = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)(16)
    assert freqs.device.type == "cpu" and freqs.shape[0] == 16
    s = torch.cuda.current_stream()
    s.wait_stream(torch.cuda.Stream())
    e = torch.cuda.Event()
    e.record()
    torch.cuda.synchronize()
    return True


def _device_literals_and_type():
    import torch

    _init()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.empty(3, pin_memory=True).device.type == "cpu"
    x = torch.zeros(2)
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.type(torch.float64).dtype == torch.float64  # conversion still works
    return True


def _rng_tracker():
    import torch
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    _init(world_tp=2)
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked stream advanced
    return a.tolist()


def _split_sizes_and_uneven_gather():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils

    _init(world_tp=2)
    assert hasattr(moe_utils.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True), "dtype")
    rank = dist.get_rank()
    sizes = [2, 3]
    x = torch.full((sizes[rank], 4), float(rank + 1))
    group = ps.get_tensor_model_parallel_group()
    gathered = mappings._gather_along_first_dim(x, group, output_split_sizes=sizes)
    assert gathered.shape == (5, 4)
    assert torch.equal(gathered[:2], torch.ones(2, 4)) and torch.equal(gathered[2:], 2 * torch.ones(3, 4))
    full = torch.arange(20, dtype=torch.float32).reshape(5, 4) * (rank + 1)
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
    expect = (torch.arange(20, dtype=torch.float32).reshape(5, 4) * 3)
    assert torch.equal(scattered, expect[:2] if rank == 0 else expect[2:])
    return True


def _no_te_fixes():
    import torch
    import megatron.core.transformer.multi_latent_attention as mla
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    _init(world_tp=1)
    assert moe_utils.te_general_gemm is None
    assert mla.HAVE_TE is False
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                            use_cpu_initialization=True, normalization="RMSNorm")
    attn = DotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                               attention_type="self", k_channels=12, v_channels=6)
    assert attn.hidden_size_per_partition == 12
    sp_cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                               use_cpu_initialization=True, normalization="RMSNorm",
                               sequence_parallel=True, tensor_model_parallel_size=2)
    norm = WrappedTorchNorm(sp_cfg, 16)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.weight.sequence_parallel is True
    return True


def test_current_device_and_streams():
    assert run_distributed(_current_device_and_streams, 1) == [True]


def test_cuda_device_literals_and_tensor_type():
    assert run_distributed(_device_literals_and_type, 1) == [True]


def test_rng_tracker_separates_tensor_parallel_streams():
    a, b = run_distributed(_rng_tracker, 2)
    assert a != b  # TP ranks draw from different model-parallel streams


def test_split_sizes_and_uneven_collectives_on_gloo():
    assert run_distributed(_split_sizes_and_uneven_gather, 2) == [True, True]


def test_no_te_fixes():
    assert run_distributed(_no_te_fixes, 1) == [True]


def test_shims_only_without_cuda(monkeypatch):
    import torch

    from longcat_megatron import cpu_compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LONGCAT_FORCE_CPU", raising=False)
    assert cpu_compat.needed() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu_compat.needed() is True


@pytest.mark.parametrize("world,sizes,match", [
    (4, dict(tensor=3), "not divisible by tensor"),
    (4, dict(tensor=2, expert=4), "expert parallel size 4"),
    (4, dict(expert=2, num_experts=3), "does not divide the number of experts 3"),
    (4, dict(tensor=2, expert=2, expert_tensor=4), "expert tensor size 4"),
])
def test_bad_parallel_sizes_name_the_sizes(world, sizes, match):
    from longcat_megatron.runtime import ParallelSizeError, resolve_layout

    with pytest.raises(ParallelSizeError, match=match):
        resolve_layout(world, **sizes)
