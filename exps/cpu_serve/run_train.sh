#!/usr/bin/env bash
# One CPU machine: a Ray head on 127.0.0.1, the inference app (2 vLLM-CPU replicas), then the trainer.
#   bash exps/cpu_serve/run_train.sh [--max_steps=8 ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0                   # Ray binds 127.0.0.1 only
export MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH:-smollm2} NUM_INFER_WORKERS=${NUM_INFER_WORKERS:-2}
python -c "import models; models.resolve_model('$MODEL_NAME_OR_PATH')"   # convert the GGUF once, before replicas race
ray start --head --node-ip-address 127.0.0.1 --num-cpus "$NUM_INFER_WORKERS" --include-dashboard false \
    --disable-usage-stats >/dev/null
trap 'kill $SERVE_PID 2>/dev/null || true; ray stop --force >/dev/null 2>&1 || true' EXIT
serve run --address auto infer_workers:inference_app > runs_serve.log 2>&1 &   # HTTP on 127.0.0.1:8000
SERVE_PID=$!
until curl -sf -m 60 -H 'Content-Type: application/json' -d '{"prompts": ["hi"], "max_new_tokens": 1}' \
        http://127.0.0.1:8000/ >/dev/null; do                      # ready when a replica answers
    kill -0 $SERVE_PID 2>/dev/null || { tail -20 runs_serve.log; exit 1; }
    sleep 3
done
python train.py exps/cpu_serve/config.yaml "$@"
python exps/plot.py runs/cpu_serve
