#!/usr/bin/env bash
# One GPU machine: GPU 0 trains, GPUs 1..N-1 each hold one replica of the Serve app (vLLM where it is installed,
# else the torch engine; INFER_ENGINE=torch|vllm picks).
#   bash exps/gpu_serve/run_train.sh [--max_steps=8 ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 NCCL_NVLS_ENABLE=0   # Ray on 127.0.0.1; no NVLink multicast
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 2 ] || { echo "needs 2+ GPUs (1 trainer + replicas), found $NGPU"; exit 1; }
export MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH:-random:qwen0.5b} INFER_DTYPE=bfloat16
export NUM_INFER_WORKERS=${NUM_INFER_WORKERS:-$((NGPU - 1))}
python -c "import models; models.resolve_model('$MODEL_NAME_OR_PATH')"   # build/convert once, before replicas race
CUDA_VISIBLE_DEVICES=$(seq -s, 1 "$NUM_INFER_WORKERS") ray start --head --node-ip-address 127.0.0.1 \
    --num-gpus "$NUM_INFER_WORKERS" --include-dashboard false --disable-usage-stats >/dev/null
trap 'kill $SERVE_PID 2>/dev/null || true; ray stop --force >/dev/null 2>&1 || true' EXIT
serve run --address auto infer_workers:inference_app > runs_serve.log 2>&1 &   # HTTP on 127.0.0.1:8000
SERVE_PID=$!
until python -c "import json, urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:8000/',
        json.dumps({'prompts': ['hi'], 'max_new_tokens': 1}).encode(), {'Content-Type': 'application/json'}), timeout=60)" \
        2>/dev/null; do                                            # ready when a replica answers
    kill -0 $SERVE_PID 2>/dev/null || { tail -20 runs_serve.log; exit 1; }
    sleep 3
done
python train.py exps/gpu_serve/config.yaml "$@"   # sees every GPU, trains on cuda:0 (NCCL P2P to the replicas)
python exps/plot.py runs/gpu_serve
