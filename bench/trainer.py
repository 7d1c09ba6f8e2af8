"""GRPO training-step throughput and MFU, padded vs packed micro-batches, in one run. One JSON line.

    python bench/trainer.py                                  # GPU: random:qwen0.5b, 64 prompts x G=8
    python bench/trainer.py --shape small --prompts 2 --group 2 --prompt-len 8 16 --completion-len 4 24

Times train.policy_step (the exact code train.py runs: collate, chunked log-probs, grpo_loss, backward,
clip, AdamW) on one synthetic batch with realistic lengths (prompts ~200 tokens, completions 50-400),
for each variant, after one warm-up step, starting from the same weights:
  padded:         right-padded micro-batches of --padded-mb sequences, sdpa attention
  packed:         micro-batches of --packed-mb sequences concatenated into one row, varlen flash attention
  packed+ckpt:    the same with activation checkpointing (memory for time)
  packed+compile: packed, decoder layers and log-softmax chunks torch.compiled (compiled in the warm-up step)
  packed+compile+attn: the same, with the varlen attention traced into the compiled layers (models.TRACE_ATTENTION;
                  without +share only: shared prompts' attention stays eager)
  packed+compile+liger: the compiled layers, with the lm_head + log-softmax done by liger-kernel's fused linear
                  cross-entropy instead of our chunks (liger_token_logprobs; needs liger-kernel, on CPU only under
                  TRITON_INTERPRET=1)
  +share (e.g. packed+compile+share): train.Config.share_prompts on, each prompt runs once for its --group
                  completions in a micro-batch (the others have it off)
  +kl (e.g. packed+compile+share+kl): a step that logs the KL, as train.py's every log_kl_every-th: the frozen
                  reference model (the initial weights, bf16 on GPUs) runs a no-grad forward of every micro-batch,
                  its layers eager (train.py's way); +kl-compiled compiles them like the policy's
and checks that the variants' first-step losses agree. Each variant reports the graphs torch.compile had made by the
end of its warm-up step, and under "compile" the compile caches' hits and misses and where the compile time went
(compile_report; both count on through the process: a later variant adds only what it needs anew).
MFU counts model FLOPs of the work a variant does (6 * matmul params * tokens through the layers, 6 * lm_head params *
completion tokens, causal attention pairs; no recompute; +kl: the reference's forward, a third more) against
--peak-tflops; mfu_of_unshared_work counts the work as before prompt sharing and collate's "predict" (every
token of every sequence through the layers and the head) over the same time.
"""
import argparse
import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch._dynamo.utils import compilation_time_metrics, counters  # noqa: E402

from system import batches, models, run  # noqa: E402
import train  # noqa: E402
from system.config import make  # noqa: E402
from system.models import SHAPES, load_model  # noqa: E402


