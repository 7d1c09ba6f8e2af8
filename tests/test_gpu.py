"""CUDA only (skipped without a GPU): the bf16 training path and the engine on the GPU."""
import json

import pytest
import torch
import torch.nn.functional as F

import models
import train
from test_train import cfg_for, digit_reward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_bf16_engine_logprobs_track_fp32_trainer(tiny_model):
    """The bf16 GPU engine's sampled-token logprobs agree with the fp32 trainer's within bf16 noise."""
    from engine import TorchEngine
    from models import load_model, load_tokenizer
    tok = load_tokenizer(tiny_model)
    engine = TorchEngine(load_model(tiny_model, torch.bfloat16, "cuda"), tok)
    lm = load_model(tiny_model, torch.float32, "cuda")
    prompts = [list(range(5, 40)), list(range(50, 60))]
    comps = [c for g in engine.generate(prompts, n=4, max_new_tokens=16, seed=0) for c in g]
    inputs, mask, old = train.collate([p for p in prompts for _ in range(4)], comps, tok.pad_token_id, "cuda")
    with torch.no_grad():
        lp, _ = train.token_logprobs(lm, inputs)
    err = ((lp - old).abs() * mask).sum() / mask.sum()
    assert err < 0.05, f"mean |logp_engine - logp_trainer| = {err:.4f} nats"


def test_two_steps_bf16_on_cuda(tiny_model, tmp_path):
    """train.main on CUDA with bf16 autocast: finite loss, weights move, the engine follows (versions)."""
    cfg = cfg_for(tiny_model, tmp_path / "gpu", max_steps=3, kl_coef=0.05)
    policy = train.main(cfg, reward_fn=digit_reward)
    rows = [json.loads(line) for line in open(tmp_path / "gpu" / "metrics.jsonl")]
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"], r["kl"]])).all() for r in rows)
    assert any(r["grad_norm"] > 0 for r in rows)
    assert next(policy.parameters()).device.type == "cuda"


def test_packed_varlen_attention_matches_padded_on_cuda(tiny_model):
    """The flash varlen path (packing) gives the padded sdpa path's log-probs and gradients, in bf16."""
    import copy
    from models import load_model
    lm = load_model(tiny_model, torch.float32, "cuda")
    packed_lm = models.use_packed_attention(copy.deepcopy(lm))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (7, 30, 3, 64)]
    comps = [{"token_ids": torch.randint(2, 500, (n,), generator=g).tolist(), "logprobs": [-1.0] * n} for n in (40, 5, 90, 17)]
    out = []
    for model, packed in ((lm, False), (packed_lm, True)):
        inputs, mask, _ = train.collate(prompts, comps, 0, "cuda", packed=packed)
        with torch.autocast("cuda", torch.bfloat16):
            lp, _ = train.token_logprobs(model, inputs)
        (lp * mask).sum().backward()
        out.append((lp.detach() * mask, model.model.layers[0].self_attn.k_proj.weight.grad))
    assert (out[0][0] - out[1][0]).abs().max() < 0.05  # bf16 noise, nats
    cos = F.cosine_similarity(out[0][1].flatten(), out[1][1].flatten(), 0)
    assert cos > 0.99, f"gradient cosine {cos:.4f}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_gpu_step_matches_one_gpu(mode, tmp_path):
    """bench/multi_gpu.py: one GRPO step on 2 ranks (DDP / FSDP2) = 1 rank: loss, grad norm, gathered weights."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = [os.path.join(root, "bench", "multi_gpu.py"), "--shape", "small", "--ref", str(tmp_path)]
    env = os.environ | {"NCCL_NVLS_ENABLE": "0"}
    subprocess.run([sys.executable] + script, check=True, env=env | {"CUDA_VISIBLE_DEVICES": "0"}, timeout=600)
    launch = {"ddp": ["--multi_gpu"],
              "fsdp2": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                        "--fsdp_transformer_layer_cls_to_wrap", "Qwen2DecoderLayer",
                        "--fsdp_state_dict_type", "FULL_STATE_DICT"]}[mode]
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", *launch, *script],
                         check=True, env=env, timeout=600, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["world"] == 2 and r["loss_rel_diff"] < 1e-2 and r["grad_norm_rel_diff"] < 2e-2, json.dumps(r)
    assert r["weights_rel_err_max"] < 5e-2, json.dumps(r)
