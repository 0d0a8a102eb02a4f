#!/usr/bin/env bash
# End-to-end quickstart on a tiny embedded default, no network, CPU only:
#   1. set up the virtual environment (idempotent),
#   2. build a tiny corpus + BPE tokenizer from text shipped with Python and tokenize it to a
#      megatron-core indexed dataset (data_tools, skipped when already done),
#   3. train the tiny LongCat model on 4 gloo processes (tensor parallel 2 x expert parallel 2),
#      saving checkpoints,
#   4. export the last checkpoint to a Hugging Face directory,
#   5. print where everything is and how the loss went.
# Run it again with more steps and it resumes from the last checkpoint:
#   STEPS=300 bash launch/quickstart.sh
# Extra arguments are config overrides, e.g.:  bash launch/quickstart.sh train.micro_batch_size=2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch/setup_env.sh

RUN="${RUN:-runs/quickstart}"
NPROC="${NPROC:-4}"
STEPS="${STEPS:-200}"
CONFIG="${CONFIG:-configs/quickstart.yaml}"
DATA="$RUN/data"

echo "[quickstart] 1/4 data: tiny corpus + tokenizer in $DATA"
python -m data_tools.tiny_corpus --out "$DATA"
if [[ ! -f "$DATA/corpus.bin" || ! -f "$DATA/corpus.idx" ]]; then
    python -m data_tools.preprocess --input "$DATA/corpus.jsonl" --tokenizer "$DATA/tokenizer" \
        --output-prefix "$DATA/corpus" --workers 1
else
    echo "[quickstart] indexed dataset $DATA/corpus.{bin,idx} already built"
fi

echo "[quickstart] 2/4 train: $NPROC processes, $STEPS iterations (resumes if checkpoints exist)"
LOG="$RUN/train.log"
mkdir -p "$RUN"
set +e
bash launch/local.sh "$NPROC" "$CONFIG" \
    data.paths="[$DATA/corpus]" data.tokenizer="$DATA/tokenizer" \
    checkpoint.save="$RUN/checkpoints" logging.tensorboard_dir="$RUN/tensorboard" \
    train.train_iters="$STEPS" "$@" 2>&1 | tee "$LOG" | grep -v -E "Warning|warnings.warn|return func|^\s*$"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -ne 0 ]]; then
    echo "[quickstart] training failed (exit $rc); full log: $LOG" >&2
    exit $rc
fi

echo "[quickstart] 3/4 export to Hugging Face"
ARCH="$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['model']['arch'])" "$CONFIG")"
if [[ "$ARCH" == "longcat" ]]; then
    rm -rf "$RUN/hf"
    python -m ckpt_convert.to_hf --load "$RUN/checkpoints" --output "$RUN/hf" --tokenizer "$DATA/tokenizer" --verify
else
    echo "[quickstart] model.arch=$ARCH has no Hugging Face LongCat layout: export skipped"
fi

echo "[quickstart] 4/4 summary"
python - "$RUN" "$LOG" <<'PY'
import os, re, sys
run, log = sys.argv[1], sys.argv[2]
losses = [(int(m.group(1)), float(m.group(2))) for m in
          (re.search(r"iter\s+(\d+)/\d+ \| loss ([0-9.]+)", l) for l in open(log)) if m]
ck = os.path.join(run, "checkpoints")
latest = open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read().strip()
print(f"  checkpoints : {ck} (latest iteration {latest})")
if os.path.isdir(os.path.join(run, "hf")):
    print(f"  HF export   : {os.path.join(run, 'hf')}")
print(f"  tensorboard : {os.path.join(run, 'tensorboard')}")
print(f"  train log   : {log}")
if losses:
    print(f"  loss        : {losses[0][1]:.4f} at iter {losses[0][0]} -> {losses[-1][1]:.4f} at iter {losses[-1][0]}")
PY