def liger_token_logprobs(model, inputs, temperature=1.0, chunk=1024, compiled=False):
    """batches.token_logprobs with the lm_head + log-softmax + gather done by liger-kernel's fused linear cross-entropy
    (reduction "none": -log p of each target; the head's weight cast once per micro-batch, its gradient accumulated in
    fp32, the logits recomputed in backward, never all at once). It does not give the entropy (zeros here), which
    ours computes in the same fused kernel: the variant is timed, not trained with."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    inputs = dict(inputs)
    at, targets, where, grid = inputs.pop("predict")  # collate's: only the positions that predict completion tokens
    with models.untied_sizes():  # as batches.token_logprobs
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # [R, L, H]
    kind = hidden.device.type
    dt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    h = (hidden.reshape(-1, hidden.shape[-1])[at] / temperature).to(dt)  # [M, H]: logits / T = (h / T) W^T
    head = model.get_output_embeddings()
    nll = liger_fused_linear_cross_entropy(h, head.weight.to(dt), targets, head.bias, reduction="none",
                                           accum_dtype=torch.float32)  # [M] fp32
    logp = batches.to_grid(-nll, where, grid)
    return logp, torch.zeros_like(logp)


def model_flops(lm, groups, share=False, head_on_all=False) -> float:
    """fwd + bwd FLOPs of the batch, counted on the work done: 6 per matmul weight per token through the layers, 6 per
    lm_head weight per token it runs on (the completion tokens; head_on_all: every token, as before collate's
    "predict"), plus attention over the causal pairs. groups: (prompt length, [completion lengths]) per prompt;
    share: each prompt's tokens run once for its completions, which attend to it and to themselves."""
    c = lm.config
    head = lm.get_output_embeddings().weight.numel()  # tied or not, the lm_head matmul runs
    layers = sum(p.numel() for n, p in lm.named_parameters() if p.dim() == 2 and "layers." in n)
    attn_dim = c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    tokens = sum((P if share else P * len(cs)) + sum(cs) for P, cs in groups)
    head_tokens = sum(P * len(cs) + sum(cs) if head_on_all else sum(cs) for P, cs in groups)
    pairs = sum(P * P / 2 + sum(P * n + n * n / 2 for n in cs) if share else sum((P + n) ** 2 / 2 for n in cs)
                for P, cs in groups)  # per layer: QK^T and PV, 2 * 2 * d FLOP per pair forward, x3 with backward
    return 6 * layers * tokens + 6 * head * head_tokens + 12 * c.num_hidden_layers * attn_dim * pairs


def profiled(step, activity):
    """One call of step() under torch.profiler, recording `activity` -> (the profiler, the call's wall seconds with its
    GPU work done)."""
    from torch.profiler import profile
    with profile(activities=[activity]) as prof:
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    return prof, wall


def kernel_shares(step):
    """Share of GPU kernel time per kind over one call of step(), from the profiler, and how busy the GPU was
    (kernel time / wall time of the call; kernels do not overlap on one stream). Also bench/rollout.py's."""
    from torch.profiler import ProfilerActivity
    prof, wall = profiled(step, ProfilerActivity.CUDA)
    kinds, others = {"gemm": 0.0, "attention": 0.0, "other": 0.0}, {}
    for e in prof.key_averages():
        if e.device_type.name != "CUDA":
            continue
        name = e.key.lower()
        kind = "attention" if "flash" in name or "fmha" in name or "attention" in name else \
            "gemm" if any(s in name for s in ("gemm", "gemv", "cutlass", "nvjet", "xmma", "cublas", "splitk")) else "other"
        kinds[kind] += e.self_device_time_total
        if kind == "other":
            others[e.key[:70]] = others.get(e.key[:70], 0.0) + e.self_device_time_total  # names cut: sum alike
    total = sum(kinds.values()) or 1.0
    top = sorted(others.items(), key=lambda kv: -kv[1])[:12]  # the non-GEMM kernels that cost most
    return {k: round(v / total, 3) for k, v in kinds.items()} | {
        "top_other": {k: round(v / total, 3) for k, v in top}, "gpu_busy": round(total / 1e6 / wall, 3),
        "kernel_s": round(total / 1e6, 4), "wall_s": round(wall, 4)}


