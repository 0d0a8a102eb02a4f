"""Streaming readers/writers of ckpt_convert: torch_dist reader, sharded safetensors writer, HF reader.

The torch_dist fixture is a real megatron-core checkpoint written by 2 gloo ranks at TP=2 (a tiny
GPT MoE: stacked layers, experts, TP-split matrices), so the reader is checked against the shards
each rank actually held, not against itself.
"""

import contextlib
import json
import os
import shutil

import pytest
import torch

from ckpt_convert import ConversionError
from tests.harness import run_distributed


def _save_tp2_gpt_moe(out: str):
    from megatron.core import dist_checkpointing

    from longcat_megatron import runtime
    from longcat_megatron.model.config import ModelConfig
    from longcat_megatron.model.factory import build_model_chunk, transformer_config

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                      vocab_size=128, num_experts=4, moe_ffn_hidden_size=16)
    runtime.initialize(tensor=2, num_experts=4)
    tfc = transformer_config(cfg, tensor=2, sequence_parallel=True)
    model = build_model_chunk(cfg, tfc, pre_process=True, post_process=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, out)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.fixture(scope="module")
def tp2_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp2")
    it = root / "iter_0000007"
    it.mkdir()
    shards = run_distributed(_save_tp2_gpt_moe, 2, str(it))
    (root / "latest_checkpointed_iteration.txt").write_text("7\n")
    return str(root), shards


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


