#!/usr/bin/env bash
# Qwen2.5-0.5B (base), R1-Zero on GSM8K: baseline eval, training, final eval, res/. Needs the hub (model, data).
#   bash exps/qwen05b_r1zero/run_train.sh [--key=value ...]
exec bash "$(dirname "$0")/../r1zero.sh" qwen05b_r1zero "$@"
