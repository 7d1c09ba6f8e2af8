#!/usr/bin/env bash
# SmolLM2-135M-Instruct, R1-Zero on GSM8K: baseline eval, training, final eval, res/ (docs/results.md: its rows).
#   bash exps/smollm2_r1zero/run_train.sh [--key=value ...]       e.g. --data=../shared/data/gsm8k
exec bash "$(dirname "$0")/../r1zero.sh" smollm2_r1zero "$@"