# ----------------------------------------------------------------------------------- dcp reader
def test_reader_assembles_tp_shards_and_slices(tp2_ckpt):
    from ckpt_convert.dcp_reader import TorchDistReader, resolve_checkpoint_dir

    root, shards = tp2_ckpt
    path, iteration = resolve_checkpoint_dir(root)
    assert iteration == 7 and path.endswith("iter_0000007")
    r = TorchDistReader(path)
    # Vocab-parallel embedding: rows split over TP ranks.
    emb = r.read("embedding.word_embeddings.weight")
    assert torch.equal(emb, torch.cat([s["embedding.word_embeddings.weight"] for s in shards]))
    # Stacked layers: [L, ...] with the row-parallel linear_proj split along its input dim.
    proj = "decoder.layers.self_attention.linear_proj.weight"
    assert r.info(proj).shape[0] == 2
    for layer in range(2):
        want = torch.cat([s[f"decoder.layers.{layer}.self_attention.linear_proj.weight"] for s in shards], 1)
        assert torch.equal(r.read(proj, (layer,)), want)
    # Experts: [L, E, 2I, H]; megatron stores the SwiGLU fc1 as [gate (TP-split); up (TP-split)].
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    for layer, e in [(0, 0), (1, 3)]:
        local = [s[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc1.weight"] for s in shards]
        gate = torch.cat([t.chunk(2)[0] for t in local])
        up = torch.cat([t.chunk(2)[1] for t in local])
        assert torch.equal(r.read(fc1, (layer, e)), torch.cat([gate, up]))
    assert not [k for k in r.model_keys() if k.startswith("optimizer.")]


def test_reader_reads_only_the_chunks_of_a_slice(tp2_ckpt, monkeypatch):
    """Both read paths (raw ``preadv`` of the chunks' bytes, and DCP's ``torch.load`` per chunk for
    chunks not stored raw) touch only the chunks of the slice and agree."""
    from ckpt_convert.dcp_reader import TorchDistReader, resolve_checkpoint_dir

    r = TorchDistReader(resolve_checkpoint_dir(tp2_ckpt[0])[0])
    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    # Saved chunks are per (layer, expert, gate|up, TP rank): 2*4*2*2 = 32; one expert needs 4.
    assert len(r.metadata.state_dict_metadata[key].chunks) == 32
    raw_chunks = []
    original_raw = TorchDistReader._raw_chunk

    def spy_raw(self, index, dtype):
        raw_chunks.append(index)
        return original_raw(self, index, dtype)

    monkeypatch.setattr(TorchDistReader, "_raw_chunk", spy_raw)
    fast = r.read(key, (1, 2))
    assert len(set(raw_chunks)) == 4
    extents = r.region_extents(key, (1, 2, 0, 0), (1, 1, *r.info(key).shape[2:]))
    assert extents is not None and sum(e.length for e in extents) == fast.numel() * fast.element_size()

    read_bytes = []
    original = type(r._reader)._slice_file

    def spy(self, file, sinfo):
        read_bytes.append(sinfo.length)
        return original(self, file, sinfo)

    monkeypatch.setattr(type(r._reader), "_slice_file", spy)
    monkeypatch.setattr(TorchDistReader, "_raw_chunk", lambda self, index, dtype: None)
    assert r.region_extents(key, (1, 2, 0, 0), (1, 1, *r.info(key).shape[2:])) is None
    assert torch.equal(r.read(key, (1, 2)), fast)
    assert len(read_bytes) == 4


def test_region_extents_match_generic_reads(tp2_ckpt):
    """Raw byte runs of sub-regions (rows, columns: many runs; across TP chunks) read the same values
    as DCP's generic reader."""
    from ckpt_convert.dcp_reader import TorchDistReader, read_extents, resolve_checkpoint_dir

    r = TorchDistReader(resolve_checkpoint_dir(tp2_ckpt[0])[0])
    regions = [("embedding.word_embeddings.weight", (3, 0), (100, 32)),
               ("embedding.word_embeddings.weight", (0, 5), (128, 20)),
               ("decoder.layers.self_attention.linear_proj.weight", (1, 0, 3), (1, 32, 20)),
               ("decoder.layers.mlp.experts.experts.linear_fc1.weight", (0, 1, 4, 0), (2, 2, 20, 32))]
    for key, offsets, sizes in regions:
        extents = r.region_extents(key, offsets, sizes)
        assert extents is not None, key
        fast = torch.empty(sizes, dtype=r.info(key).dtype)
        read_extents(extents, fast)
        slow = torch.empty(sizes, dtype=r.info(key).dtype)
        planner = r._plan(key, offsets, sizes, slow)
        r._reader.read_data(r._reader.prepare_local_plan(planner.plan), planner).wait()
        assert torch.equal(fast, slow), key
        assert torch.equal(r.read_region(key, offsets, sizes), slow), key


def test_reader_bad_inputs(tp2_ckpt, tmp_path):
    from ckpt_convert.dcp_reader import TorchDistReader, resolve_checkpoint_dir

    root = tp2_ckpt[0]
    with pytest.raises(ConversionError, match="does not exist"):
        resolve_checkpoint_dir(str(tmp_path / "nope"))
    with pytest.raises(ConversionError, match=r"iteration 99 does not exist.*available iterations: \[7\]"):
        resolve_checkpoint_dir(root, 99)

    broken = _copy(os.path.join(root, "iter_0000007"), tmp_path / "missing")
    os.remove(os.path.join(broken, "__1_0.distcp"))
    with pytest.raises(ConversionError, match=r"__1_0\.distcp' is missing \(it holds e\.g\. '"):
        TorchDistReader(broken)

    truncated = _copy(os.path.join(root, "iter_0000007"), tmp_path / "truncated")
    shard = os.path.join(truncated, "__0_0.distcp")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ConversionError, match=r"__0_0\.distcp' is truncated.*key '"):
        TorchDistReader(truncated)

    corrupt = _copy(os.path.join(root, "iter_0000007"), tmp_path / "corrupt")
    shard = os.path.join(corrupt, "__0_0.distcp")
    data = bytearray(open(shard, "rb").read())
    data[: len(data)] = b"\0" * len(data)
    open(shard, "wb").write(bytes(data))
    r = TorchDistReader(corrupt)
    with pytest.raises(ConversionError, match=r"cannot read key '.*__0_0\.distcp"):
        for key in r.model_keys():
            r.read(key)


# ----------------------------------------------------------------------------- safetensors I/O
def test_writer_shards_and_index_roundtrip(tmp_path):
    from safetensors import safe_open

    from ckpt_convert.safetensors_writer import ShardedSafetensorsWriter, TensorSpec

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(8, 4, generator=g),
        "b.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(10),
        "d.scalar": torch.tensor(2.5),
        "e.weight": torch.randn(3, 3, generator=g),
    }
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = ShardedSafetensorsWriter(str(tmp_path), specs, max_shard_bytes=100)
    for k, v in tensors.items():
        w.write(k, v)
    index = json.load(open(w.finish()))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    for name in files:  # each shard respects the limit unless it holds a single larger tensor
        with safe_open(str(tmp_path / name), "pt") as f:
            keys = list(f.keys())
            assert len(keys) == 1 or sum(tensors[k].numel() * tensors[k].element_size() for k in keys) <= 100
    for k, name in index["weight_map"].items():
        with safe_open(str(tmp_path / name), "pt") as f:
            assert torch.equal(f.get_tensor(k), tensors[k])


