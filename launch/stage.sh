# shellcheck shell=bash
# Recipe selection shared by launch/{pretrain,midtrain,sft}.sh (sourced after launch/common.sh).
#
#   MODEL=lite (default) | flash    which published recipe: configs/longcat_flash_lite.yaml or
#                                   configs/longcat_flash.yaml, plus the stage file
#                                   configs/stages/${MODEL}_${stage}.yaml (what the stage changes:
#                                   sequence length, RoPE/YaRN, batch, LR, token budget). Every value
#                                   that is not published is marked "# guess:" there; --dry-run lists
#                                   published and guessed values.
#   CONFIG, STAGE_FILE              use other files instead. An explicit CONFIG without STAGE_FILE
#                                   runs without a stage file (your config + the variables below;
#                                   TOKEN_BUDGET is then required); STAGE_FILE=none does the same
#   SCHEDULE, ROPE_TYPE             schedule.style / model.rope_type (empty = the files' value;
#                                   without a stage file: the stage's usual wsd|cosine and rope|yarn)
#   TOKEN_BUDGET                    tokens of this stage: 11T, 80B, 11e12, 1.5e12 ... (default: the
#                                   stage file's recipe.token_budget); TRAIN_ITERS = the steps whose
#                                   tokens reach it, honouring train.batch_schedule (unless TRAIN_ITERS set)
#   WSD_DECAY_FRACTION              share of TRAIN_ITERS in WSD's final decay (default: the stage file's)
#   SEQ_LENGTH, GLOBAL_BATCH, MICRO_BATCH, LR, MIN_LR, WARMUP_ITERS   empty = the stage file's value
#   TP, PP, VPP, CP, EP, SEQUENCE_PARALLEL   parallel layout (empty = the files' value)
#   DATA_PATHS, DATA_CACHE_DIR, TOKENIZER, SAVE_INTERVAL, TENSORBOARD_DIR (default CKPT_DIR/tensorboard)
#   GROW_FROM, GROW_FACTOR, GROW_ORDER, GROW_DIR   start from a checkpoint grown deeper (launch/grow.sh)

lc_stage() {  # $1 = stage (pretrain, midtrain_32k, midtrain_128k, sft), $2 = schedule style and $3 =
              # RoPE type without a stage file; CKPT_DIR must be set
    MODEL="${MODEL:-lite}"
    if [ -n "${CONFIG:-}" ] && [ -z "${STAGE_FILE:-}" ]; then
        STAGE_FILE=none
    fi
    case "$MODEL" in
        lite) CONFIG="${CONFIG:-configs/longcat_flash_lite.yaml}" ;;
        flash) CONFIG="${CONFIG:-configs/longcat_flash.yaml}" ;;
        *) lc_die "MODEL=$MODEL: use MODEL=lite (LongCat-Flash-Lite) or MODEL=flash (LongCat-Flash)" ;;
    esac
    STAGE_FILE="${STAGE_FILE:-configs/stages/${MODEL}_$1.yaml}"
    lc_setup_env
    cd "$LONGCAT_ROOT" || lc_die "cannot cd to $LONGCAT_ROOT"
    STAGE_OVERRIDES=()
    if [ "$STAGE_FILE" = none ]; then
        STAGE_FILE=""
        SCHEDULE="${SCHEDULE:-$2}" ROPE_TYPE="${ROPE_TYPE:-$3}"
    else
        [ -f "$STAGE_FILE" ] || lc_die "stage file '$STAGE_FILE' does not exist (MODEL=$MODEL, stage $1)"
    fi
    lc_set schedule.style "${SCHEDULE:-}"; lc_set model.rope_type "${ROPE_TYPE:-}"
    lc_set data.seq_length "${SEQ_LENGTH:-}"
    lc_set train.global_batch_size "${GLOBAL_BATCH:-}"; lc_set train.micro_batch_size "${MICRO_BATCH:-}"
    lc_set optimizer.lr "${LR:-}"; lc_set optimizer.min_lr "${MIN_LR:-}"
    lc_set schedule.warmup_iters "${WARMUP_ITERS:-}"
    lc_set_parallel
    local out decay budget
    # explicit TRAIN_ITERS: no token budget needed, the decay fraction still comes from the stage file
    out="$("$PYTHON" -W ignore -m longcat_megatron.recipe iterations --config "$CONFIG" ${STAGE_FILE:+--stage "$STAGE_FILE"} \
        --tokens "${TOKEN_BUDGET:-}" --wsd-decay-fraction "${WSD_DECAY_FRACTION:-}" ${TRAIN_ITERS:+--iters "$TRAIN_ITERS"} \
        "${STAGE_OVERRIDES[@]}")" || lc_die "cannot derive the stage's iterations (see the error above)"
    read -r TRAIN_ITERS decay budget <<< "$out"
    [ "$budget" = 0 ] && budget=""
    lc_log "recipe: $CONFIG + ${STAGE_FILE:-no stage file}; $TRAIN_ITERS iterations${budget:+ for $budget tokens}"
    STAGE_OVERRIDES+=(train.train_iters="$TRAIN_ITERS" schedule.wsd_decay_iters="$decay"
                      checkpoint.save="$CKPT_DIR")
    lc_set checkpoint.save_interval "${SAVE_INTERVAL:-}"
    [ -n "${DATA_PATHS:-}" ] && STAGE_OVERRIDES+=(data.paths="$DATA_PATHS" data.mock=false)
    lc_set data.cache_dir "${DATA_CACHE_DIR:-}"; lc_set data.tokenizer "${TOKENIZER:-}"
    lc_set logging.tensorboard_dir "${TENSORBOARD_DIR:-$CKPT_DIR/tensorboard}"
    LC_CKPT_DIR="$CKPT_DIR"
}
