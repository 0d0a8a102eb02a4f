"""Model-growth initialization (ckpt_convert.grow, launch/grow.sh).

A 2-layer tiny LongCat (MLA, experts, zero experts, budget controller, MTP) trained 2 steps at
TP2 x EP2 on 4 gloo ranks is grown offline x2: through the launcher's GROW_FROM (stack) and in this
process (interleave). Layer j of the grown checkpoint is bitwise the source layer the order names
(weights, fp32 main copies, Adam moments, expert bias, controller state); everything else once;
iteration, schedule and data position kept. At TP1 x EP1 x DP2 the grown checkpoint loads (model
and optimizer, re-saved and compared), trains, and a save/resume in the middle is bitwise the
uninterrupted run. Bad input is a clear error that writes nothing.
"""

import os
import shutil
import subprocess

import pytest
import torch

from ckpt_convert import ConversionError
from tests.harness import run_distributed
from tests.train_utils import ROOT

TINY = os.path.join(ROOT, "configs", "tiny_longcat.yaml")
SHAPE = ["model.num_layers=2", "data.seq_length=16", "train.global_batch_size=4",
         "train.micro_batch_size=2", "parallel.distributed_optimizer=true", "logging.progress=false"]
TP1 = ["parallel.tensor=1", "parallel.expert=1", "parallel.sequence_parallel=false"]


def _train_source(root: str) -> dict:
    from tests.train_utils import run_training

    return run_training(SHAPE + ["parallel.tensor=2", "parallel.expert=2", "parallel.sequence_parallel=true",
                                 "train.train_iters=2", f"checkpoint.save={root}"], config=TINY)["losses"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("grow") / "half")
    run_distributed(_train_source, 4, root, timeout=400)
    return root