def test_parallel_writer_files_equal_sequential_and_bound_memory(tmp_path):
    """write_parallel (4 threads) gives byte-identical shard files and index to the sequential
    writer; at most `workers` produced tensors are alive at once; a bad tensor is a clear error."""
    import threading

    from ckpt_convert.safetensors_writer import ShardedSafetensorsWriter, TensorSpec

    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(5 + i, 3, generator=g) for i in range(12)}
    tensors["ids"] = torch.arange(7)
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    seq, par = tmp_path / "seq", tmp_path / "par"
    seq.mkdir(), par.mkdir()
    w = ShardedSafetensorsWriter(str(seq), specs, max_shard_bytes=200)
    for k, v in tensors.items():
        w.write(k, v)
    w.finish()
    import weakref

    alive, peak, lock = [0], [0], threading.Lock()

    def freed():
        with lock:
            alive[0] -= 1

    def produce(name):
        # counted from production until the writer lets the tensor go (garbage-collected)
        t = tensors[name].clone()
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        weakref.finalize(t, freed)
        threading.Event().wait(0.01)
        return t

    ShardedSafetensorsWriter(str(par), specs, max_shard_bytes=200).write_parallel(produce, workers=4)
    assert sorted(os.listdir(seq)) == sorted(os.listdir(par)) and len(os.listdir(seq)) > 3
    for name in os.listdir(seq):
        assert (seq / name).read_bytes() == (par / name).read_bytes(), name
    assert 1 < peak[0] <= 4
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ConversionError, match="tensor 't3': got \\(2,\\)"):
        ShardedSafetensorsWriter(str(bad), specs).write_parallel(
            lambda n: torch.zeros(2) if n == "t3" else tensors[n], workers=3)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_parallel_writer_file_bytes_and_zeros(tmp_path, monkeypatch, kernel_copy):
    """Tensors given as FileBytes (copied file to file, copy_file_range or its pread/pwrite fallback)
    or ZEROS (left as the pre-sized file's zeros) give the same files as the tensors themselves."""
    from ckpt_convert import safetensors_writer as sw

    if not kernel_copy:
        monkeypatch.setattr(sw, "_copy_file_range", None)
    g = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(40 + i, 7, generator=g) for i in range(6)}
    tensors["z"] = torch.zeros(9, 7)
    specs = [sw.TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    blob = tmp_path / "src.bin"
    runs, pos = {}, 13  # an odd start: offsets need no alignment
    with open(blob, "wb") as f:
        f.write(b"x" * pos)
        for k, v in tensors.items():
            data = v.numpy().tobytes()
            half = len(data) // 2
            f.write(data[half:] + b"pad" + data[:half])  # two runs, stored out of order
            runs[k] = ((str(blob), pos + len(data) - half + 3, half), (str(blob), pos, len(data) - half))
            pos += len(data) + 3
    ref, out = tmp_path / "ref", tmp_path / "out"
    ref.mkdir(), out.mkdir()
    sw.ShardedSafetensorsWriter(str(ref), specs, max_shard_bytes=2000).write_parallel(
        lambda n: tensors[n], workers=3)
    sw.ShardedSafetensorsWriter(str(out), specs, max_shard_bytes=2000).write_parallel(
        lambda n: sw.ZEROS if n == "z" else sw.FileBytes(runs[n]), workers=3)
    assert sorted(os.listdir(ref)) == sorted(os.listdir(out)) and len(os.listdir(ref)) > 2
    for name in os.listdir(ref):
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ConversionError, match="tensor 't1': .* bytes in the source files"):
        sw.ShardedSafetensorsWriter(str(bad), specs).write_parallel(
            lambda n: sw.FileBytes(runs[n][:1]) if n == "t1" else tensors[n], workers=2)
    short = tmp_path / "short"
    short.mkdir()
    with pytest.raises(ConversionError, match="ends at byte"):
        sw.ShardedSafetensorsWriter(str(short), specs).write_parallel(
            lambda n: sw.FileBytes(((str(blob), pos - 10, tensors[n].numel() * 4),)) if n == "t2"
            else tensors[n], workers=2)


