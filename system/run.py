"""What train.py's loop needs that is not the algorithm: the data and models a run starts with, the engine each rank
samples from and the weight push to it, multi-GPU care (FSDP2 settings, a check after prepare, full tensors from
shards), full checkpoints (written atomically) and their resume, the clean stop of a time-limited job, the metrics
log and its health checks, and the command line's last word on a bad setting.

Under DDP or one process these are thin: every rank holds whole tensors. Under FSDP2 (accelerate launch
--use_fsdp --fsdp_version 2) each rank holds DTensor shards; everything here that gathers is a collective,
so every rank calls it, in the same order.
"""
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import sys
import time

import torch
import yaml

from rewards import STAT_KEYS, repetition
from system.config import ConfigError


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


def full_tensor(t):
    """A DTensor (an FSDP2 shard, or a result computed from shards) -> the whole tensor as a plain one; other tensors
    as they are. Gathering is a collective: every rank makes the same calls in the same order."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_model_state(acc, policy):
    """(the HF model, its state dict for save_pretrained): None = its own, which rank 0 holds whole (one process, DDP).
    Under FSDP2 each rank holds shards (DTensors), gathered here, full, onto rank 0's CPU: a collective, every rank
    calls it."""
    lm = acc.unwrap_model(policy).lm
    if not acc.is_fsdp2:
        return lm, None
    full = acc.get_state_dict(policy)  # {"lm.<name>": full tensor} on rank 0's CPU, {} elsewhere
    # a tied lm_head comes back as its own copy of embed_tokens, which save_pretrained would write too: drop it
    tied = dict(lm.named_parameters(remove_duplicate=False)).keys() - dict(lm.named_parameters()).keys()
    return lm, {k.removeprefix("lm."): v for k, v in full.items() if k.removeprefix("lm.") not in tied}


def write_model(lm, model_sd, tok, cfg, path):
    """An HF model folder that gsm8k.py and the engines load, with what it was trained with (its prompt and cap)."""
    lm.save_pretrained(path, state_dict=model_sd)
    tok.save_pretrained(path)
    from gsm8k import TRAINED_WITH
    with open(os.path.join(path, TRAINED_WITH), "w") as f:  # gsm8k.py evaluates it with the same prompt
        json.dump({"prompt": cfg.prompt, "max_new_tokens": cfg.max_new_tokens}, f)


def save_checkpoint(acc, policy, tok, opt, sched, sampler_state, cfg, step, version=None):
    """Write ckpt/step_N atomically (a .tmp folder renamed into place), then point ckpt/latest at it.
    sampler_state: the data sampler's state() as of the batches trained on (not one drawn ahead of them).
    Every rank calls this; rank 0 writes: the model (an HF folder as usual) and the optimizer state, under FSDP2
    gathered whole onto rank 0's CPU (keyed by parameter name)."""
    lm, model_sd = full_model_state(acc, policy)
    opt_sd = opt.state_dict()  # one process / DDP: rank 0 has it all
    if acc.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        opt_sd = get_optimizer_state_dict(policy, opt.optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if acc.is_main_process:
        root = os.path.join(cfg.run_dir, "ckpt")
        final, tmp = os.path.join(root, f"step_{step:06d}"), os.path.join(root, f".tmp_step_{step:06d}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_model(lm, model_sd, tok, cfg, os.path.join(tmp, "model"))
        torch.save({"step": step, "optimizer": opt_sd, "scheduler": sched.state_dict(), "version": version,
                    "schedule_steps": getattr(sched, "horizon", cfg.max_steps),
                    "sampler": sampler_state, "config": dataclasses.asdict(cfg),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                   os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        link = os.path.join(root, "latest")
        os.symlink(os.path.basename(final), link + ".tmp")
        os.replace(link + ".tmp", link)  # atomic: latest is always a complete checkpoint
        for old in sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-cfg.system.keep_ckpts]:
            shutil.rmtree(os.path.join(root, old))
    acc.wait_for_everyone()  # no rank goes on (or resumes from latest) before the checkpoint is complete


class BestModel:
    """ckpt/best/: the model whose validation strict pass@1 is the best so far (model/, an HF folder, and best.json:
    its step and score; the first of equal scores is kept). Chosen on the validation set only. A resumed run goes on
    from the best.json it finds; a fresh start sets the folder aside with ckpt/ (set_aside_previous_run)."""
    def __init__(self, cfg):
        self.cfg, self.dir = cfg, os.path.join(cfg.run_dir, "ckpt", "best")
        info = os.path.join(self.dir, "best.json")
        self.score = json.load(open(info))["val/pass@1_strict"] if cfg.resume and os.path.exists(info) else None

    def offer(self, acc, policy, tok, step: int, score: float | None):
        """After a validation at `step`: keep this model if its score beats the best. Every rank calls it (under FSDP2
        saving gathers the shards); score is the main process's (validate's return), sent to every rank here."""
        if not self.cfg.system.keep_best:
            return
        score = acc.reduce(torch.tensor([score or 0.0], device=acc.device), "sum").item()  # only rank 0 has it
        if self.score is not None and score <= self.score:
            return
        self.score = score
        lm, model_sd = full_model_state(acc, policy)
        if acc.is_main_process:
            tmp, old = self.dir + ".tmp", self.dir + ".old"
            shutil.rmtree(tmp, ignore_errors=True)
            write_model(lm, model_sd, tok, self.cfg, os.path.join(tmp, "model"))
            with open(os.path.join(tmp, "best.json"), "w") as f:
                json.dump({"step": step, "val/pass@1_strict": score}, f)
            shutil.rmtree(old, ignore_errors=True)
            if os.path.exists(self.dir):
                os.rename(self.dir, old)
            os.rename(tmp, self.dir)  # ckpt/best is always complete: the new one, or (before this line) ckpt/best.old
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()


def load_optimizer(acc, policy, opt, opt_sd):
    """save_checkpoint's optimizer state -> opt. Under FSDP2 rank 0's full state is sent to every rank, which
    keeps its own shards; every rank calls this."""
    if acc.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(policy, opt.optimizer, opt_sd,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        opt.load_state_dict(opt_sd)


def policy_weights(acc, policy, full_on_every_rank: bool):
    """(name, full tensor) of the policy's weights. full_on_every_rank: gathered one at a time on every rank (each
    rank's local engine needs them); else all gathered onto rank 0 (a push to the Serve app), empty elsewhere."""
    if full_on_every_rank:
        return ((k, full_tensor(v.detach())) for k, v in acc.unwrap_model(policy).lm.named_parameters())
    full = acc.get_state_dict(policy)  # every rank takes part: FSDP / ZeRO-3 gather full params to rank 0
    return [(k.removeprefix("lm."), v) for k, v in full.items()] if acc.is_main_process else []


def load_checkpoint(run_dir: str) -> dict:
    """run_dir/ckpt/latest -> its state.pt (step, optimizer, scheduler, sampler, config, RNG) and its model folder."""
    latest = os.path.join(run_dir, "ckpt", "latest")
    if not os.path.exists(os.path.join(latest, "state.pt")):
        raise FileNotFoundError(f"--resume, but no checkpoint at {latest}: drop --resume to start afresh")
    state = torch.load(os.path.join(latest, "state.pt"), weights_only=False)
    return state | {"model_dir": os.path.join(latest, "model")}


def restore(acc, policy, opt, sched, state) -> None:
    """A checkpoint's optimizer, scheduler and RNG state -> the live objects (every rank calls this)."""
    load_optimizer(acc, policy, opt, state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])


def load_data(cfg, tok):
    """Train rows and their prompt ids (tokenised once), the validation rows of the in-loop eval, and the context an
    engine needs: the longest prompt + max_new_tokens. The last val_size train problems are never trained on."""
    import gsm8k
    train_rows, val_rows = gsm8k.split_train_val(gsm8k.load_split(cfg.data, "train"), cfg.val_size)
    prompts, eval_rows = gsm8k.build_prompts(tok, [r["question"] for r in train_rows], cfg.prompt), \
        val_rows[:cfg.eval_size or None]
    longest = max(map(len, prompts + gsm8k.build_prompts(tok, [r["question"] for r in eval_rows], cfg.prompt)))
    return train_rows, prompts, eval_rows, longest + cfg.max_new_tokens


def load_models(cfg, model_src: str, dev):
    """The policy (fp32 master weights; bf16 autocast on GPUs) and its frozen reference (None unless KL is used).
    compile: the policy's layers only. The reference runs a no-grad forward in another dtype, so compiled it would
    be a second set of graphs, whose cold compile costs more than its few fused kernels save (docs/perf.md)."""
    from system.models import compile_model, default_dtype, load_model, use_packed_attention
    lm = load_model(model_src, torch.float32, dev)
    ref = load_model(cfg.model, default_dtype(dev), dev).requires_grad_(False) if cfg.kl_coef > 0 or cfg.log_kl else None
    for m in filter(None, (lm, ref)):
        if cfg.system.packing:
            use_packed_attention(m)
    if cfg.system.compile:
        compile_model(lm)
    if cfg.system.grad_checkpointing:
        lm.gradient_checkpointing_enable()
    return lm, ref


def rank_engine(cfg, acc, tok, model_src: str, min_model_len: int):
    """The engine this rank samples from: its own TorchEngine (inference local) or the Serve app (serve)."""
    from system.engine import TorchEngine, default_max_batch
    from system.models import default_dtype, load_model
    sc = cfg.system
    if sc.inference == "local":
        return TorchEngine(load_model(model_src, default_dtype(acc.device), acc.device), tok,
                           max_batch=sc.engine_rows or default_max_batch(acc.device),
                           max_model_len=max(2048, min_model_len), compile=sc.compile_engine, fuse=sc.fuse_engine)
    import ray
    from infer_workers import ServeClient
    ray.init(address=sc.ray_address, ignore_reinit_error=True, log_to_driver=False)
    sync = dict(host=sc.sync_host, port=sc.sync_port, bucket_mb=sc.sync_bucket_mb, timeout_s=sc.sync_timeout_s,
                device=acc.device, ipc=sc.sync_ipc) if acc.is_main_process else None  # rank 0 pushes; every rank samples
    return ServeClient(sc.serve_app, sc.sync_timeout_s, sync, model=cfg.model, min_model_len=min_model_len,
                       top_p=cfg.top_p)


def push_weights(acc, policy, engine, cfg, version=None):
    """Policy weights -> the engine (as `version`, else the next one). Returns the engine's new weight version (None
    on ranks that don't push)."""
    if cfg.system.inference == "local":  # each rank has its own engine, which needs the full weights
        return engine.update_weights(policy_weights(acc, policy, full_on_every_rank=True), version)
    named = policy_weights(acc, policy, full_on_every_rank=False)
    version = engine.update_weights(named, version) if acc.is_main_process else None
    acc.wait_for_everyone()  # no rank samples before the push is done
    return version


def start_engine(acc, policy, engine, cfg, state) -> None:
    """Put the engine in step with the policy before the first step. A local engine was built from the same weights
    (a resumed one from the checkpoint): it takes the checkpoint's version. The Serve app's replicas may hold other
    weights (an earlier run): they get the policy's, as the checkpoint's version, so versions run on across resumes.
    The pushing rank also gives the app a way to re-push them, for a replica that restarts between pushes."""
    version = state.get("version") if state else None
    if cfg.system.inference == "local":
        engine.version = version or 0
        return
    push_weights(acc, policy, engine, cfg, version)
    if acc.is_main_process and acc.num_processes == 1:  # one process: its weights are whole, no collective needed
        engine.resync = lambda: push_weights(acc, policy, engine, cfg, engine.version)


def close_engine(engine) -> None:
    """Let the engine's processes go in order (the Serve app's replicas leave the sync group before our store closes)."""
    if hasattr(engine, "close"):
        engine.close()


class Health:
    """Degeneration, said plainly while it happens and in the run's last lines. A rule fires once, with its numbers,
    after PATIENCE training steps in a row on the wrong side of its threshold (a loss or gradient that is not finite:
    at once):
      cut     the share of a step's completions cut at max_new_tokens is CUT or more: the policy runs to the cap
      format  the share in the exact format fell below FORMAT, having been above it: a format collapse
      nan     the loss or the gradient norm is NaN or infinite
      drift   a warning, not degeneration: the cut share is DRIFT_CUT or more, several times a healthy run's, the
              way a run heads for the cap (it may come back: a cut completion earns nothing)
      repeat  a warning: the share of completion words that repeat the completion's own earlier words is DRIFT_REPEAT
              above step 1's: completions are falling into loops, which costs nothing while they still stop in
              time, and which a run drifts through on its way to the cap
    A run whose reward has no "format" component never fires "format". When the initial model already runs to the cap
    (step 1's cut share, sampled before any update, is DRIFT_CUT or more: the cap is short for this model and prompt),
    that is said at step 1, and the cut rules count from its level: start + CUT and start + DRIFT_CUT, at most MOST_CUT
    (most completions cut is degenerate however the run began)."""
    CUT, FORMAT, PATIENCE = 0.2, 0.5, 5
    DRIFT_CUT, MOST_CUT, DRIFT_REPEAT = 0.1, 0.8, 0.15
    DEGENERATE, WARNING = ("cut", "format", "nan"), ("drift", "repeat")

    def __init__(self, max_new_tokens: int):
        self.cap, self.streak, self.fired, self.had_format = max_new_tokens, {}, {}, False
        self.start_cut = 0.0  # the cut share the initial model starts from, when it is DRIFT_CUT or more (step 1)
        self.start_repeat = None  # step 1's repetition share: the initial model's own level
        self.last_step, self.last_val = None, None  # the newest rows, for summary()

    def bar(self, margin: float) -> float:
        """The cut share at which a cut rule (margin CUT or DRIFT_CUT) fires."""
        return min(self.start_cut + margin, self.MOST_CUT) if self.start_cut else margin

    def see(self, m: dict) -> list[str]:
        """One metrics row -> the messages of the rules it fires (each rule fires once per run)."""
        if "val/n" in m:
            self.last_val = m
            return []
        self.last_step, new = m, []
        if m["step"] == 1 and m["truncated"] >= self.DRIFT_CUT:
            self.start_cut = m["truncated"]
            new.append(f"{m['truncated']:.0%} of completions cut at max_new_tokens={self.cap} at step 1, sampled "
                       f"before any update: the cap is short for this model and prompt, or the model does not stop; "
                       f"the cut rules count from there (drift at {self.bar(self.DRIFT_CUT):.0%}, degenerate at "
                       f"{self.bar(self.CUT):.0%})")
        if self.start_repeat is None and "repeated" in m:
            self.start_repeat = m["repeated"]
        fmt = m.get("format_rate", 0.0) if "format" in m else None
        self.had_format |= fmt is not None and fmt >= self.FORMAT
        bad = {"cut": m["truncated"] >= self.bar(self.CUT), "format": self.had_format and fmt < self.FORMAT,
               "nan": not all(math.isfinite(m[k]) for k in ("loss", "grad_norm") if k in m),
               "drift": m["truncated"] >= self.bar(self.DRIFT_CUT),
               "repeat": "repeated" in m and m["repeated"] >= (self.start_repeat or 0.0) + self.DRIFT_REPEAT}
        for rule, is_bad in bad.items():
            self.streak[rule] = self.streak.get(rule, 0) + 1 if is_bad else 0
            if rule not in self.fired and self.streak[rule] >= (1 if rule == "nan" else self.PATIENCE):
                self.fired[rule] = self._message(rule, m)
                if self._said(rule):
                    new.append(self.fired[rule])
        return new

    def _said(self, rule) -> bool:
        """Whether a fired rule is said: a drift is not, once the cut share has been called degenerate (worse)."""
        return not (rule == "drift" and "cut" in self.fired)

    def _message(self, rule, m):
        n = f"for {self.PATIENCE} steps in a row" if rule != "nan" else "this step"
        return {"cut": f"{m['truncated']:.0%} of completions cut at max_new_tokens={self.cap} {n} (mean length "
                       f"{m['completion_len']:.0f} tokens): the policy runs to the cap instead of stopping",
                "format": f"format {m.get('format_rate', 0):.0%} {n}, after it was above {self.FORMAT:.0%}: the "
                          f"format is collapsing",
                "nan": f"loss {m.get('loss')} / grad_norm {m.get('grad_norm')} {n}: not finite",
                "drift": f"{m['truncated']:.0%} of completions cut at max_new_tokens={self.cap} {n} (mean length "
                         f"{m['completion_len']:.0f} tokens): the policy is drifting towards the cap (degenerate at "
                         f"{self.bar(self.CUT):.0%})",
                "repeat": f"{m.get('repeated', 0):.0%} of completion words repeat the completion's own earlier words "
                          f"{n} ({self.start_repeat or 0:.0%} at step 1): completions are falling into loops"
                }[rule] + f" (step {m['step']})"

    def active(self) -> list[str]:
        """The degeneration rules that fired and are still on the wrong side at the last step seen."""
        return [r for r in self.fired if self.streak[r] and r in self.DEGENERATE]

    def drifting(self) -> list[str]:
        """The warning rules (drift, repeat) that fired and still hold, short of degeneration."""
        return [] if self.active() else [r for r in self.WARNING if r in self.fired and self.streak[r]]

    def summary(self) -> list[str]:
        """The run's last lines: the final validation and the last training step, and any degeneration by name."""
        out = []
        if self.last_val:
            v = self.last_val
            out.append(f"final validation (step {v['step']}, n={v['val/n']}): strict {v['val/pass@1_strict']:.1%}, "
                       f"lenient {v['val/pass@1_lenient']:.1%}, format {v['val/format']:.1%}, cut at the cap "
                       f"{v['val/cut']:.1%}"
                       + (f", words repeated {v['val/repeated']:.1%}" if "val/repeated" in v else ""))
        if self.last_step:
            t = self.last_step
            out.append(f"last training step ({t['step']}): reward {t['reward']:.3f}, format {t['format_rate']:.0%}, "
                       f"cut {t['truncated']:.0%}, completion {t['completion_len']:.0f} tokens"
                       + (f", {t['repeated']:.0%} of its words repeated" if "repeated" in t else ""))
        if self.start_cut:
            out.append(f"the run started with {self.start_cut:.0%} of completions cut at max_new_tokens={self.cap}")
        v, bad = self.last_val, [self.fired[r] for r in self.active()]
        if v and v["val/cut"] >= self.bar(self.CUT):
            bad.append(f"{v['val/cut']:.0%} of the final validation's greedy completions were cut at the cap")
        if v and self.had_format and v["val/format"] < self.FORMAT:
            bad.append(f"the final validation's format is {v['val/format']:.0%}")
        if bad:
            out.append("DEGENERATE at the end: " + " | ".join(bad))
        elif self.drifting():
            out.append("DRIFTING at the end: " + " | ".join(self.fired[r] for r in self.drifting()))
        elif self.fired:
            out.append("seen during the run, gone by its end: " + " | ".join(m for r, m in self.fired.items()
                                                                             if self._said(r)))
        return out


class RunLog:
    """metrics.jsonl (one line per step, and one per validation eval) and wandb, written by the main process; Health
    reads every row, warns on the bar and in the log when the run degenerates, and close() prints its summary.

    resume_step: the checkpoint a resumed run starts from. Rows a killed run wrote after that checkpoint are dropped
    (they are redone), so every step appears once in the file and in the curves."""
    def __init__(self, cfg, acc, resume_step=None):
        self.main, path = acc.is_main_process, os.path.join(cfg.run_dir, "metrics.jsonl")
        self.health = Health(cfg.max_new_tokens)
        if self.main and resume_step is not None and os.path.exists(path):
            redo_eval = bool(cfg.eval_every) and resume_step % cfg.eval_every == 0  # the resumed run evaluates it again
            rows = [json.loads(line) for line in open(path) if line.strip()]
            keep = [r for r in rows if r["step"] < resume_step or r["step"] == resume_step and
                    ("val/n" not in r or not redo_eval)]
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(path + ".tmp", path)
            for r in keep:  # the resumed run's health goes on from the rows before (their warnings were shown then)
                self.health.see(r)
        self.file = open(path, "a") if self.main else None
        self.wandb = None
        if cfg.system.wandb_project and self.main:
            import wandb
            wandb.init(project=cfg.system.wandb_project, name=os.path.basename(cfg.run_dir),
                       config=dataclasses.asdict(cfg),
                       dir=cfg.run_dir)
            self.wandb = wandb

    def write(self, m: dict, bar=None):
        """One row; a step's row also goes to the progress bar (flagged: completions rewards.STATS counted; cut: the
        share cut at max_new_tokens; rep: the share of words repeated; DEGENERATE / DRIFT: the Health rules on the
        wrong side now)."""
        if not self.main:
            return
        warnings = self.health.see(m)
        if warnings:
            m = m | {"warnings": warnings}
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if self.wandb:
            self.wandb.log({k: v for k, v in m.items() if k != "warnings"}, step=m["step"])
        for w in warnings:
            from tqdm import tqdm
            tqdm.write(f"WARNING: {w}", file=sys.stderr)
        if bar is not None:
            bar.set_postfix(reward=f"{m['reward']:.3f}", acc=f"{m.get('accuracy', 0):.0%}",
                            fmt=f"{m['format_rate']:.0%}", cut=f"{m['truncated']:.0%}",
                            len=f"{m['completion_len']:.0f}tok", rep=f"{m.get('repeated', 0):.0%}",
                            flagged=int(m["rewards_flagged"]), step=f"{m['step_s']:.1f}s",
                            **({"DEGENERATE": "+".join(self.health.active())} if self.health.active() else
                               {"DRIFT": "+".join(self.health.drifting())} if self.health.drifting() else {}))

    def close(self):
        """Ends the log with the run's summary (Health.summary): its last lines say how it ended."""
        if self.main:
            for line in self.health.summary():
                print(line, flush=True)
            self.file.close()
            if self.wandb:
                self.wandb.finish()


def start_run(cfg, acc) -> None:
    """Seeds, the run folder, and the resolved config in it (what --resume and readers of the run rely on)."""
    if cfg.prompts_per_step % acc.num_processes:
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} is not divisible by the {acc.num_processes} ranks: "
                          f"make it a multiple of {acc.num_processes}, or launch a divisor of it as --num_processes")
    from system.models import check_source
    try:
        check_source(cfg.model)
        check_source(cfg.data, "dataset")
    except ValueError as e:  # a name or path the user gave
        raise ConfigError(str(e)) from None
    if cfg.system.inference == "serve" and cfg.system.sync_port and acc.is_main_process:  # rank 0 will listen there
        with socket.socket() as s:
            try:
                s.bind((cfg.system.sync_host, cfg.system.sync_port))
            except OSError as e:
                raise ConfigError(f"sync_port={cfg.system.sync_port} is in use on {cfg.system.sync_host} "
                                  f"({e.strerror}): pick another, or 0 for any free port") from None
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.run_dir, exist_ok=True)
    if acc.is_main_process:
        moved = None if cfg.resume else set_aside_previous_run(cfg.run_dir)
        if moved:
            print(f"run folder {cfg.run_dir} held an earlier run: its metrics, config and checkpoints are now in {moved} "
                  f"(--resume continues a run instead)")
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    acc.print(f"{acc.num_processes} rank(s) on {acc.device}; run folder {cfg.run_dir}")