def host_shares(step, top=15):
    """Where the host's time goes over one call of step() (a call of its own: recording host ops slows it, so
    kernel_shares' wall time is not this one's): the ops with the most self CPU time, each with its calls, and the
    host's recorded op time against the call's wall time. Host time that covers the GPU's is free; a step whose GPU
    idles (kernel_shares' gpu_busy well below 1) waits on what is listed here."""
    from torch.profiler import ProfilerActivity
    prof, wall = profiled(step, ProfilerActivity.CPU)
    ops = [e for e in prof.key_averages() if e.device_type.name == "CPU"]
    total = sum(e.self_cpu_time_total for e in ops)
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    return {"wall_s": round(wall, 4), "host_op_s": round(total / 1e6, 4),
            "top": {e.key[:70]: {"s": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count} for e in ops[:top]}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen0.5b", choices=sorted(SHAPES), help="random:<shape> model")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[150, 250], help="prompt lengths: uniform in [lo, hi]")
    ap.add_argument("--completion-len", type=int, nargs=2, default=[50, 400], help="completion lengths: uniform")
    ap.add_argument("--padded-mb", type=int, default=16, help="sequences per micro-batch, padded variant")
    ap.add_argument("--packed-mb", type=int, default=64, help="sequences per micro-batch, packed variants")
    ap.add_argument("--iters", type=int, default=3, help="timed steps per variant (median)")
    ap.add_argument("--logprob-chunk", type=int, default=None, help="tokens per lm_head + log-softmax chunk "
                    "(SystemConfig.logprob_chunk; default: the config's)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak: H100/H200 SXM 989")
    ap.add_argument("--variants", nargs="+", default=["padded", "packed", "packed+ckpt", "packed+compile"])
    ap.add_argument("--profile", action="store_true", help="kernel-time shares of one packed step, and where the "
                    "host's time goes in another (GPU only)")
    a = ap.parse_args()
    parts = {v: set(v.split("+")) for v in a.variants}  # "packed+compile+share" -> {"packed", "compile", "share"}
    known = {"padded", "packed", "ckpt", "compile", "attn", "liger", "share", "kl", "kl-compiled"}
    for v, p in parts.items():
        if p - known or len(p & {"padded", "packed"}) != 1:
            ap.error(f"variant {v}: padded or packed, then any of +{' +'.join(sorted(known - {'padded', 'packed'}))}")
        if {"attn", "share"} <= p:
            ap.error("+attn needs no +share: models.TRACE_ATTENTION traces attention without shared prompts only")
    compiled = ["compile" in parts[v] for v in a.variants]
    assert compiled == sorted(compiled), "compiled variants go last: compiled layers stay compiled"
    from accelerate import Accelerator

    gpu = torch.cuda.is_available()
    acc = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu else "no")
    rng = random.Random(0)
    lm = load_model(f"random:{a.shape}", torch.float32, acc.device)
    vocab = lm.config.vocab_size
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(*a.prompt_len))] for _ in range(a.prompts)]
    seq_prompts = [p for p in prompts for _ in range(a.group)]
    completions = []
    for _ in seq_prompts:
        n = rng.randint(*a.completion_len)
        completions.append({"token_ids": [rng.randrange(2, vocab) for _ in range(n)],
                            "logprobs": [-math.log(vocab)] * n})  # ~ a random model's: ratio ~ 1
    adv = torch.randn(len(completions), generator=torch.Generator().manual_seed(0)).to(acc.device)
    lengths = [len(p) + len(c["token_ids"]) for p, c in zip(seq_prompts, completions)]
    groups = [(len(p), [len(c["token_ids"]) for c in completions[i * a.group:(i + 1) * a.group]])
              for i, p in enumerate(prompts)]
    flops = model_flops(lm, groups, head_on_all=True)  # the work before collate's "predict" and prompt sharing
    init = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    token_logprobs = batches.token_logprobs  # ours; the liger variant swaps in its own

    out = {"bench": "trainer", "device": torch.cuda.get_device_name() if gpu else "cpu", "shape": a.shape,
           "sequences": len(completions), "tokens": sum(lengths), "model_tflop_per_step": round(flops / 1e12, 1)}
    losses = {}
    for variant in a.variants:
        on = parts[variant]
        cfg = make(train.Config, dict(prompts_per_step=a.prompts, group_size=a.group, max_new_tokens=a.completion_len[1],
                                      packing="packed" in on, grad_checkpointing="ckpt" in on,
                                      share_prompts="share" in on, compile="compile" in on,
                                      micro_batch_size=a.packed_mb if "packed" in on else a.padded_mb)
                   | ({"logprob_chunk": a.logprob_chunk} if a.logprob_chunk else {}))
        lm.load_state_dict(init)
        lm.set_attn_implementation("sdpa")
        if cfg.system.packing:
            models.use_packed_attention(lm)
        lm.gradient_checkpointing_enable() if cfg.system.grad_checkpointing else lm.gradient_checkpointing_disable()
        if cfg.system.compile:
            models.compile_model(lm)
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-6, fused=gpu)
        batches.token_logprobs = liger_token_logprobs if "liger" in on else token_logprobs
        models.TRACE_ATTENTION = "attn" in on
        policy, opt = acc.prepare(batches.Policy(lm, cfg.system.compile), opt)
        ref = None
        if on & {"kl", "kl-compiled"}:  # as run.load_models makes it
            ref = load_model(f"random:{a.shape}", models.default_dtype(acc.device), acc.device).requires_grad_(False)
            if cfg.system.packing:
                models.use_packed_attention(ref)
            if cfg.system.compile and "kl-compiled" in on:
                models.compile_model(ref)

        def step():
            return train.policy_step(acc, policy, ref, opt, seq_prompts, completions, adv, cfg, pad_id=0)[0]

        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        first = step()  # warm-up, from the initial weights: comparable across variants
        losses[variant] = first["loss"].item()
        warmup_s = time.perf_counter() - t  # compilation included
        graphs = run.compiled_so_far()["compiled_graphs"]  # made so far in this process
        compiling = compile_report()  # so far in this process too
        times = []
        for _ in range(a.iters):
            t = time.perf_counter()
            step()
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        with_ref = 4 / 3 if ref is not None else 1  # + the reference's forward: a third of a forward + backward
        s, done = min(times), model_flops(lm, groups, share=cfg.system.share_prompts and cfg.system.packing) * with_ref
        out[variant] = {"step_s": round(s, 3), "tok_s": round(sum(lengths) / s), "model_tflop": round(done / 1e12, 1),
                        "mfu": round(done / s / (a.peak_tflops * 1e12), 3),  # on the work this variant does
                        "mfu_of_unshared_work": round(flops * with_ref / s / (a.peak_tflops * 1e12), 3),  # as before
                        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if gpu else None,
                        "micro_batch": cfg.system.micro_batch_size, "logprob_chunk": cfg.system.logprob_chunk,
                        "warmup_step_s": round(warmup_s, 1),
                        "compiled_graphs": graphs, "compile": compiling} | (
                            {"first_step_kl": first["kl"].item()} if ref is not None else {})
        if a.profile and gpu and "packed" in on and "ckpt" not in on:
            out[variant]["kernel_time_share"] = kernel_shares(step)
            out[variant]["host_time"] = host_shares(step)
        del policy, opt, ref
        acc.free_memory()
    base = losses[a.variants[0]]
    out["first_step_loss"] = {k: round(v, 6) for k, v in losses.items()}
    out["max_loss_rel_diff"] = max(abs(v - base) / max(abs(base), 1e-8) for v in losses.values())
    if "padded" in out and "packed" in out:
        out["packed_speedup"] = round(out["padded"]["step_s"] / out["packed"]["step_s"], 2)
    print(json.dumps(out))