def test_dcp_writer_threads_roundtrip(tmp_path):
    """Chunks added from 4 threads (each into its own .distcp files) read back exactly."""
    from concurrent.futures import ThreadPoolExecutor

    from ckpt_convert.dcp_reader import TorchDistReader
    from ckpt_convert.dcp_writer import DCPWriter

    g = torch.Generator().manual_seed(2)
    stacked = torch.randn(6, 4, 3, generator=g)
    plain = {f"w{i}": torch.randn(3 + i, 2, generator=g) for i in range(5)}
    w = DCPWriter(str(tmp_path), max_file_bytes=600)
    tasks = [lambda e=e: w.add_chunk("stack", stacked.shape, (e, 0, 0), stacked[e:e + 1]) for e in range(6)]
    tasks += [lambda k=k, v=v: w.add_chunk(k, v.shape, (0, 0), v) for k, v in plain.items()]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda f: f(), tasks))
    w.add_bytes("obj", b"hello")
    w.finish()
    json.dump({"sharded_backend": "torch_dist"}, open(tmp_path / "metadata.json", "w"))
    r = TorchDistReader(str(tmp_path))
    assert torch.equal(r.read("stack"), stacked)
    for k, v in plain.items():
        assert torch.equal(r.read(k), v)
    assert r.read_bytes("obj") == b"hello"
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".distcp")]) > 1


def test_writer_rejects_out_of_order_and_missing(tmp_path):
    from ckpt_convert.safetensors_writer import ShardedSafetensorsWriter, TensorSpec

    specs = [TensorSpec("x", (2,), torch.float32), TensorSpec("y", (2,), torch.float32)]
    w = ShardedSafetensorsWriter(str(tmp_path), specs)
    with pytest.raises(ConversionError, match="expected tensor 'x' next, got 'y'"):
        w.write("y", torch.zeros(2))
    w.write("x", torch.zeros(2))
    with pytest.raises(ConversionError, match="declared .*\\(2,\\)"):
        w.write("y", torch.zeros(3))
    with pytest.raises(ConversionError, match="'y' was declared but never written"):
        w.finish()
    w.close()


