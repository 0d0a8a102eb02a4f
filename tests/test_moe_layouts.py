"""Training-level checks of the MoE execution choices, each as straight run vs stop-and-resume:

* a checkpoint saved with one ``model.expert_impl`` at expert tensor size 2 (TP2, ETP default)
  resumes with the other implementation at ``parallel.expert_tensor=1`` (same keys; dist_checkpointing
  reshards the experts);
* megatron's ``overlap_grad_reduce`` / ``overlap_param_gather`` and the ScMoE all-to-all overlap on
  (EP2, alltoall dispatcher, 2 micro-batches) train exactly as with all overlap off, including a
  save and resume with them on.
"""

from tests.harness import run_distributed
from tests.train_utils import ROOT, run_training

TINY_LONGCAT = f"{ROOT}/configs/tiny_longcat.yaml"
BASE = ["train.train_iters=4", "model.mtp_num_layers=0", "schedule.warmup_iters=1"]


def _straight_and_resumed(straight: list, first: list, second: list, ckpt: str):
    """Train 4 iterations with ``straight``; train ``first`` to 2 and save; resume with ``second``.
    All three in the same processes (one start-up)."""
    def train(overrides):
        return run_training(BASE + overrides, TINY_LONGCAT)

    a = train(straight)
    train(first + [f"checkpoint.save={ckpt}", "train.exit_interval=2"])
    return a, train(second + [f"checkpoint.save={ckpt}"])


def _close(resumed: dict, straight: dict, rtol: float):
    assert resumed["resumed_from"] == 2
    for it in (3, 4):
        a, b = straight["losses"][it], resumed["losses"][it]
        assert abs(a - b) <= rtol * abs(a), (it, a, b)


def test_checkpoint_resumes_across_expert_impl_and_expert_tensor_size(tmp_path):
    """Saved at TP2 with expert tensor size 2 (the default) and grouped experts; resumed at
    expert tensor size 1 with SequentialMLP experts."""
    tp2 = ["parallel.tensor=2", "train.global_batch_size=4", "model.expert_impl=grouped"]
    etp1 = ["parallel.tensor=2", "train.global_batch_size=4", "model.expert_impl=sequential",
            "parallel.expert_tensor=1"]
    straight, resumed = run_distributed(_straight_and_resumed, 2, tp2, tp2, etp1,
                                        str(tmp_path / "c"))[0]
    _close(resumed, straight, 1e-5)   # other layout / implementation: other rounding (~1e-7)


def test_overlap_on_equals_off(tmp_path):
    ep2 = ["parallel.tensor=1", "parallel.sequence_parallel=false", "parallel.expert=2",
           "model.moe_token_dispatcher_type=alltoall", "train.micro_batch_size=2",
           "train.global_batch_size=8"]
    off = [*ep2, "model.scmoe_overlap=false"]
    on = [*ep2, "model.scmoe_overlap=true", "parallel.overlap_grad_reduce=true",
          "parallel.overlap_param_gather=true"]
    results = run_distributed(_straight_and_resumed, 2, off, on, on, str(tmp_path / "c"))
    for straight, resumed in results:
        assert resumed["resumed_from"] == 2
        assert resumed["losses"] == {k: v for k, v in straight["losses"].items() if k > 2}
        for k, v in straight["weights"].items():
            assert (resumed["weights"][k] - v).abs().max() <= 1e-6 * v.abs().max(), k
