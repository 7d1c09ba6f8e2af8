"""CUDA only (skipped without a GPU): the bf16 training path and the engine on the GPU."""
import json

import pytest
import torch

import train
from test_train import cfg_for, digit_reward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_bf16_engine_logprobs_track_fp32_trainer(tiny_model):
    """The bf16 GPU engine's sampled-token logprobs agree with the fp32 trainer's within bf16 noise."""
    from infer_workers import TorchEngine
    from models import load_model, load_tokenizer
    tok = load_tokenizer(tiny_model)
    engine = TorchEngine(load_model(tiny_model, torch.bfloat16, "cuda"), tok)
    lm = load_model(tiny_model, torch.float32, "cuda")
    prompts = [list(range(5, 40)), list(range(50, 60))]
    comps = [c for g in engine.generate(prompts, n=4, max_new_tokens=16, seed=0) for c in g]
    ids, attn, mask, old = train.collate([p for p in prompts for _ in range(4)], comps, tok.pad_token_id, "cuda")
    with torch.no_grad():
        lp, _ = train.token_logprobs(lm, ids, attn)
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
