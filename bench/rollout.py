"""Rollout throughput: vLLM vs our TorchEngine vs stock HF `generate`, in one run. One JSON line.

    python bench/rollout.py                                     # GPU: random:qwen0.5b in bf16, bs 512, 256 and 64
    python bench/rollout.py --shape small --device cpu --batch 8 4 --new-tokens 32 --fp32-batch 4
    python bench/rollout.py --model qwen-coder --data ../shared/data/gsm8k   # the real workload (below)

The real workload (--model): a real model on GSM8K training prompts as a run samples them (the run's prompt, T = 1,
--n completions per prompt, --prompts prompts per call, <= --new-tokens each), so completions stop at their own
lengths. Variants (--workload-variants), each timed on --iters calls of fresh prompts after a warm-up call:
  static:     TorchEngine as before continuous batching (continuous=False): batches of --max-batch rows, each run
              until its longest row stops
  continuous: TorchEngine, a stopped row's slot taken by the next waiting sequence (--max-batch rows)
  continuous_compiled: the same with compile=True (decode forward and the exponential-race sampler compiled)
  NAME_unfused (e.g. continuous_compiled_unfused): the same with fuse=False (q/k/v and gate/up as separate GEMMs)
  NAME@ROWS (e.g. continuous_compiled@512): variant NAME with ROWS cache rows instead of --max-batch
  vllm:       vLLM in this process with its defaults (continuous batching, CUDA graphs, prefix caching), logprobs on
Reported per variant: completions/s and sampled tok/s (median call), the completion lengths (mean, p50, p90, max,
share cut at the cap) and, for ours, the decode steps and prefills the call ran, its time per decode step, the rows
those steps ran over (row_steps) and how often busy rows were moved down (compactions).
--profile: for ours, one more call under torch.profiler: GPU kernel-time shares (GEMM, attention, the top others),
how busy the GPU was (kernel time / wall time), and GPU kernel time per decode step beside wall time per step.

The shape sweep (default):

Prompts are random token ids (fixed seed, lengths drawn from --prompt-len), left-padded. Every row
generates exactly --new-tokens: the eos is an id no row can emit (the vocab size) in our engine and stock, and vLLM
ignores eos, so all do identical work. Variants (--variants; the first is the baseline the others are compared
with), per batch size, each after a warm-up:
  stock:  model.generate(do_sample=False), its default dynamic cache (timed --stock-iters times: it is slow)
  graphs: TorchEngine with its static cache, decode steps replayed as CUDA graphs (CUDA only)
  eager:  TorchEngine with its static cache, no graphs
  graphs_compiled, eager_unfused, ...: those with compile=True (_compiled) or fuse=False (_unfused)
  vllm:   vLLM as its defaults run it (engine core in its own process, async scheduling, CUDA graphs), prompts as
          token ids, the sampled token's logprob on (logprobs=0, as the trainer asks); also timed with logprobs off
  vllm_inproc: the same engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), as a Serve replica runs it
tokens/s = rows x new tokens / s (median). Ours and vLLM are timed end to end (sampling, logprobs, lists and text
included); stock returns a tensor. Checks: the share of rows whose greedy tokens equal stock's, and where the others
first differ (bf16 near-ties can flip); then ours on a smaller fp32 copy (--fp32-batch rows), where every row should
match. Peak memory is the CUDA allocator's peak during the variant's timed runs, weights included (not for vLLM,
which takes --vllm-memory of the card up front); each engine is built fresh and freed after its variant.
"""
import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from system.engine import TorchEngine, hf_greedy  # noqa: E402
from system.models import SHAPES, load_model, load_tokenizer  # noqa: E402
from system.models import DTYPES  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, iters, dev):
    """(median seconds over iters runs, the last run's result)."""
    times = []
    for _ in range(iters):
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def ours_generate(engine, prompts, new_tokens):
    return [g[0]["token_ids"] for g in engine.generate(prompts, max_new_tokens=new_tokens, temperature=0)]


