#!/usr/bin/env bash
# An R1-Zero run end to end on one machine, for exps/NAME/config.yaml (each exps/*_r1zero/run_train.sh calls this):
#   bash exps/r1zero.sh NAME [--key=value ...]        e.g. bash exps/r1zero.sh smollm2_r1zero --data=../shared/data/gsm8k
# 1. baseline: the initial model on the whole GSM8K test set (greedy strict + lenient, format, maj@8) with the run's
#    prompt, and the reference it must beat: the model's own chain of thought (prompt cot, greedy, lenient), on GPU 0;
#    on one GPU without Serve, beside the training (log: RUN/baseline.log)
# 2. training: 2+ GPUs: GPU 0 trains, GPUs 1..N-1 each hold a torch-engine replica of the Serve app, weights
#    over NCCL after every step (the app starts while the baseline runs); 1 GPU: the in-process engine, or with
#    INFERENCE=serve one replica beside the trainer on its GPU (GPUS_PER_REPLICA of it), weights by CUDA IPC
# 3. the final checkpoint on the whole test set, and the best validation's model (ckpt/best) when it is another, then
#    res/: metrics, curves, before/after evaluation
# Run it again to go on after a stop (a time limit, --stop_after_min, a crash): finished parts are skipped and
# training resumes from the last checkpoint. STOP_AT=<unix time>: a job's end; training stops (with a checkpoint)
# a minute before it. INFERENCE=serve|local overrides the choice by GPU count; EVAL_LIMIT=N evaluates N problems;
# MAJ_K=k: samples per problem for maj@k in the before/after evals (default 8; 0 = greedy only).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1 && shift
CFG=exps/$NAME/config.yaml
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 NCCL_NVLS_ENABLE=0   # Ray on 127.0.0.1; no NVLink multicast
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}               # Ray workers import infer_workers from here
# the resolved config (yaml + overrides) is the one source of every value below
read -r RUN MODEL DATA MNT TEMP MAX PROMPT COMPILE_ENGINE ENGINE_ROWS FUSE_ENGINE < <(python -c "import sys, train; c = train.load_config(sys.argv[1:]); \
print(c.run_dir, c.model, c.data, c.max_new_tokens, c.temperature, c.max_steps, c.prompt, int(c.system.compile_engine), \
c.system.engine_rows, int(c.system.fuse_engine))" "$CFG" "$@")
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
INFERENCE=${INFERENCE:-$([ "$NGPU" -ge 2 ] && echo serve || echo local)}
RES=${RES:-res}                                  # where the tracked results go, named after the run folder:
TAG=$(basename "$RUN")                           # --run_dir=runs/x --prompt=r1 ... gives res/x.png, res/x_eval.json
mkdir -p "$RUN" "$RES"
# torch.compile's kernels cached with the run (the default cache is this machine's /tmp): a resumed piece in another
# job or on another machine of the same kind reuses them instead of compiling again (docs/perf.md: its cost)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$RUN/compile_cache}
mark() { echo "$(date +%s) $1" >> "$RUN/phases.log"; }   # the run's wall time, part by part (unix seconds)
mark start
python -c "from system import models; models.resolve_model('$MODEL')"   # convert the GGUF once, before processes race
evaluate() {  # evaluate MODEL_PATH KEY [PROMPT MAJ_K]: the whole test set -> $RUN/eval_KEY.json, metrics into res/
    CUDA_VISIBLE_DEVICES=${EVAL_GPU:-0} python gsm8k.py --model "$1" --data "$DATA" --max-new-tokens "$MNT" \
        --temperature "$TEMP" --prompt "${3:-$PROMPT}" --maj-k "${4:-${MAJ_K:-8}}" --limit "${EVAL_LIMIT:-0}" \
        --out "$RUN/eval_$2.json" --record "$RES/${TAG}_eval.json" --as "$2"
}

if [ "$INFERENCE" = serve ]; then   # the app: one torch-engine replica per GPU after the first (CPU: one replica)
    export MODEL_NAME_OR_PATH=$MODEL INFER_ENGINE=torch COMPILE_ENGINE ENGINE_ROWS FUSE_ENGINE NUM_INFER_WORKERS=${NUM_INFER_WORKERS:-$((NGPU > 1 ? NGPU - 1 : 1))}
    if [ "$NGPU" -ge 2 ]; then GPUS=$(seq -s, 1 "$NUM_INFER_WORKERS"); SLOTS="--num-gpus $NUM_INFER_WORKERS"
    elif [ "$NGPU" = 1 ]; then   # on the trainer's GPU: a share of it each; pushes by CUDA IPC (Config.sync_ipc auto)
        export GPUS_PER_REPLICA=${GPUS_PER_REPLICA:-$(python -c "print(0.9 / $NUM_INFER_WORKERS)")}
        GPUS=0 && SLOTS="--num-gpus 1"
    else GPUS="" && SLOTS="--num-gpus 0 --num-cpus $NUM_INFER_WORKERS"; fi
    CUDA_VISIBLE_DEVICES=$GPUS ray start --head --node-ip-address 127.0.0.1 $SLOTS --include-dashboard false \
        --disable-usage-stats >/dev/null
    trap 'kill $SERVE_PID 2>/dev/null || true; ray stop --force >/dev/null 2>&1 || true' EXIT
    serve run --address auto infer_workers:inference_app > "$RUN/serve.log" 2>&1 &   # HTTP on 127.0.0.1:8000
    SERVE_PID=$!