# where a warm-up's compile time goes (torch's own timers, seconds summed over the process), by phase beside Dynamo's
# whole compile (run.compiled_so_far's compile_s): its bytecode tracing, Inductor's lowering and code generation,
# waiting for the kernels' compilers
PHASES = {"tracing_s": "bytecode_tracing", "inductor_s": "fx_codegen_and_compile",
          "kernel_compile_wait_s": "async_compile.wait"}


def compile_report() -> dict:
    """The process's compile work so far: Inductor's FX-graph cache and AOTAutograd's cache (hits, misses: with
    TORCHINDUCTOR_CACHE_DIR kept from an earlier process, a warm start misses no Inductor graph), Dynamo's compile
    seconds and PHASES' seconds."""
    fx, aot = counters["inductor"], counters["aot_autograd"]
    return {"fx_cache_hit": fx["fxgraph_cache_hit"], "fx_cache_miss": fx["fxgraph_cache_miss"],
            "aot_cache_hit": aot["autograd_cache_hit"], "aot_cache_miss": aot["autograd_cache_miss"],
            "dynamo_s": run.compiled_so_far()["compile_s"]} | {
        k: round(sum(compilation_time_metrics.get(name, [])), 2) for k, name in PHASES.items()}


if __name__ == "__main__":
    main()