def set_aside_previous_run(run_dir: str) -> str | None:
    """A fresh start in a folder that holds an earlier run: its metrics.jsonl, config.yaml, ckpt/ and samples/ move into
    run_dir/previous-<date>-<time>/ (one rename each), so the new run's curves are its own and nothing is lost.
    Returns that folder, or None when there was no earlier run."""
    names = [n for n in ("metrics.jsonl", "config.yaml", "ckpt", "samples") if os.path.exists(os.path.join(run_dir, n))]
    if not {"metrics.jsonl", "ckpt"} & set(names):
        return None
    base = dest = os.path.join(run_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
    k = 1
    while os.path.exists(dest):  # two fresh starts within a second
        k += 1
        dest = f"{base}-{k}"
    os.makedirs(dest)
    for n in names:
        os.replace(os.path.join(run_dir, n), os.path.join(dest, n))
    return dest


class Deadline:
    """stop_after_min: has this job's time run out? Every rank gets the same answer (rank clocks differ)."""
    def __init__(self, minutes: float):
        self.minutes, self.t0 = minutes, time.monotonic()

    def passed(self, acc) -> bool:
        late = bool(self.minutes) and time.monotonic() - self.t0 > 60 * self.minutes
        return acc.reduce(torch.tensor([float(late)], device=acc.device), "max").item() > 0


def validate(acc, engine, tok, rows, cfg, step: int, log: RunLog):
    """Greedy eval of the current weights (after `step` updates) on the held-out validation problems, as its own
    metrics row, and its completions in RUN/samples/val_step_<step>.jsonl (gold, completion, finish reason), so that
    what a drifting policy writes can be read afterwards. Returns the strict pass@1 (for BestModel). Main process only
    (the other ranks' engines hold the same weights; they get None)."""
    import gsm8k
    if acc.is_main_process:
        t = time.perf_counter()
        ev = gsm8k.evaluate(engine, tok, rows, cfg.max_new_tokens, batch=256, prompt=cfg.prompt)
        log.write({"step": step} | {f"val/{k}": v for k, v in ev.items() if isinstance(v, (int, float))}
                  | {"eval_s": time.perf_counter() - t})
        path = os.path.join(cfg.run_dir, "samples", f"val_step_{step:06d}.jsonl")  # what the policy wrote, to read
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in ev["samples"])
        os.replace(path + ".tmp", path)
        acc.print(f"step {step}: validation pass@1 {ev['pass@1_strict']:.1%} strict, {ev['pass@1_lenient']:.1%} "
                  f"lenient, format {ev['format']:.1%}, cut at the cap {ev['cut']:.1%}, words repeated "
                  f"{ev['repeated']:.1%} (n={ev['n']})")
        return ev["pass@1_strict"]
    return None