def test_atomic_output_dir_leaves_nothing_on_error(tmp_path):
    from ckpt_convert.output_dir import atomic_output_dir

    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(str(final)) as tmp:
            open(os.path.join(tmp, "half.bin"), "w").write("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with atomic_output_dir(str(final)) as tmp:
        open(os.path.join(tmp, "done.txt"), "w").write("ok")
    assert os.listdir(final) == ["done.txt"]
    with pytest.raises(ConversionError, match="already exists"):
        with atomic_output_dir(str(final)):
            pass


def test_atomic_output_dir_flushes_every_file_and_directory_before_the_rename(tmp_path, monkeypatch):
    """The rename commits the output: every file and directory under it is fsynced first."""
    from ckpt_convert import output_dir

    final, synced = tmp_path / "out", []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.path.exists(final)))
        real_fsync(fd)

    monkeypatch.setattr(output_dir.os, "fsync", fsync)
    timings = {}
    with output_dir.atomic_output_dir(str(final), timings=timings) as tmp:
        os.makedirs(os.path.join(tmp, "iter_0000000"))
        for name in ("a.bin", "iter_0000000/b.distcp"):
            open(os.path.join(tmp, name), "wb").write(b"x" * 10)
    names = {os.path.relpath(path, tmp) for path, _ in synced}
    assert names == {"a.bin", "iter_0000000/b.distcp", "iter_0000000", "."}
    assert not any(committed for _, committed in synced)     # all before the rename
    assert isinstance(timings["flush_seconds"], float)
    assert sorted(os.listdir(final)) == ["a.bin", "iter_0000000"]


def test_dcp_writer_without_zip_crc32_loads_exactly(tmp_path):
    """from_hf writes without torch.save's zip CRC-32 (torch.load never checks it): same values."""
    from ckpt_convert.dcp_reader import TorchDistReader
    from ckpt_convert.dcp_writer import DCPWriter, zip_crc32_off

    import zipfile

    from torch.utils.serialization import config

    t = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    crcs = {}
    for crc in (True, False):
        out = tmp_path / f"crc_{crc}"
        out.mkdir()
        w = DCPWriter(str(out))
        with contextlib.nullcontext() if crc else zip_crc32_off():
            w.add_chunk("w", t.shape, (0, 0), t)
        w.finish()
        json.dump({"sharded_backend": "torch_dist"}, open(out / "metadata.json", "w"))
        assert torch.equal(TorchDistReader(str(out)).read("w"), t)
        # the chunk is the only zip in its .distcp file: read its records' CRC fields
        [distcp] = [n for n in os.listdir(out) if n.endswith(".distcp")]
        with zipfile.ZipFile(out / distcp) as z:
            crcs[crc] = {i.filename.rsplit("/", 1)[-1]: i.CRC for i in z.infolist()}
    assert crcs[True]["0"] != 0 and crcs[False]["0"] == 0    # "0": the tensor's data record
    assert config.save.compute_crc32                       # switched back after the block


def _tiny_hf_flash(tmp_path):
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    cfg = LongcatFlashConfig(vocab_size=64, hidden_size=16, num_layers=1, num_attention_heads=2,
                             ffn_hidden_size=32, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                             qk_rope_head_dim=4, v_head_dim=4, head_dim=4, moe_topk=2,
                             n_routed_experts=3, zero_expert_num=2, expert_ffn_hidden_size=8)
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(cfg)
    out = tmp_path / "tf"
    model.save_pretrained(str(out))
    return model, str(out)


def test_hf_reader_handles_per_expert_and_fused_layouts(tmp_path):
    from safetensors.torch import save_file

    from ckpt_convert.hf_reader import HFCheckpointReader, routed_expert_count

    model, saved = _tiny_hf_flash(tmp_path)
    experts = model.model.layers[0].mlp.experts
    per_expert = HFCheckpointReader(saved)  # what transformers 5.x save_pretrained writes
    assert per_expert.has("model.layers.0.mlp.experts.4.gate_proj.weight")  # zero-expert quirk
    assert routed_expert_count(per_expert, "model.layers.0") == 3
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    shutil.copy(os.path.join(saved, "config.json"), fused_dir)
    save_file({"model.layers.0.mlp.experts.gate_up_proj": experts.gate_up_proj.detach().contiguous(),
               "model.layers.0.mlp.experts.down_proj": experts.down_proj.detach().contiguous()},
              str(fused_dir / "model.safetensors"))
    fused = HFCheckpointReader(str(fused_dir))
    assert routed_expert_count(fused, "model.layers.0") == 3
    for e in range(3):
        a = per_expert.expert("model.layers.0.mlp.experts", e, 8)
        b = fused.expert("model.layers.0.mlp.experts", e, 8)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        assert torch.equal(a[0], experts.gate_up_proj[e, :8].detach())
        assert torch.equal(a[2], experts.down_proj[e].detach())