def vllm_engine(name, dtype, max_seqs, max_len, memory):
    """vLLM as it runs by default (CUDA graphs, async scheduling), room for every row in one batch."""
    from vllm import LLM
    from system.models import resolve_model
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # FlashInfer is not installed on our GPU machines
    return LLM(model=resolve_model(name), dtype=str(dtype).removeprefix("torch."), max_model_len=max_len, seed=0,
               gpu_memory_utilization=memory, max_num_seqs=max_seqs, logprobs_mode="processed_logprobs")


def vllm_generate(llm, prompts, new_tokens, logprobs):
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0 if logprobs else None)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def agreement(got, want) -> dict:
    """Share of rows equal token for token, and the mean index of the first differing token among the others."""
    first = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
             for g, w in zip(got, want) if g != w]
    return {"identical_rows": round(1 - len(first) / len(want), 4),
            "first_divergence_mean": round(statistics.mean(first), 1) if first else None}


def engine_flags(variant):
    """TorchEngine options a variant's name asks for: _compiled (compile=True), _unfused (fuse=False)."""
    return {"compile": "_compiled" in variant, "fuse": "_unfused" not in variant}


def real_workload(a):
    """--model: a real model on GSM8K training prompts, sampled as a run samples them (see the module docstring)."""
    import gsm8k
    dev = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bfloat16" if dev.type == "cuda" else "float32")]
    model, tok = load_model(a.model, dtype, dev), load_tokenizer(a.model)
    rows = gsm8k.split_train_val(gsm8k.load_split(a.data, "train"), 500)[0]
    order = gsm8k.Sampler(len(rows), seed=0).next(a.prompts * (a.iters + 1))
    calls = [gsm8k.build_prompts(tok, [rows[i]["question"] for i in order[k * a.prompts:(k + 1) * a.prompts]], a.prompt)
             for k in range(a.iters + 1)]  # call 0 warms up; every timed call has prompts of its own
    out = {"bench": "rollout_real", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "model": a.model, "params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype)[6:],
           "prompt": a.prompt, "prompts": a.prompts, "n": a.n, "new_tokens": a.new_tokens, "max_batch": a.max_batch,
           "iters": a.iters, "prompt_len_mean": round(statistics.mean(len(p) for p in calls[1]), 1)}

    def measure(v):  # -> this variant's figures
        if v == "vllm":
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            llm = vllm_engine(a.model, dtype, a.prompts * a.n, max(map(len, sum(calls, []))) + a.new_tokens,
                              a.vllm_memory)
            from vllm import SamplingParams

            def run(prompts, seed):
                sp = SamplingParams(n=a.n, temperature=1.0, max_tokens=a.new_tokens, logprobs=0, seed=seed)
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
                return [len(c.token_ids) for o in outs for c in o.outputs], None
        else:
            name, _, rows = v.partition("@")
            e = TorchEngine(model, tok, max_batch=int(rows or a.max_batch), continuous=name.startswith("continuous"),
                            **engine_flags(name), max_model_len=max(map(len, sum(calls, []))) + a.new_tokens)

            def run(prompts, seed):
                groups = e.generate(prompts, n=a.n, max_new_tokens=a.new_tokens, temperature=1.0, seed=seed)
                return [len(c["token_ids"]) for g in groups for c in g], e.last_stats
        timed(lambda: run(calls[0], 0), 1, dev)  # warm-up: caches, CUDA graphs, vLLM's compile
        times, lens, steps_run = [], [], []
        for k in range(1, a.iters + 1):
            s, (n_tok, n_steps) = timed(lambda: run(calls[k], k), 1, dev)
            times.append(s)
            lens += n_tok
            steps_run.append(n_steps)
        s = statistics.median(times)
        q = statistics.quantiles(lens, n=10)
        res = {"call_s": round(s, 3), "completions_per_s": round(a.prompts * a.n / s, 1),
               "tok_s": round(sum(lens) / a.iters / s, 1), "len_mean": round(statistics.mean(lens), 1),
               "len_p50": statistics.median(lens), "len_p90": q[-1], "len_max": max(lens),
               "cut_at_cap": round(sum(n >= a.new_tokens for n in lens) / len(lens), 4)}
        if steps_run[0] is not None:  # ours: what the median call ran
            res |= {k: statistics.median(st[k] for st in steps_run)
                    for k in ("decode_steps", "prefills", "row_steps", "compactions")}
            res["ms_per_decode_step"] = round(1000 * s / res["decode_steps"], 2)
        if a.profile and v != "vllm" and dev.type == "cuda":  # one more call (the first timed call's prompts), profiled
            from trainer import kernel_shares
            holder = {}
            prof = kernel_shares(lambda: holder.update(r=run(calls[1], 1)))
            n_steps = holder["r"][1]["decode_steps"]
            res["profile"] = prof | {"ms_per_decode_step": round(prof["wall_s"] * 1000 / n_steps, 2),
                                     "gpu_ms_per_decode_step": round(prof["kernel_s"] * 1000 / n_steps, 2)}
        return res

    for v in a.workload_variants:
        try:
            out[v] = res = measure(v)
        except Exception as e:  # reported, and the other variants still run
            out[v] = res = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(f"{v}: {res}", file=sys.stderr, flush=True)  # a run cut short keeps these
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = a.workload_variants[0]
    for v in a.workload_variants[1:]:
        if "call_s" in out[v] and "call_s" in out[base]:
            out[f"{v}_over_{base}"] = round(out[base]["call_s"] / out[v]["call_s"], 2)
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen0.5b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batch", type=int, nargs="+", default=[512, 256, 64], help="rows per generate call")
    ap.add_argument("--variants", nargs="+", default=None, help="default: stock graphs eager (+ vllm vllm_inproc if "
                    "installed) on CUDA, stock eager on the CPU")
    ap.add_argument("--vllm-memory", type=float, default=0.5, help="vLLM's gpu_memory_utilization")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[150, 250], help="prompt lengths: uniform in [lo, hi]")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3, help="timed runs of our engine (median)")
    ap.add_argument("--stock-iters", type=int, default=1, help="timed runs of stock generate (median)")
    ap.add_argument("--fp32-batch", type=int, default=32, help="rows of the fp32 equality check (0: skip)")
    real = ap.add_argument_group("the real workload (--model)")
    real.add_argument("--model", default="", help="a real model (hub name, folder, smollm2, qwen-coder): the real "
                      "workload instead of the shape sweep")
    real.add_argument("--data", default="openai/gsm8k", help="GSM8K: hub dataset or local folder")
    real.add_argument("--prompt", default="r1_example", help="gsm8k.PROMPTS name (the run's)")
    real.add_argument("--prompts", type=int, default=64, help="prompts per call")
    real.add_argument("--n", type=int, default=8, help="completions per prompt")
    real.add_argument("--max-batch", type=int, default=256, help="TorchEngine cache rows")
    real.add_argument("--profile", action="store_true", help="our engine: GPU kernel-time shares of one more call, "
                      "how busy the GPU was, and GPU time per decode step (torch.profiler)")
    real.add_argument("--workload-variants", nargs="+", default=None, help="default: static continuous (+ vllm "
                      "if installed, on CUDA)")
    a = ap.parse_args()
    if a.model:
        a.new_tokens = a.new_tokens if "--new-tokens" in sys.argv else 300
        a.workload_variants = a.workload_variants or ["static", "continuous"] + (
            ["vllm"] if importlib.util.find_spec("vllm") and torch.device(a.device).type == "cuda" else [])
        return real_workload(a)
    dev = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bfloat16" if dev.type == "cuda" else "float32")]
    name = f"random:{a.shape}"
    model, tok = load_model(name, dtype, dev), load_tokenizer(name)
    V = model.config.vocab_size
    eos = [V]  # no row can emit it: every row runs to --new-tokens in both engines
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(a.prompt_len[0], a.prompt_len[1] + 1, (max(a.batch),), generator=g)
    prompts = [torch.randint(2, V, (int(n),), generator=g).tolist() for n in lengths]
    variants = a.variants or (["stock", "graphs", "eager"] + (["vllm", "vllm_inproc"] if importlib.util.find_spec(
        "vllm") else []) if dev.type == "cuda" else ["stock", "eager"])
    torch_variants = [v for v in variants if not v.startswith("vllm")]

    def engine(variant, model, max_batch):
        e = TorchEngine(model, tok, max_batch=max_batch, cuda_graphs=variant.startswith("graphs"),
                        **engine_flags(variant))
        e.eos = torch.tensor(eos, device=dev)
        return e

    def peak_mb():
        return round(torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else None

    out = {"bench": "rollout", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "shape": a.shape, "params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype)[6:],
           "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "iters": a.iters, "stock_iters": a.stock_iters}
    results, all_tokens = {B: {} for B in a.batch}, {B: {} for B in a.batch}
    for B in a.batch:
        batch, res, tokens = prompts[:B], results[B], all_tokens[B]
        for v in torch_variants:
            if v == "stock":
                hf_greedy(model, batch, 8, eos)  # warm-up: kernels, allocator
                run, iters = (lambda: hf_greedy(model, batch, a.new_tokens, eos)), a.stock_iters
            else:
                e = engine(v, model, B)
                first_s, _ = timed(lambda: ours_generate(e, batch, a.new_tokens), 1, dev)  # warm-up: cache, graphs
                res[f"{v}_first_run_s"] = round(first_s, 2)
                run, iters = (lambda: ours_generate(e, batch, a.new_tokens)), a.iters
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            s, tokens[v] = timed(run, iters, dev)
            res |= {f"{v}_tok_s": round(B * a.new_tokens / s, 1), f"{v}_peak_mb": peak_mb()}
            print(f"bs{B} {v}: {res[f'{v}_tok_s']} tok/s", file=sys.stderr, flush=True)  # a run cut short keeps these
            run = e = None  # free this variant's engine (cache, graphs) before the next one
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    for v in [v for v in variants if v.startswith("vllm")]:  # one engine for every batch size
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if v == "vllm_inproc" else "1"
        llm = vllm_engine(name, dtype, max(a.batch), a.prompt_len[1] + a.new_tokens, a.vllm_memory)
        for B in a.batch:
            res, batch = results[B], prompts[:B]
            t0 = time.perf_counter()
            vllm_generate(llm, batch, a.new_tokens, logprobs=True)  # warm-up
            res[f"{v}_first_run_s"] = round(time.perf_counter() - t0, 2)
            s_on, all_tokens[B][v] = timed(lambda: vllm_generate(llm, batch, a.new_tokens, logprobs=True), a.iters, dev)
            s_off, _ = timed(lambda: vllm_generate(llm, batch, a.new_tokens, logprobs=False), a.iters, dev)
            res |= {f"{v}_tok_s": round(B * a.new_tokens / s_on, 1), f"{v}_logprobs_off_tok_s": round(B * a.new_tokens / s_off, 1)}
            print(f"bs{B} {v}: {res[f'{v}_tok_s']} tok/s ({res[f'{v}_logprobs_off_tok_s']} without logprobs)",
                  file=sys.stderr, flush=True)
        llm = None
        gc.collect()
    base = variants[0]  # the baseline: stock by default
    for B in a.batch:
        res, tokens = results[B], all_tokens[B]
        for v in variants[1:]:
            res[f"{v}_over_{base}"] = round(res[f"{v}_tok_s"] / res[f"{base}_tok_s"], 2)
            res |= {f"{v}_vs_{base}_{k}": x for k, x in agreement(tokens[v], tokens[base]).items()}
        if "graphs" in tokens and "eager" in tokens:
            res["graphs_vs_eager_identical_rows"] = agreement(tokens["graphs"], tokens["eager"])["identical_rows"]
        out[f"bs{B}"] = res
    if a.fp32_batch and len(torch_variants) > 1:  # fp32: no bf16 near-ties, so ours should equal stock row for row
        del model
        model32 = load_model(name, torch.float32, dev)
        batch = prompts[:a.fp32_batch]
        want = hf_greedy(model32, batch, a.new_tokens, eos)
        got = ours_generate(engine(torch_variants[1], model32, len(batch)), batch, a.new_tokens)
        out |= {f"fp32_{torch_variants[1]}_vs_stock_{k}": x for k, x in agreement(got, want).items()}
        out["fp32_batch"] = a.fp32_batch
    print(json.dumps(out))


if __name__ == "__main__":
    main()
