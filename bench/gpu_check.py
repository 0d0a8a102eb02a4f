"""One command that runs the real GPU path on one GPU (NCCL, world size 1, bf16) and prints a table.

    bash bench/fetch_gpu_wheels.sh          # once, on a machine with PyPI access: wheels -> .whl/
    python bench/gpu_check.py               # on the GPU machine (budget: 6 minutes on one H100)
    python bench/gpu_check.py --cpu         # the same steps at tiny sizes on CPU (gloo); CI runs this

Steps (each reported as a row; the command exits 1 if any check fails):

1. train: the tiny LongCat with the N-gram Embedding, zero experts, the budget controller and MTP
   (``configs/tiny_longcat_ngram.yaml`` at world size 1) for N steps, save, resume for M more, and
   compare with a straight N+M-step run: losses of the resumed steps and every model tensor of the
   two final checkpoints must be bitwise equal (CUDA runs with deterministic algorithms on);
2. export: ``ckpt_convert.to_hf --verify`` on the resumed run's checkpoint (a CPU subprocess: the
   exported model's logits against our model's, fp32, 1e-5 relative);
3. layer: one LongCat-Flash-Lite-width shortcut layer (hidden 3072, 32 heads, the Lite MLA ranks from
   ``configs/longcat_flash_lite.yaml``, top-12 over FFN + zero experts, FFN experts scaled down to fit
   one GPU) at sequence 8192, micro-batch 1, forward + backward in bf16: step ms, peak GPU memory and
   achieved TFLOP/s from the layer's FLOP count (causal attention counted as half the s x s products;
   FFN-expert FLOPs from the tokens the router really sent to FFN experts);
4. documents: one Lite-width MLA block at that sequence with packed documents, as a ``DocumentMask``
   (per-document attention) and as the dense mask it stands for: outputs and input gradients must
   agree (bf16: 2e-2 of the largest value), and the step ms and peak memory of both are reported.

Without megatron-core installed, the script makes a venv in ``.whl/venv-pyXY`` that sees this
machine's torch (``--system-site-packages``), installs the wheels of ``.whl/`` into it with
``pip install --no-index --find-links .whl`` and re-runs itself there (docs/operations.md, "GPU
check"). On a GPU the table is appended to docs/benchmarks.md (``--no-docs`` to skip) and written to
``--out DIR`` (markdown + JSON) when given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, ".whl")
# What the check imports beyond torch (megatron-core, HF export/verify, configs, progress).
REQUIREMENTS = ("megatron-core==0.16.1", "transformers==5.23.0", "safetensors", "tokenizers",
                "PyYAML", "numpy", "psutil", "tqdm", "packaging>=24.2")
MODULES = ("megatron.core", "transformers", "safetensors", "tokenizers", "yaml", "numpy", "psutil", "tqdm")
REEXEC_MARK = "LONGCAT_GPU_CHECK_VENV"

# Sizes: "gpu" is what the issue asks for; "cpu" keeps the same steps small enough for CI.
SIZES = {
    "gpu": dict(steps=30, more=10, seq=8192, experts=64, zero_experts=32, iters=5, warmup=2),
    "cpu": dict(steps=3, more=2, seq=128, experts=8, zero_experts=4, iters=2, warmup=1),
}
LITE_CONFIG = os.path.join(ROOT, "configs", "longcat_flash_lite.yaml")
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny_longcat_ngram.yaml")


# ---- dependencies ---------------------------------------------------------------------------------
def _missing_modules() -> list:
    missing = []
    for name in MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def ensure_dependencies() -> None:
    """Re-run inside a venv built from ``.whl/`` when a module the check needs is missing here."""
    missing = _missing_modules()
    if not missing:
        return
    if os.environ.get(REEXEC_MARK):
        sys.exit(f"gpu_check: {', '.join(missing)} still missing inside {sys.prefix}; see docs/operations.md")
    if not os.path.isdir(WHEELS) or not any(n.endswith(".whl") for n in os.listdir(WHEELS)):
        sys.exit(f"gpu_check: {', '.join(missing)} not installed and .whl/ holds no wheels: run "
                 "`bash bench/fetch_gpu_wheels.sh` on a machine with PyPI access first and bring .whl/ "
                 "along (docs/operations.md, 'GPU check')")
    venv = os.path.join(WHEELS, f"venv-py{sys.version_info.major}{sys.version_info.minor}")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"gpu_check: creating {venv} (sees this machine's torch) ...", flush=True)
        made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv])
        if made.returncode != 0:  # no ensurepip on this image: a venv without pip, driven from outside
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                            "--clear", venv], check=True)
    has_pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0
    pip = [python, "-m", "pip"] if has_pip else [sys.executable, "-m", "pip", "--python", python]
    # megatron-core alone without dependencies (it declares torch, which must stay this machine's
    # own), then the rest with theirs (numpy, packaging and all HF needs come from .whl/).
    for extra, reqs in ((["--no-deps"], REQUIREMENTS[:1]), ([], REQUIREMENTS[1:])):
        cmd = pip + ["install", "--no-index", "--find-links", WHEELS, "--quiet", *extra, *reqs]
        print("gpu_check: " + " ".join(cmd[len(pip):]), flush=True)
        subprocess.run(cmd, check=True)
    os.environ[REEXEC_MARK] = "1"
    os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])


# ---- 1. train, save, resume, compare ----------------------------------------------------------------
def _train(overrides: list):
    from longcat_megatron import runtime
    from longcat_megatron.config import load_config
    from longcat_megatron.training.loop import train

    try:
        return train(load_config(TINY_CONFIG, overrides))
    finally:
        runtime.shutdown()


def _checkpoint_tensors(root: str) -> dict:
    from ckpt_convert.dcp_reader import TorchDistReader, resolve_checkpoint_dir

    reader = TorchDistReader(resolve_checkpoint_dir(root)[0])
    return {k: reader.read(k) for k in reader.model_keys()}


def check_resume(work: str, size: dict, bf16: bool) -> dict:
    """N steps + save + M resumed steps vs N+M straight steps: losses and checkpoints bitwise."""
    n, m = size["steps"], size["more"]
    base = ["parallel.tensor=1", "parallel.sequence_parallel=false", f"train.train_iters={n + m}",
            f"optimizer.bf16={'true' if bf16 else 'false'}", "logging.progress=false",
            "logging.log_interval=1000000"]
    split, straight = os.path.join(work, "split"), os.path.join(work, "straight")
    start = time.perf_counter()
    first = _train(base + [f"checkpoint.save={split}", f"train.exit_interval={n}"])
    second = _train(base + [f"checkpoint.save={split}"])
    whole = _train(base + [f"checkpoint.save={straight}"])
    seconds = time.perf_counter() - start
    resumed = {i: second.losses[i] for i in range(n + 1, n + m + 1)}
    reference = {i: whole.losses[i] for i in range(n + 1, n + m + 1)}
    a, b = _checkpoint_tensors(split), _checkpoint_tensors(straight)
    differ = sorted(k for k in b if k not in a or not _bitwise_equal(a[k], b[k]))
    ok = (first.iteration == n and second.resumed_from == n and second.iteration == n + m
          and resumed == reference and not differ and set(a) == set(b))
    detail = (f"resumed at {second.resumed_from}; losses {n + 1}..{n + m} "
              f"{'equal' if resumed == reference else f'differ: {resumed} vs {reference}'}; "
              f"{len(b)} checkpoint tensors, {len(differ)} differ" + (f" (first: {differ[0]})" if differ else ""))
    return dict(name=f"train {n} + save + resume {m} vs straight {n + m} (bitwise)", ok=ok,
                seconds=seconds, detail=detail, checkpoint=split)


def _bitwise_equal(x, y) -> bool:
    """Same dtype, shape and bits (NaN payloads and signed zeros included)."""
    import torch

    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.dtype.is_floating_point:
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        return torch.equal(x.contiguous().view(as_int), y.contiguous().view(as_int))
    return torch.equal(x, y)


def check_export(checkpoint: str, work: str) -> dict:
    """``python -m ckpt_convert.to_hf --verify`` in a CPU subprocess (fp32 logits vs ours)."""
    out = os.path.join(work, "hf")
    env = dict(os.environ, LONGCAT_FORCE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ckpt_convert.to_hf", "--load", checkpoint,
                           "--output", out, "--verify", "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "verify" in ln]
    detail = lines[-1].strip() if lines else (proc.stdout + proc.stderr).strip()[-400:]
    ok = proc.returncode == 0 and "verify OK" in detail
    return dict(name="export to HF + verify logits (CPU, fp32)", ok=ok, seconds=seconds, detail=detail)


# ---- 3. one Lite-width shortcut layer ---------------------------------------------------------------
def lite_layer_config(size: dict, cpu: bool):
    """configs/longcat_flash_lite.yaml's model with one layer and the FFN experts scaled down
    (at --cpu: tiny widths with the same structure)."""
    import dataclasses

    from longcat_megatron.config import load_config

    cfg = load_config(LITE_CONFIG, ["data.mock=true"]).model
    changes = dict(num_layers=1, ngram=None, num_experts=size["experts"],
                   zero_expert_num=size["zero_experts"], mtp_num_layers=0,
                   budget_target_ffn_experts=None, max_position_embeddings=max(size["seq"], 4096))
    if cpu:
        changes.update(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, moe_ffn_hidden_size=32,
                       q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                       v_head_dim=16, moe_router_topk=4, vocab_size=1024)
    return dataclasses.replace(cfg, **changes)


def layer_flops(cfg, seq: int, ffn_picks: float) -> float:
    """Forward FLOPs of one shortcut layer over ``seq`` tokens (2 per multiply-add); causal
    attention counts the (s+1)/2 keys a query sees on average; experts by the routed FFN picks."""
    h, heads, s = cfg.hidden_size, cfg.num_attention_heads, seq
    qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    mla_proj = (h * cfg.q_lora_rank + cfg.q_lora_rank * heads * qk + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + v) + heads * v * h)
    core = heads * (qk + v) * (s + 1) / 2
    dense = 3 * h * cfg.ffn_hidden_size
    router = h * (cfg.num_experts + cfg.zero_expert_num)
    expert = 3 * h * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)
    return 2 * (s * (2 * (mla_proj + core + dense) + router) + ffn_picks * expert)


def bench_layers(size: dict, cpu: bool, bf16: bool) -> list:
    """The layer bench at the asked sequence; after an out-of-memory, once more at half of it (so
    the table still has a number, next to the failed row)."""
    rows = [bench_layer(size, cpu, bf16)]
    if "out of memory" in rows[0].get("detail", "") and size["seq"] >= 2048:
        import torch

        torch.cuda.empty_cache()
        rows.append(bench_layer(dict(size, seq=size["seq"] // 2), cpu, bf16))
        rows[-1]["ok"] = True  # informative; the failed row above already fails the check
    return rows


def bench_layer(size: dict, cpu: bool, bf16: bool) -> dict:
    """Step time, peak memory and TFLOP/s of one shortcut layer's forward + backward."""
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.layer import ShortcutLayer
    from longcat_megatron.model.rotary import InterleavedRotary

    cfg = lite_layer_config(size, cpu)
    seq = size["seq"]
    runtime.initialize(num_experts=cfg.num_experts, seed=1234)
    dev = runtime.device()
    tf = transformer_config(cfg, bf16=bf16)
    tf.perform_initialization = False  # initialised below on the device (CPU init of 0.6B is slow)
    layer = ShortcutLayer(cfg, tf, 0).to(dev).train()
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, cfg.init_method_std, generator=gen)
            else:
                p.fill_(1.0 if "norm" in name or "layernorm" in name else 0.0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    rotary = InterleavedRotary(cfg).angles(torch.arange(seq, device=dev)[None], dtype)
    x = torch.randn(seq, 1, cfg.hidden_size, device=dev, dtype=dtype, generator=gen).requires_grad_()
    router = layer.mlp.router
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        y = layer(x, rotary)
        y.float().square().mean().backward()

    row = dict(name=f"Lite-width shortcut layer, seq {seq}, mbs 1, fwd+bwd", ok=True,
               hidden=cfg.hidden_size, heads=cfg.num_attention_heads, experts=cfg.num_experts,
               zero_experts=cfg.zero_expert_num, topk=cfg.moe_router_topk, seq=seq,
               params=sum(p.numel() for p in layer.parameters()))
    try:
        for _ in range(size["warmup"]):
            step()
        sync()
        router.step_picks.zero_()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(size["iters"]):
            step()
        sync()
        ms = (time.perf_counter() - start) / size["iters"] * 1e3
    except torch.cuda.OutOfMemoryError as e:  # reported, not hidden: the table says where it stopped
        row.update(ok=False, detail=f"out of memory: {str(e).splitlines()[0]}")
        del layer, x
        return row
    finally:
        runtime.shutdown()
    picks = float(router.step_picks[: cfg.num_experts].sum()) / size["iters"]
    flops = 3 * layer_flops(cfg, seq, picks)  # backward = 2 x forward
    row.update(step_ms=ms, ffn_experts_per_token=picks / seq, tflops=flops / (ms / 1e3) / 1e12,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None)
    row["detail"] = (f"{ms:.1f} ms/step, {row['tflops']:.1f} TFLOP/s, "
                     + (f"peak {row['peak_gib']:.2f} GiB, " if row["peak_gib"] is not None else "")
                     + f"{row['ffn_experts_per_token']:.2f} FFN experts/token")
    return row


# ---- 4. packed documents: DocumentMask vs dense mask -----------------------------------------------
def check_documents(size: dict, cpu: bool, bf16: bool) -> dict:
    """One MLA block over packed documents: DocumentMask == its dense mask (output, input grad)."""
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model.attention import LongcatMLA
    from longcat_megatron.model.document_mask import DocumentMask
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.rotary import InterleavedRotary

    cfg, seq = lite_layer_config(size, cpu), size["seq"]
    runtime.initialize(num_experts=cfg.num_experts, seed=1234)
    dev = runtime.device()
    dtype = torch.bfloat16 if bf16 else torch.float32
    try:
        mla = LongcatMLA(cfg, transformer_config(cfg, bf16=bf16)).to(dev, dtype).train()
        gen = torch.Generator().manual_seed(0)
        cuts = sorted(torch.randperm(seq - 1, generator=gen)[:7].add(1).tolist())  # 8 documents
        documents = DocumentMask.from_starts([[0] + cuts], seq)
        rotary = InterleavedRotary(cfg).angles(torch.arange(seq, device=dev)[None], dtype)
        x = torch.randn(seq, 1, cfg.hidden_size, generator=gen).to(dev, dtype).requires_grad_()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        results = {}
        # the dense mask is built after the documents run, so that run's peak does not hold it
        for name, make_mask in (("documents", lambda: documents), ("dense", lambda: documents.dense(dev))):
            mask = make_mask()
            for _ in range(2):                              # the second call is timed
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                x.grad = None
                sync()
                start = time.perf_counter()
                out = mla(x, rotary, mask)
                out.float().square().mean().backward()
                sync()
            results[name] = (out.detach().float(), x.grad.float().clone(),
                             (time.perf_counter() - start) * 1e3,
                             torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None)
    finally:
        runtime.shutdown()
    (out, grad, ms, peak), (ref_out, ref_grad, ref_ms, ref_peak) = results["documents"], results["dense"]
    err = max(float((out - ref_out).abs().max() / ref_out.abs().max()),
              float((grad - ref_grad).abs().max() / ref_grad.abs().max()))
    tol = 2e-2 if bf16 else 1e-5
    peaks = f", peak {peak:.2f} vs {ref_peak:.2f} GiB" if peak is not None else ""
    return dict(name=f"packed documents (8) in one MLA block, seq {seq}: DocumentMask == dense mask",
                ok=err <= tol, detail=f"max rel. error {err:.1e} (tolerance {tol:.0e}); "
                f"{ms:.1f} vs {ref_ms:.1f} ms fwd+bwd{peaks}")


# ---- report -----------------------------------------------------------------------------------------
def environment_line() -> str:
    import torch

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - informative only
            nccl = "?"
        return (f"GPU {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}")
    return f"CPU only, torch {torch.__version__}"


def render(rows: list, env: str, total_s: float) -> str:
    lines = [f"Environment: {env}. Whole check: {total_s:.0f} s.", "",
             "| check | result | seconds | detail |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {'PASS' if r['ok'] else 'FAIL'} | {r.get('seconds', 0):.1f} | {r['detail']} |")
    layers = [r for r in rows if "step_ms" in r]
    if layers:
        lines += ["", "| hidden | heads | FFN + zero experts | top-k | seq | layer params | step ms | "
                  "peak GiB | TFLOP/s | FFN experts/token |", "|---|---|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        lines += [f"| {layer['hidden']} | {layer['heads']} | {layer['experts']} + {layer['zero_experts']} | "
                  f"{layer['topk']} | {layer['seq']} | {layer['params'] / 1e9:.2f}B | {layer['step_ms']:.1f} | "
                  + (f"{layer['peak_gib']:.2f}" if layer["peak_gib"] is not None else "-")
                  + f" | {layer['tflops']:.1f} | {layer['ffn_experts_per_token']:.2f} |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU with gloo (what CI runs)")
    parser.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16")
    parser.add_argument("--experts", type=int, default=None, help="FFN experts of the layer bench")
    parser.add_argument("--seq", type=int, default=None, help="sequence length of the layer bench")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["train", "export", "layer", "documents"])
    parser.add_argument("--out", default=None, help="also write gpu_check.md / gpu_check.json here")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--no-docs", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args(argv)
    if not args.cpu:
        ensure_dependencies()
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    if args.cpu:
        os.environ["LONGCAT_FORCE_CPU"] = "1"
        os.environ.setdefault("OMP_NUM_THREADS", "2")
    else:
        # Bitwise resume needs deterministic kernels; cuBLAS needs this set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed; this check uses the machine's own torch (with CUDA)",
              file=sys.stderr)
        return 2

    from longcat_megatron import runtime

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu for the CPU variant", file=sys.stderr)
        return 2
    if not os.environ.get("MASTER_PORT"):
        os.environ["MASTER_PORT"] = str(runtime.free_port())
    runtime.silence_known_warnings()
    size = dict(SIZES["cpu" if args.cpu else "gpu"])
    size.update({k: v for k, v in (("experts", args.experts), ("seq", args.seq)) if v})
    bf16 = not args.fp32
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.work or tmp
        if "train" not in args.skip:
            if not args.cpu:
                torch.use_deterministic_algorithms(True, warn_only=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rows.append(check_resume(work, size, bf16))
            torch.use_deterministic_algorithms(False)
            nondeterministic = sorted({str(w.message).split(" does not have a deterministic")[0]
                                       for w in caught if "deterministic" in str(w.message)})
            if nondeterministic:  # the ops to look at first when the bitwise comparison fails
                rows[-1]["detail"] += "; ops without a deterministic CUDA kernel: " + ", ".join(nondeterministic)
            if "export" not in args.skip:
                rows.append(check_export(rows[-1].pop("checkpoint"), work))
        if "layer" not in args.skip:
            t0 = time.perf_counter()
            layer_rows = bench_layers(size, args.cpu, bf16)
            for r in layer_rows:
                r["seconds"] = (time.perf_counter() - t0) / len(layer_rows)
            rows += layer_rows
        if "documents" not in args.skip:
            t0 = time.perf_counter()
            rows.append(check_documents(size, args.cpu, bf16))
            rows[-1]["seconds"] = time.perf_counter() - t0
    for r in rows:
        r.pop("checkpoint", None)
    total = time.perf_counter() - start
    table = render(rows, environment_line(), total)
    print(table, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        open(os.path.join(args.out, "gpu_check.md"), "w").write(table + "\n")
        json.dump(dict(environment=environment_line(), rows=rows, seconds=total),
                  open(os.path.join(args.out, "gpu_check.json"), "w"), indent=1)
    if not args.cpu and not args.no_docs:
        from bench.report import append_section

        print("appended to " + append_section(
            "GPU check (bench/gpu_check.py: NCCL world size 1, bf16)",
            f"Command: `python bench/gpu_check.py`\n\n{table}"))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