def test_hf_reader_bad_inputs(tmp_path):
    from ckpt_convert.hf_reader import HFCheckpointReader

    _, saved = _tiny_hf_flash(tmp_path)
    with pytest.raises(ConversionError, match="does not exist"):
        HFCheckpointReader(str(tmp_path / "none"))
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    json.dump(index, open(os.path.join(saved, "model.safetensors.index.json"), "w"))
    with pytest.raises(ConversionError, match=r"model-00002-of-00002\.safetensors' listed in .* is missing"):
        HFCheckpointReader(saved)
    os.remove(os.path.join(saved, "model.safetensors.index.json"))
    r = HFCheckpointReader(saved)
    with pytest.raises(ConversionError, match="key 'model.nothing' is not in"):
        r.read("model.nothing")
    weights = os.path.join(saved, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(ConversionError, match=r"model\.safetensors' is truncated: tensor '"):
        HFCheckpointReader(saved)


def test_model_keys_leave_out_optimizer_state(tmp_path):
    import torch.distributed.checkpoint as dcp

    from ckpt_convert.dcp_reader import TorchDistReader

    state = {"decoder.final_layernorm.weight": torch.arange(4.0),
             "optimizer.state.exp_avg.decoder.final_layernorm.weight": torch.zeros(4)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    (tmp_path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    r = TorchDistReader(str(tmp_path))
    assert r.model_keys() == ["decoder.final_layernorm.weight"]
    assert torch.equal(r.read("decoder.final_layernorm.weight"), torch.arange(4.0))
    (tmp_path / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    with pytest.raises(ConversionError, match="only 'torch_dist'"):
        TorchDistReader(str(tmp_path))


def test_hf_reader_finds_lite_auxiliary_mtp_file(tmp_path):
    """LongCat-Flash-Lite keeps MTP tensors in model-auxiliary.safetensors, outside the index."""
    from safetensors.torch import save_file

    from ckpt_convert.hf_reader import HFCheckpointReader

    (tmp_path / "config.json").write_text('{"model_type": "longcat_flash_ngram"}')
    save_file({"model.norm.weight": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}')
    save_file({"model.mtp.norm.weight": torch.arange(3.0)}, str(tmp_path / "model-auxiliary.safetensors"))
    r = HFCheckpointReader(str(tmp_path))
    assert r.file_of["model.mtp.norm.weight"] == "model-auxiliary.safetensors"
    assert torch.equal(r.read("model.mtp.norm.weight"), torch.arange(3.0))


def test_writer_puts_auxiliary_tensors_outside_the_index(tmp_path):
    from ckpt_convert.hf_reader import HFCheckpointReader
    from ckpt_convert.safetensors_writer import AUXILIARY_NAME, ShardedSafetensorsWriter, TensorSpec

    tensors = {"model.norm.weight": torch.arange(4.0), "model.mtp.norm.weight": torch.arange(3.0)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with pytest.raises(ConversionError, match="auxiliary tensors must be declared after"):
        ShardedSafetensorsWriter(str(tmp_path), specs[::-1], auxiliary=["model.mtp.norm.weight"])
    w = ShardedSafetensorsWriter(str(tmp_path), specs, auxiliary=["model.mtp.norm.weight"])
    for k, v in tensors.items():
        w.write(k, v)
    index = json.load(open(w.finish()))
    assert index["weight_map"] == {"model.norm.weight": "model-00001-of-00001.safetensors"}
    assert index["metadata"]["total_size"] == 16
    (tmp_path / "config.json").write_text("{}")
    r = HFCheckpointReader(str(tmp_path))
    assert r.file_of["model.mtp.norm.weight"] == AUXILIARY_NAME
    assert torch.equal(r.read_rows("model.mtp.norm.weight", 0, 3), tensors["model.mtp.norm.weight"])
