#!/usr/bin/env bash
# Short GSM8K run of SmolLM2-135M on this CPU, then the plot. Extra args override the config:
#   bash exps/cpu_smollm2/run_train.sh --max_steps=20
set -euo pipefail
cd "$(dirname "$0")/../.."
python train.py exps/cpu_smollm2/config.yaml "$@"
python exps/plot.py runs/cpu_smollm2
