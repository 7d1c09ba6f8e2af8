#!/usr/bin/env bash
# Does the recipe still hold after a change to the training or sampling path? Runs it for STEPS steps on this machine
# (one GPU: the in-process engine) and compares the run with the recipe's committed reference runs (exps/check_recipe.py:
# validation strict, format and cut share at each eval; training length, cut share, format and KL in windows):
#   bash exps/check_recipe.sh --data=../shared/data/gsm8k            # then cite its last line in docs/perf.md
# NAME: the recipe, exps/NAME/config.yaml (default qwen_coder_r1zero); REF: its reference runs, space-separated (default
# res/NAME.jsonl and its repeats on the same training code, res/NAME_repeat*.jsonl: their spread widens the band);
# STEPS: steps run and compared (default 100); RUN_DIR: the run's folder (default runs/check_NAME);
# REFERENCE_PATH=1: the run takes the reference path (no shared prompts, no torch.compile, the unfused eager engine,
# the KL every step), to compare the speed paths with it. --key=value overrides go to train.py.
# The run stops at STEPS by max_steps: the same lr schedule as the reference's first STEPS steps when the recipe's lr is
# constant after warm-up (min_lr_ratio 1, as qwen_coder_r1zero's), else an approximation.
# Exit status: 0 within the references' band, 1 outside, 2 no reference run.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${NAME:-qwen_coder_r1zero}
STEPS=${STEPS:-100}
RUN=${RUN_DIR:-runs/check_$NAME}
REFS=(${REF:-$(ls res/"$NAME".jsonl res/"$NAME"_repeat*.jsonl 2>/dev/null || true)})   # split on spaces: paths have none
for r in "${REFS[@]:-res/$NAME.jsonl}"; do
    [ -e "$r" ] || { echo "no reference run at $r: run the recipe (exps/$NAME/run_train.sh), commit its res/"; exit 2; }
done
EXTRA=()
[ "${REFERENCE_PATH:-0}" = 1 ] && EXTRA=(--share_prompts=false --compile=false --compile_engine=false \
    --fuse_engine=false --log_kl_every=1)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$RUN/compile_cache}
python train.py "exps/$NAME/config.yaml" --run_dir="$RUN" --max_steps="$STEPS" --inference=local \
    ${EXTRA[@]+"${EXTRA[@]}"} "$@"
python exps/check_recipe.py "$RUN/metrics.jsonl" "${REFS[@]}" --steps "$STEPS"
