"""Collectives NCCL accepts (docs/architecture.md, "Rules that hold everywhere").

CPU has no second device, so the NCCL constraint is faked: ``dist.get_backend`` answers "nccl",
``runtime.device()`` answers the meta device, and a stand-in ``all_reduce`` records the device of the
tensor it receives (then stops the caller). Each control-plane call site must hand it a tensor on
the "accelerator"; the stop flag used to be a CPU tensor (NCCL: "No backend type associated with
device type cpu" at the end of iteration 1). The training-run audit (which call sites may talk to
torch.distributed directly, object collectives only on an explicit gloo group) rides on the bf16 run
of tests/test_bf16_router.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch


class _Reached(Exception):
    """The fake collective was reached (and has recorded what it got)."""


def test_control_plane_tensors_reach_the_accelerator_under_fake_nccl(monkeypatch):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from longcat_megatron import runtime
    from longcat_megatron.model.config import ModelConfig
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.router import ZeroExpertRouter
    from longcat_megatron.training import loop
    from longcat_megatron.training.signals import StopRequest

    cfg = ModelConfig(arch="longcat", hidden_size=16, num_attention_heads=2, num_experts=4,
                      zero_expert_num=2, moe_router_topk=2, budget_target_ffn_experts=1.0)
    router = ZeroExpertRouter(cfg, transformer_config(cfg)).train()
    router.route(torch.randn(4, 1, 16))

    seen: dict[str, str] = {}
    site = ["?"]

    def fake_all_reduce(tensor, op=None, group=None, async_op=False):
        seen[site[0]] = str(tensor.device)
        raise _Reached

    # A one-rank "NCCL" world whose accelerator is the meta device (megatron's groups faked too).
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(runtime, "device", lambda: torch.device("meta"))
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(ps, "get_data_parallel_group", lambda **kw: "dp-group")
    monkeypatch.setattr(ps, "get_tensor_and_data_parallel_group", lambda **kw: "tp-dp-group")
    calls = {
        "StopRequest.agreed": lambda: StopRequest(handle_signals=False).agreed(),
        "loop._global_loss": lambda: loop._global_loss([{"lm loss": torch.tensor([3.0, 2.0])}]),
        "router.end_step": router.end_step,
    }
    for name, call in calls.items():
        site[0] = name
        with pytest.raises(_Reached):
            call()
    assert seen == dict.fromkeys(calls, "meta"), seen


def test_init_distributed_creates_no_group_of_its_own(monkeypatch):
    """A GPU start created a gloo group over the whole world beside NCCL's (for object collectives
    only tests used): world - 1 TCP connections per rank at every start. Only the default group now."""
    import torch.distributed as dist

    from longcat_megatron import runtime

    created = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: created.append(("default", kw["backend"])))
    monkeypatch.setattr(dist, "new_group", lambda *a, **kw: created.append(("new_group", kw.get("backend"))))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: created.append(("device", index)))
    monkeypatch.delenv("LONGCAT_FORCE_CPU", raising=False)
    for name, value in dict(RANK="3", WORLD_SIZE="64", LOCAL_RANK="0", MASTER_ADDR="10.0.0.1",
                            MASTER_PORT="29501").items():
        monkeypatch.setenv(name, value)
    assert runtime.init_distributed("nccl") == (3, 64)
    assert created == [("device", 0), ("default", "nccl")], created


# ---- audit of a real training run (installed by tests/test_bf16_router.py's 2-process run) -----
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Project files allowed to call torch.distributed tensor collectives directly: the helper itself,
# the N-gram lookup's all-to-all on activations (model tensors), the CPU adaptations (CPU only).
DIRECT_CALLERS = {"longcat_megatron/collectives.py", "longcat_megatron/model/ngram_embedding.py",
                  "longcat_megatron/model/async_all_to_all.py",  # data plane: routed tokens
                  "longcat_megatron/cpu_compat.py",
                  # data plane: optimizer-state pieces between data-parallel ranks at a checkpoint
                  # save, over megatron's gloo data-parallel group (CPU tensors, as megatron's own)
                  "longcat_megatron/training/optimizer_checkpoint.py"}
TENSOR_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
              "all_to_all_single", "broadcast", "reduce", "send", "recv", "isend", "irecv")
OBJECT_OPS = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


def install_collective_audit() -> list:
    """Wrap torch.distributed's collectives; returns the list that collects
    ``(op, project caller or None, devices, on an explicit gloo group)`` per call."""
    import torch.distributed as dist

    records: list = []

    def wrap(op: str):
        original = getattr(dist, op)

        def audited(*args, **kwargs):
            caller = os.path.relpath(sys._getframe(1).f_code.co_filename, ROOT)
            project = caller if not caller.startswith("..") and "site-packages" not in caller else None
            tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)]
            # An explicit gloo group (megatron's *_gloo groups): the default group is NCCL on GPUs.
            group = kwargs.get("group")
            on_gloo = group is not None and dist.get_backend(group) == "gloo"
            records.append((op, project, sorted({str(t.device) for t in tensors}), on_gloo))
            return original(*args, **kwargs)

        setattr(dist, op, audited)

    for op in TENSOR_OPS + OBJECT_OPS:
        if hasattr(dist, op):
            wrap(op)
    return records


def check_collective_audit(records: list, device: str) -> None:
    """Every tensor on the rank's device; project code talks to torch.distributed only through
    the helper (or the allowed data-plane sites); project object collectives name a gloo group."""
    assert records, "the audit saw no collective at all"
    bad_device = [r for r in records if r[0] in TENSOR_OPS and set(r[2]) - {device}]
    assert not bad_device, bad_device
    direct = {r[1] for r in records if r[1] is not None and r[0] in TENSOR_OPS} - DIRECT_CALLERS
    assert not direct, f"project code calls torch.distributed collectives directly: {direct}"
    objects = [r for r in records if r[1] is not None and r[0] in OBJECT_OPS and not r[3]]
    assert not objects, f"object collectives not on an explicit gloo group: {objects}"
    assert any(r[1] == "longcat_megatron/collectives.py" for r in records)
