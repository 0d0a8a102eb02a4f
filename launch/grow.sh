# shellcheck shell=bash
# Sourced by launch/common.sh: model growth for a stage (docs/operations.md, "Model growth").
#
#   GROW_FROM=DIR    start the stage from the committed checkpoint in DIR grown GROW_FACTOR (default 2)
#                    times deeper, layers in GROW_ORDER (stack, the default: 0..n-1 then 0..n-1 again;
#                    interleave: 0,0,1,1,...), written once into GROW_DIR (default CKPT_DIR/grown) by
#                    `python -m ckpt_convert.grow`
#
# The stage continues the source's iteration, LR schedule, data position and Adam state. Every start
# (requeues, resubmissions, --dry-run) gets model.num_layers of the grown model and
# checkpoint.load=GROW_DIR (the trainer resumes the stage's own checkpoint first, once it has one).
# The growth runs on the first start, in the launching shell (one process, streaming), unless the
# grown checkpoint or the stage's own exists; --dry-run checks it and writes nothing.
lc_grow_stage() {  # $1 = --dry-run or empty; appends to STAGE_OVERRIDES
    local grown="${GROW_DIR:-${LC_CKPT_DIR:+$LC_CKPT_DIR/grown}}" from="" out
    [ -n "$grown" ] || lc_die "GROW_FROM needs CKPT_DIR (or GROW_DIR): where the grown checkpoint goes"
    local args=(--load "$GROW_FROM" --save "$grown" --factor "${GROW_FACTOR:-2}" --order "${GROW_ORDER:-stack}")
    if [ -n "${LC_CKPT_DIR:-}" ] && [ -n "$(lc_committed_iteration "$LC_CKPT_DIR")" ]; then
        from="$LC_CKPT_DIR"
    elif [ -n "$(lc_committed_iteration "$grown")" ]; then
        from="$grown"
    fi
    if [ -n "$from" ]; then
        out="$("$PYTHON" -W ignore -m ckpt_convert.grow --overrides-of "$from")" \
            || lc_die "cannot read the layer count of the checkpoint in '$from' (see the error above)"
    elif [ "${1:-}" = --dry-run ]; then
        out="$("$PYTHON" -W ignore -m ckpt_convert.grow "${args[@]}" --dry-run)" \
            || lc_die "GROW_FROM=$GROW_FROM cannot be grown (see the error above)"
    else
        lc_log "model growth: python -m ckpt_convert.grow ${args[*]}"
        out="$("$PYTHON" -W ignore -m ckpt_convert.grow "${args[@]}" --no-progress)" \
            || lc_die "the growth of GROW_FROM=$GROW_FROM failed (see the error above); nothing was written"
    fi
    mapfile -t -O "${#STAGE_OVERRIDES[@]}" STAGE_OVERRIDES <<< "$out"
    STAGE_OVERRIDES+=(checkpoint.load="$grown")
}