def step_metrics(acc, step, lr, scores, completions, seq_prompts, stats, n_tok, version, gen_s, t, flagged) -> dict:
    """One step's metrics row, averaged over ranks: reward and its components, format rate, length, the share cut at
    max_new_tokens, the share of words that repeat the completion's own earlier words (rewards.repetition) and the
    loss's stats; summed over ranks: this step's completions the graders flagged
    (rewards.STAT_KEYS); then the weight versions and the step's time, part by part (t: train.main's clock readings,
    start, gen, reward, train, wait, sync), and its throughput."""
    dev = acc.device
    local = {k: torch.tensor([s[k] for s in scores], device=dev).mean() for k in scores[0]}  # reward + components
    local |= {"format_rate": torch.tensor([s.get("format") == 1.0 for s in scores], device=dev).float().mean(),
              "completion_len": torch.tensor([len(c["token_ids"]) for c in completions], device=dev).float().mean(),
              "truncated": torch.tensor([c["finish_reason"] == "length" for c in completions],
                                        device=dev).float().mean(),
              "repeated": torch.tensor([repetition(c["text"]) for c in completions], device=dev).mean()}
    local |= {k: v.float() for k, v in stats.items()}
    m = {"step": step + 1, "lr": lr} | {k: acc.reduce(v, "mean").item() for k, v in local.items()}
    counts = acc.reduce(torch.tensor([float(flagged[k]) for k in STAT_KEYS], device=dev), "sum").tolist()
    m |= {f"rewards/{k}": v for k, v in zip(STAT_KEYS, counts)} | {"rewards_flagged": sum(counts)}
    return m | {
        "version": version, "sample_version": completions[0]["version"], "step_s": t["sync"] - t["start"],
        "gen_s": gen_s, "gen_wait_s": t["gen"] - t["start"] + t["wait"] - t["train"],  # the trainer waiting on sampling
        "reward_s": t["reward"] - t["gen"], "train_s": t["train"] - t["reward"], "sync_s": t["sync"] - t["wait"],
        "gen_tok_s": acc.reduce(n_tok, "sum").item() / gen_s,  # sampled tokens / s, all ranks
        "train_tok_s": acc.reduce(n_tok + sum(map(len, seq_prompts)), "sum").item() / (t["train"] - t["reward"])
    } | compiled_so_far()