fi
baseline() {
    [ -e "$RUN/eval_before.json" ] || evaluate "$MODEL" before
    [ -e "$RUN/eval_reference_cot.json" ] || evaluate "$MODEL" reference_cot cot 0
    mark evaluated_before
}
BASELINE_PID=
if [ "$INFERENCE" = local ] && [ "$NGPU" -ge 1 ]; then   # the initial model's evals need nothing from training:
    baseline > "$RUN/baseline.log" 2>&1 &                 # they share the GPU with it instead of delaying it
    BASELINE_PID=$!
else
    baseline                                              # meanwhile the replicas start
fi
if [ "$INFERENCE" = serve ]; then
    until python -c "import json, urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:8000/',
            json.dumps({'prompts': ['hi'], 'max_new_tokens': 1}).encode(), {'Content-Type': 'application/json'}), timeout=60)" \
            2>/dev/null; do                                          # ready when a replica answers
        kill -0 $SERVE_PID 2>/dev/null || { tail -20 "$RUN/serve.log"; exit 1; }
        sleep 2
    done
fi
ARGS=(--inference="$INFERENCE")
[ -e "$RUN/ckpt/latest" ] && ARGS+=(--resume)
[ -n "${STOP_AT:-}" ] && ARGS+=(--stop_after_min="$(python -c "print(max(0.1, ($STOP_AT - $(date +%s) - 60) / 60))")")
python train.py "$CFG" "${ARGS[@]}" "$@"        # trains on cuda:0 and sees every GPU (NCCL to the replicas)
mark trained
[ -z "$BASELINE_PID" ] || wait "$BASELINE_PID" || { tail -20 "$RUN/baseline.log"; echo "the baseline evals failed"; exit 1; }
python exps/plot.py "$RUN" --res "$RES/$TAG.png"
cp "$RUN/metrics.jsonl" "$RES/$TAG.jsonl"
FINAL=$RUN/ckpt/step_$(printf %06d "$MAX")
[ -e "$FINAL" ] || { echo "stopped before step $MAX: run this again to go on"; exit 0; }
[ -e "$RUN/eval_after.json" ] || evaluate "$FINAL/model" after
BEST=$RUN/ckpt/best   # the model of the best validation (train.py, keep_best): chosen on validation, then tested once
if [ -e "$BEST/best.json" ] && [ ! -e "$RUN/eval_after_best.json" ] && \
        [ "$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$BEST/best.json")" != "$MAX" ]; then
    evaluate "$BEST/model" after_best
fi
mark evaluated_after
python - "$RES/${TAG}_eval.json" "$RUN" <<'PY'   # the run's last lines: the test set before and after
import json, os, sys
from system.run import Health  # its thresholds: what counts as degenerate
r, run = json.load(open(sys.argv[1])), sys.argv[2]
best = json.load(open(os.path.join(run, "ckpt", "best", "best.json"))) if os.path.exists(
    os.path.join(run, "eval_after_best.json")) else {}
for key in ("before", "reference_cot", "after") + (("after_best",) if best else ()):
    if key in r:
        m = r[key]
        show = lambda k: f"{m[k]:.1%} [{m[k + '_ci95'][0]:.1%}, {m[k + '_ci95'][1]:.1%}]" if k in m else "-"
        if key == "after_best":
            print(f"the best validation ({best['val/pass@1_strict']:.1%} strict) was step {best['step']}'s model:")
        print(f"test {key:13} (n={m['n']}, prompt {m['prompt']}): strict {show('pass@1_strict')}, lenient "
              f"{show('pass@1_lenient')}, format {m['format']:.1%}, cut {m.get('cut', float('nan')):.1%}, words "
              f"repeated {m.get('repeated', float('nan')):.1%}")
after = r.get("after", {})
if after and (after["format"] < Health.FORMAT or after.get("cut", 0) >= Health.CUT):
    print(f"DEGENERATE: the trained model's test format is {after['format']:.1%} and {after.get('cut', 0):.1%} of its "
          f"completions run to the cap")
PY
