#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct (PyPI wheels), R1-Zero on GSM8K: baseline + own-CoT reference evals, training, final
# eval, res/ (README's headline result). One GPU: the in-process engine; 2+ GPUs: the Serve app on GPUs 1..N-1.
#   bash exps/qwen_coder_r1zero/run_train.sh --data=../shared/data/gsm8k
#   bash exps/qwen_coder_r1zero/run_train.sh --run_dir=runs/qwen_coder_r1zero_ablation --prompt=r1 --format_weight=0.5 --max_steps=50
exec bash "$(dirname "$0")/../r1zero.sh" qwen_coder_r1zero "$@"
