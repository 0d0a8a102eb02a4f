"""A checkpoint saved with one ``model.expert_impl`` at expert tensor size 2 (TP2, ETP default)
resumes with the other implementation at ``parallel.expert_tensor=1`` (same keys; dist_checkpointing
reshards the experts). The overlaps (DDP's and ScMoE's) on == off, with save and resume, are in
tests/test_recipe_rehearsal.py with the recipes' settings.
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
