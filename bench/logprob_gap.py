"""Sampler vs trainer log-probs on a real model, one JSON line per engine; and the trainer's speed paths against its
reference path on the same sampled batch, one more line.

    python bench/logprob_gap.py                              # SmolLM2-135M, the torch engine and vLLM (if installed)
    python bench/logprob_gap.py --engines torch --prompts 256 # GPU: bf16 engine vs fp32 trainer under bf16 autocast
    python bench/logprob_gap.py --model qwen-coder --engines torch_compiled torch_unfused --prompts 64 --group 8 \
        --max-new-tokens 300 --trainer-paths                  # the recipe's engine and trainer paths (GPU)

Engines: torch (TorchEngine: fused q/k/v and gate/up, CUDA graphs on GPUs), torch_compiled (+ the compiled decode
step: the recipe's compile_engine), torch_unfused (separate GEMMs, eager step: the reference path), vllm.
--trainer-paths: the first engine's batch, its log-probs by train.py's paths: padded (eager, one row per sequence:
the reference), packed, packed + shared prompts, packed + shared prompts + torch.compile (the recipe's), each
against padded: mean and max |delta| per completion token ("trainer_paths" line).

GRPO's importance ratio divides the trainer's probability of each sampled token by the sampler's. Both should be
the same distribution, softmax(logits / T), but the engine computes it in its own dtype and kernels. For the first
--prompts GSM8K training questions x --group samples (T = --temperature, top_p 1), this measures, per completion
token, |sampler logprob - trainer logprob| (mean, p50, p99, max) and the ratio exp(trainer - sampler) it makes at the
first step, before any update (ideally 1: mean, p1, p99, min, max, and the share outside the clip range [0.8, 1.28]).
The trainer is train.py's: fp32 weights, token_logprobs, bf16 autocast on CUDA. Baseline in the same run: the
trainer against itself (a second identical forward), the noise floor of the comparison.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import gsm8k  # noqa: E402
from system import batches  # noqa: E402
from infer_workers import make_engine  # noqa: E402
from system.models import load_model, load_tokenizer  # noqa: E402


def trainer_logprobs(lm, prompts, comps, temperature, mb=16, packed=False, share=False, compiled=False):
    """train.py's log-probs of each completion's tokens: [per completion: list of floats]. packed / share: collate's
    packed rows / shared prompts (lm must use packed attention); compiled: the log-softmax chunks compiled too (the
    layers are compiled by models.compile_model beforehand)."""
    dev, out = lm.device, []
    for i in range(0, len(comps), mb):
        inputs, mask, _ = batches.collate(prompts[i:i + mb], comps[i:i + mb], 0, dev, packed, share)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            lp, _ = batches.token_logprobs(lm, inputs, temperature, compiled=compiled)
        for row, m in zip(lp.float().cpu(), mask.cpu().bool()):
            out.append(row[m].tolist())
    return out


def stats(sampler, trainer) -> dict:
    s = torch.tensor([x for c in sampler for x in c], dtype=torch.float64)
    t = torch.tensor([x for c in trainer for x in c], dtype=torch.float64)
    gap, ratio = (s - t).abs(), torch.exp(t - s)
    q = lambda x, p: round(torch.quantile(x, p).item(), 6)  # noqa: E731
    return {"tokens": len(s), "gap_mean": round(gap.mean().item(), 6), "gap_p50": q(gap, 0.5), "gap_p99": q(gap, 0.99),
            "gap_max": round(gap.max().item(), 6), "ratio_mean": round(ratio.mean().item(), 6),
            "ratio_p1": q(ratio, 0.01), "ratio_p99": q(ratio, 0.99), "ratio_min": round(ratio.min().item(), 6),
            "ratio_max": round(ratio.max().item(), 6),
            "outside_clip": round(((ratio < 0.8) | (ratio > 1.28)).double().mean().item(), 6),
            # which side: a sampled token is more often one the sampler overrates (ratio below 1) than one it
            # underrates, and PPO's clip gives an overrated token (below 0.8) no push-down from a negative advantage
            "below_clip": round((ratio < 0.8).double().mean().item(), 6),
            "above_clip": round((ratio > 1.28).double().mean().item(), 6)}


def make(kind, model, max_batch, dtype="auto"):
    """An engine by name (module docstring), its weights in dtype (auto: models.default_dtype, bf16 on GPUs)."""
    if kind == "vllm":
        return make_engine(model, "vllm", dtype)
    return make_engine(model, "torch", dtype, max_batch=max_batch, compile=kind == "torch_compiled",
                       fuse=kind != "torch_unfused")


def trainer_paths(a, dev, prompts, comps) -> dict:
    """The trainer's log-probs of one batch by each of its paths, against the padded eager one."""
    from system.models import compile_model, use_packed_attention
    padded = load_model(a.model, torch.float32, dev).eval()
    ref = trainer_logprobs(padded, prompts, comps, a.temperature, a.trainer_mb)
    out = {"padded_vs_itself_gap_max": stats(trainer_logprobs(padded, prompts, comps, a.temperature, a.trainer_mb),
                                             ref)["gap_max"]}
    del padded
    packed = use_packed_attention(load_model(a.model, torch.float32, dev).eval())
    for name, share in (("packed", False), ("packed+share", True)):
        out[name] = stats(trainer_logprobs(packed, prompts, comps, a.temperature, a.trainer_mb, True, share), ref)
    compile_model(packed)
    out["packed+share+compile"] = stats(trainer_logprobs(packed, prompts, comps, a.temperature, a.trainer_mb, True,
                                                         True, compiled=True), ref)
    return out


