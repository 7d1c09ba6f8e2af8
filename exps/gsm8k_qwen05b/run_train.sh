#!/usr/bin/env bash
# Qwen2.5-0.5B-Instruct on GSM8K, one node. NUM_GPUS defaults to every visible GPU. Extra args override the config.
set -euo pipefail
cd "$(dirname "$0")/../.."
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
accelerate launch --num_processes "$NUM_GPUS" --mixed_precision bf16 train.py exps/gsm8k_qwen05b/config.yaml "$@"
python plot.py runs/gsm8k_qwen05b