def _launcher_grow(ckpt_dir: str, grow_from: str) -> list:
    """launch/grow.sh's lc_grow_stage as a stage script calls it; the overrides it adds."""
    script = (f'source "{ROOT}/launch/common.sh"; PYTHON=python; LC_CKPT_DIR="$1"; GROW_FROM="$2"; '
              'STAGE_OVERRIDES=(); lc_grow_stage ""; printf "override %s\\n" "${STAGE_OVERRIDES[@]}"')
    out = subprocess.run(["bash", "-c", script, "grow", ckpt_dir, grow_from], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0, out.stderr
    return [line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.startswith("override ")]


@pytest.fixture(scope="module")
def grown(source):
    """{order: grown root}: stack through the launcher, interleave here."""
    from ckpt_convert.grow import grow

    base = os.path.dirname(source)
    stage = os.path.join(base, "full")
    overrides = _launcher_grow(stage, source)
    interleave = os.path.join(base, "interleave")
    grow(source, interleave, 2, "interleave", workers=2)
    return {"stack": os.path.join(stage, "grown"), "interleave": interleave, "overrides": overrides,
            "stage": stage}


def _reader(root):
    from ckpt_convert.dcp_reader import TorchDistReader, resolve_checkpoint_dir

    return TorchDistReader(resolve_checkpoint_dir(root)[0])


def _assert_layers_copied(src_root: str, out_root: str, order: str, objects: bool = True) -> None:
    """Every tensor (and object) of the 4-layer ``out_root`` is bitwise the 2-layer source's under
    the key ``order`` maps it from; the key set is exactly the source's, each layer's keys once per
    target layer."""
    from ckpt_convert.grow import LAYER_KEY, source_layer, target_layers

    src, out = _reader(src_root), _reader(out_root)

    def origin(key):
        m = LAYER_KEY.match(key)
        return key if m is None else f"{m['pre']}{source_layer(int(m['layer']), 2, 2, order)}{m['rest']}"

    def copies(key):
        m = LAYER_KEY.match(key)
        if m is None:
            return {key}
        return {f"{m['pre']}{j}{m['rest']}" for j in target_layers(int(m["layer"]), 2, 2, order)}

    assert set(out.tensors) == set().union(*map(copies, src.tensors))
    kinds = set()
    for key in out.tensors:
        a, b = out.read(key), src.read(origin(key))
        assert a.dtype == b.dtype and torch.equal(a, b), key
        if LAYER_KEY.match(key):
            kinds |= {k for k in ("exp_avg.", "exp_avg_sq.", "param.", "expert_bias", "controller.") if k in key}
    assert kinds == {"exp_avg.", "exp_avg_sq.", "param.", "expert_bias", "controller."}
    if objects:  # megatron's _extra_state and the RNG states
        assert set(out.objects()) == set().union(*map(copies, src.objects()))
        for key in out.objects():
            assert out.read_bytes(key) == src.read_bytes(origin(key)), key


def test_layer_copies_are_bitwise_for_stack_and_interleave(source, grown):
    from longcat_megatron.training.checkpoint_integrity import verify_checkpoint

    src = _reader(source)
    w = "decoder.layers.{}.self_attention_0.linear_proj.weight"
    m = "optimizer.state.exp_avg.decoder.layers.{}.mlp.experts.experts.linear_fc1.weight"
    assert not torch.equal(src.read(w.format(0)), src.read(w.format(1)))  # the orders are told apart
    assert not torch.equal(src.read(m.format(0)), src.read(m.format(1)))
    for order, layout in (("stack", (0, 1, 0, 1)), ("interleave", (0, 0, 1, 1))):
        out = _reader(grown[order])
        for j, i in enumerate(layout):  # layer j of the grown model is layer i of the source
            assert torch.equal(out.read(w.format(j)), src.read(w.format(i))), (order, j)
            assert torch.equal(out.read(m.format(j)), src.read(m.format(i))), (order, j)
        _assert_layers_copied(source, grown[order], order)
        assert verify_checkpoint(out.path) == []


def test_grown_checkpoint_keeps_iteration_schedule_and_data_position(source, grown):
    import yaml

    src, out = _reader(source), _reader(grown["stack"])
    a = torch.load(os.path.join(src.path, "common.pt"), weights_only=False)
    b = torch.load(os.path.join(out.path, "common.pt"), weights_only=False)
    assert b["iteration"] == a["iteration"] == 2 and os.path.basename(out.path) == "iter_0000002"
    for key in ("consumed_train_samples", "opt_param_scheduler", "schedule", "data_fingerprint",
                "optimizer", "optimizer_format"):
        assert b[key] == a[key], key
    assert b["extra"]["grown_from"] == {"source": src.path, "iteration": 2, "factor": 2,
                                        "order": "stack", "num_layers": [2, 4]}
    cfg_a, cfg_b = (yaml.safe_load(open(os.path.join(p, "run_config.yaml"))) for p in (src.path, out.path))
    assert cfg_b["model"].pop("num_layers") == 4 and cfg_a["model"].pop("num_layers") == 2
    assert cfg_a == cfg_b
    assert open(os.path.join(grown["stack"], "latest_checkpointed_iteration.txt")).read().strip() == "2"


def test_stage_dry_run_with_grow_from_shows_the_grown_model(source, grown):
    """launch/pretrain.sh --dry-run GROW_FROM=... once the growth is done (a requeue, a resubmission):
    not grown again, the grown depth and its parameter count in the plan."""
    from longcat_megatron.config import load_config
    from longcat_megatron.planning import _count, count_parameters

    assert grown["overrides"] == ["model.num_layers=4", f"checkpoint.load={grown['stack']}"]
    stamp = os.path.getmtime(os.path.join(grown["stack"], "iter_0000002", "common.pt"))
    env = dict(os.environ, LONGCAT_ROOT=ROOT, LONGCAT_CPU="1", NPROC_PER_NODE="2", CONFIG=TINY,
               TRAIN_ITERS="4", CKPT_DIR=grown["stage"], GROW_FROM=source, TP="1", EP="1",
               SEQUENCE_PARALLEL="false", PYTHONPATH=ROOT)
    env.pop("SLURM_JOB_ID", None)
    out = subprocess.run(["bash", "launch/pretrain.sh", "--dry-run", *SHAPE[1:]], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert os.path.getmtime(os.path.join(grown["stack"], "iter_0000002", "common.pt")) == stamp
    half, full = (count_parameters(load_config(TINY, SHAPE + TP1 + [f"model.num_layers={n}"])).total
                  for n in (2, 4))
    assert full > half and f"model.arch=longcat: {_count(full)} parameters" in text
    assert "model.num_layers = 2  [overridden: 4]" in text and f"checkpoint.load={grown['stack']}" in text


def _load_resave_train_resume(grown_root: str, tmp: str) -> dict:
    """At TP1 x EP1 x DP2: load the grown checkpoint (model + optimizer) and save it again; then
    train it 2 steps straight, and 1 + save + resume + 1."""
    from longcat_megatron import runtime
    from longcat_megatron.config import load_config, save_config
    from longcat_megatron.training import checkpointing as ckpt
    from longcat_megatron.training.setup import build_model, build_optimizer, build_scheduler, unwrap
    from tests.train_utils import run_training

    base = SHAPE + TP1 + ["model.num_layers=4", "train.train_iters=4", f"checkpoint.load={grown_root}"]
    cfg = load_config(TINY, base)
    layout = runtime.initialize(num_experts=cfg.model.num_experts, seed=cfg.train.seed)
    model = build_model(cfg, layout)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    loaded, state = ckpt.load_checkpoint(grown_root, model, optimizer, scheduler)
    assert loaded.optimizer_restored and loaded.scheduler_restored
    sd = {k: v for k, v in unwrap(model[0]).state_dict().items() if torch.is_tensor(v)}
    same = all(torch.equal(v, sd[k.replace("layers.2.", "layers.0.")]) for k, v in sd.items() if "layers.2." in k)
    ckpt.save_checkpoint(os.path.join(tmp, "resaved"), model, optimizer, scheduler, state,
                         config_yaml_writer=lambda p: save_config(cfg, p))
    straight = run_training(base + [f"checkpoint.save={tmp}/straight"], config=TINY)
    first = run_training(base + [f"checkpoint.save={tmp}/split", "train.exit_interval=3"], config=TINY)
    second = run_training(base + [f"checkpoint.save={tmp}/split"], config=TINY)
    return {"loaded": (state.iteration, state.consumed_train_samples), "layer2_is_layer0": same,
            "straight": straight, "first": first, "second": second}


def test_grown_checkpoint_loads_at_another_layout_trains_and_resumes_bitwise(source, grown, tmp_path):
    r = run_distributed(_load_resave_train_resume, 2, grown["stack"], str(tmp_path), timeout=400)[0]
    assert r["loaded"] == (2, 8) and r["layer2_is_layer0"]
    # loaded at TP1 x EP1 (one optimizer instead of the expert one) and saved again: still the
    # source's layers, moments included
    _assert_layers_copied(source, str(tmp_path / "resaved"), "stack", objects=False)
    straight, first, second = r["straight"], r["first"], r["second"]
    assert straight["resumed_from"] == first["resumed_from"] == 2 and second["resumed_from"] == 3
    assert sorted(straight["losses"]) == [3, 4] and all(v == v for v in straight["losses"].values())
    assert first["losses"][3] == straight["losses"][3] and second["losses"][4] == straight["losses"][4]
    assert straight["weights"].keys() == second["weights"].keys()
    for key, value in straight["weights"].items():
        assert torch.equal(value, second["weights"][key]), key


def _partials(parent: str) -> list:
    return [n for n in os.listdir(parent) if ".partial-" in n]


def test_bad_input_is_a_clear_error_and_writes_nothing(source, tmp_path, capsys):
    from ckpt_convert.grow import grow, main

    target = str(tmp_path / "out")

    def refused(match, load=source, save=target, **kw):
        existed = os.path.exists(save)
        with pytest.raises(ConversionError, match=match):
            grow(load, save, **kw)
        assert os.path.exists(save) == existed and _partials(os.path.dirname(save)) == []

    # a factor whose depth the pipeline layout cannot split evenly
    refused(r"--factor 3 gives 2 x 3 = 6 layers.*parallel.pipeline=4 does not divide", factor=3, pipeline=4)
    refused(r"virtual_pipeline", factor=2, pipeline=2, virtual_pipeline=4)
    refused(r"--factor 1: a growth multiplies", factor=1)
    # not a committed checkpoint: an iteration directory, a run without its tracker, a later iteration
    refused(r"is an iteration directory", load=os.path.join(source, "iter_0000002"))
    uncommitted = str(tmp_path / "uncommitted")
    shutil.copytree(source, uncommitted)
    os.remove(os.path.join(uncommitted, "latest_checkpointed_iteration.txt"))
    refused(r"holds no committed checkpoint", load=uncommitted)
    refused(r"--iteration 5 .* is not committed \(the tracker names 2\)", iteration=5)
    # damaged: a flipped byte in a shard (found by the checksums)
    damaged = str(tmp_path / "damaged")
    shutil.copytree(source, damaged)
    shard = os.path.join(damaged, "iter_0000002", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    refused(r"__0_0.distcp: content does not match", load=damaged)
    # a target that holds checkpoints (or anything) is never written to
    before = sorted(os.listdir(source))
    refused(r"holds checkpoints \(iterations \[2\], latest_checkpointed_iteration.txt\)", save=source)
    assert sorted(os.listdir(source)) == before
    os.makedirs(target)
    open(os.path.join(target, "notes.txt"), "w").close()
    refused(r"is not empty", save=target)
    assert os.listdir(target) == ["notes.txt"]
    # the CLI: exit 2 and one line naming the problem
    assert main(["--load", uncommitted, "--save", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no committed checkpoint" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x")


def test_stacked_layers_grow_slice_by_slice(tmp_path, monkeypatch):
    """megatron's own TransformerBlock (model.arch=gpt) stacks its layers on a leading axis: a
    synthetic 2-layer checkpoint of that form grown x3, in blocks smaller than a layer."""
    import dataclasses

    from ckpt_convert import grow as g
    from ckpt_convert.dcp_reader import TorchDistReader
    from ckpt_convert.dcp_writer import DCPWriter, commit_checkpoint
    from longcat_megatron.config import RunConfig

    root = tmp_path / "stacked"
    it = root / "iter_0000005"
    it.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {"decoder.layers.mlp.linear_fc1.weight": torch.randn(2, 3, 4, generator=gen),
               "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight": torch.randn(2, 3, 4, generator=gen),
               "decoder.layers.mlp.experts.linear_fc2.weight": torch.randn(2, 4, 2, 2, generator=gen),
               "embedding.word_embeddings.weight": torch.randn(5, 4, generator=gen)}
    objects = {"decoder.layers.mlp.linear_fc1._extra_state/shard_0_2": b"a0",
               "decoder.layers.mlp.linear_fc1._extra_state/shard_1_2": b"a1",
               "decoder.layers.mlp.experts._extra_state/shard_1.3_2.4": b"e13", "rng_state/shard_0_1": b"r"}
    writer = DCPWriter(str(it))
    for key, t in tensors.items():
        writer.add_chunk(key, t.shape, (0,) * t.dim(), t)
    for key, data in objects.items():
        writer.add_bytes(key, data)
    writer.finish()
    open(it / "metadata.json", "w").write('{"sharded_backend": "torch_dist"}')
    torch.save({"iteration": 5, "optimizer": {}, "optimizer_format": "fully_reshardable"}, it / "common.pt")
    cfg = RunConfig()
    commit_checkpoint(str(root), 5, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=2)))

    monkeypatch.setattr(g, "BLOCK_BYTES", 16)  # several blocks per layer slice
    g.grow(str(root), str(tmp_path / "out"), 3, "stack")
    out = TorchDistReader(str(tmp_path / "out" / "iter_0000005"))
    for key, t in tensors.items():
        if key.startswith("embedding"):
            assert torch.equal(out.read(key), t)
            continue
        assert out.info(key).shape == (6,) + tuple(t.shape[1:])
        for j in range(6):
            assert torch.equal(out.read(key, (j,)), t[j % 2]), (key, j)
    names = {k: out.read_bytes(k) for k in out.objects()}
    assert names == {**{f"decoder.layers.mlp.linear_fc1._extra_state/shard_{j}_6": b"a%d" % (j % 2) for j in range(6)},
                     **{f"decoder.layers.mlp.experts._extra_state/shard_{j}.3_6.4": b"e13" for j in (1, 3, 5)},
                     "rng_state/shard_0_1": b"r"}