def compiled_so_far() -> dict:
    """What torch.compile has done in this process so far (the trainer's graphs and a local engine's): the graphs
    Dynamo made and the seconds its compiles took; and the CUDA graphs a local TorchEngine captured and the seconds
    those took (compiles in their warm-up steps counted in both). A step whose figures grow was partly warm-up: shapes,
    guards or decode buckets not seen before were compiled or captured in it."""
    from torch._dynamo.utils import compilation_time_metrics, counters
    from system.engine import CAPTURED
    return {"compiled_graphs": counters["stats"]["unique_graphs"],
            "compile_s": round(sum(compilation_time_metrics.get("_compile.compile_inner", [])), 2),
            "engine_graphs": CAPTURED["engine_graphs"], "capture_s": round(CAPTURED["capture_s"], 2)}


def synchronized_time(dev) -> float:
    """time.perf_counter() once the device's queued kernels are done (CUDA), so they count as the part that ran them."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def checkpoint_or_stop(acc, policy, tok, opt, sched, sampler_state, cfg, step, version, deadline) -> bool:
    """After step (0-based): a checkpoint every ckpt_every steps, at the last step, and when the job's time is up
    (stop_after_min), which ends the run cleanly. Returns False when the run stops here."""
    stop = deadline.passed(acc) and step + 1 < cfg.max_steps
    if (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or step + 1 == cfg.max_steps or stop:
        save_checkpoint(acc, policy, tok, opt, sched, sampler_state, cfg, step + 1, version)
    if stop:
        acc.print(f"stop_after_min={cfg.system.stop_after_min}: stopped after step {step + 1}; continue with --resume")
    return not stop


def main_cli(main, cfg):
    """main(cfg) from the command line: a ConfigError found once the run starts (a model or dataset that is not there,
    a port in use, a batch that does not split over the ranks) is one line and exit status 2, like a bad value."""
    try:
        main(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    exit_gloo_rank()


def exit_gloo_rank():
    """End a rank of a multi-process CPU (gloo) job, its work done and its process group destroyed, without Python's
    finalization. gloo's worker threads drop a finished collective's tensors after the caller has its result; a drop
    that needs the GIL once the interpreter finalizes aborts the process ("terminate called without an active
    exception", SIGABRT), and the launcher then reports a run that succeeded as failed. A loaded machine makes the
    worker late enough. NCCL ranks and single processes return and exit normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