def main():
    import importlib.util
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "gsm8k"))
    ap.add_argument("--engines", nargs="+", default=["torch"] + (["vllm"] if importlib.util.find_spec("vllm") else []))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-batch", type=int, default=0, help="TorchEngine rows (0: system.engine.default_max_batch)")
    ap.add_argument("--engine-dtype", default="auto", help="the engines' weights: auto (bf16 on GPUs, fp32 on the CPU), "
                    "bfloat16 (the GPU's mismatch, on the CPU), float32")
    ap.add_argument("--trainer-paths", action="store_true", help="also the trainer's paths against padded eager")
    ap.add_argument("--trainer-mb", type=int, default=16, help="sequences per trainer forward")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(a.model)
    questions = [r["question"] for r in gsm8k.load_split(a.data, "train")[:a.prompts]]
    prompts = gsm8k.build_prompts(tok, questions)
    lm = load_model(a.model, torch.float32, dev).eval()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    seq_prompts, first = [p for p in prompts for _ in range(a.group)], None
    for kind in a.engines:
        engine = make(kind, a.model, a.max_batch, a.engine_dtype)
        groups = engine.generate(prompts, n=a.group, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=0)
        comps = [c for g in groups for c in g]
        first = first or comps
        trainer = trainer_logprobs(lm, seq_prompts, comps, a.temperature, a.trainer_mb)
        out = {"bench": "logprob_gap", "device": name, "model": a.model, "engine": kind, "engine_dtype": engine.dtype,
               "temperature": a.temperature, "completions": len(comps),
               "cut": sum(c["finish_reason"] == "length" for c in comps) / len(comps)} | \
            stats([c["logprobs"] for c in comps], trainer)
        again = trainer_logprobs(lm, seq_prompts, comps, a.temperature, a.trainer_mb)  # baseline: trainer vs trainer
        out["trainer_vs_itself_gap_max"] = stats(again, trainer)["gap_max"]
        print(json.dumps(out), flush=True)
        del engine
    if a.trainer_paths:
        del lm
        out = {"bench": "logprob_gap", "mode": "trainer_paths", "device": name, "model": a.model,
               "batch_from": a.engines[0], "completions": len(first)} | trainer_paths(a, dev, seq_prompts, first)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
