"""The README's first command, end to end on a small budget: data -> TP=2 training -> checkpoint ->
HF export (for LongCat configs); a second run with more steps resumes from the last checkpoint."""

import os
import subprocess

from tests.train_utils import ROOT


def _quickstart(run_dir, steps):
    env = dict(os.environ, RUN=str(run_dir), STEPS=str(steps))
    return subprocess.run(["bash", "launch/quickstart.sh", "checkpoint.save_interval=0"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


def test_quickstart_trains_saves_and_resumes(tmp_path):
    run = tmp_path / "qs"
    first = _quickstart(run, 12)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert (run / "data" / "corpus.bin").is_file()
    assert "loss" in first.stdout and "checkpoints :" in first.stdout
    assert "verify OK" in first.stdout and (run / "hf" / "config.json").is_file()
    second = _quickstart(run, 16)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at iteration 12" in second.stdout
    assert "already built" in second.stdout  # data preparation is idempotent
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "16"
