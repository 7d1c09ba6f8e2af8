"""train.py end to end on a tiny random model: a run, exact resume, learning, several ranks (DDP and FSDP2).

Run as a script, this file is the FSDP2 tests' launch target (see use_cpu_fsdp at the bottom).
"""
import dataclasses
import json
import math
import os
import runpy
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import GSM8K, ROOT, run_group  # before train: it puts the repo root on sys.path (also when launched as a script)
from system import batches, config, models, run
import rewards
import train


def digit_reward(completion, answer):
    """Toy reward with signal even for a random model: the fraction of the completion's characters that are digits."""
    text = completion["text"]
    return {"reward": sum(ch.isdigit() for ch in text) / max(len(text), 1)}


def cfg_for(model, run_dir, **kw):
    base = dict(model=model, data=GSM8K, run_dir=str(run_dir), prompts_per_step=2, group_size=4,
                max_new_tokens=12, micro_batch_size=3, lr=1e-3, seed=0)
    return config.make(train.Config, base | kw)


def step_batch(prompt_lens, completion_lens, group=1):
    """A step's batch for policy_step, random tokens (seed 0): each prompt `group` times in a row (as a step's groups
    come), then the completions, sampled at log-prob -3 each."""
    g = torch.Generator().manual_seed(0)
    drawn = [torch.randint(3, 200, (n,), generator=g).tolist() for n in prompt_lens]
    prompts = [p for p in drawn for _ in range(group)]
    completions = [{"token_ids": torch.randint(3, 200, (n,), generator=g).tolist(), "logprobs": [-3.0] * n}
                   for n in completion_lens]
    return prompts, completions


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch(cmd, timeout=300):
    """Run an accelerate launch command (every rank killed on timeout); on failure show rank 0's traceback
    (torchrun's summary hides it)."""
    p = run_group(cmd, timeout, cwd=ROOT)
    rank0 = [line for line in p.stderr.splitlines() if line.startswith("[rank0]")]
    assert p.returncode == 0, "\n".join(rank0[-40:]) or p.stderr[-3000:]
    return p


def fsdp2_launch(layer_cls):
    """accelerate launch with FSDP2 on 2 CPU ranks: this file as the script, which then runs the real one. Launch's
    default --fsdp_cpu_ram_efficient_loading true is spelled out: run.fsdp_plugin must override it."""
    return LAUNCH + ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                     "--fsdp_transformer_layer_cls_to_wrap", layer_cls, "--fsdp_state_dict_type", "FULL_STATE_DICT",
                     "--fsdp_cpu_ram_efficient_loading", "true", os.path.abspath(__file__)]


def test_three_steps_end_to_end(tiny_model, tmp_path):
    """3 steps with the real GSM8K rewards and KL: metrics per step, validation rows (before steps 1 and 3, and
    after the last) and their completions, config, an HF checkpoint and the best validation's model."""
    cfg = cfg_for(tiny_model, tmp_path / "run", max_steps=3, kl_coef=0.05, eval_every=2, eval_size=3)
    train.main(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps, evals = [r for r in rows if "reward" in r], [r for r in rows if "val/pass@1_strict" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["version"] for r in steps] == [1, 2, 3], "the engine took one weight update per step"
    assert [r["sample_version"] for r in steps] == [0, 1, 2], "each batch sampled by the weights it trains"
    assert [r["step"] for r in evals] == [0, 2, 3], "weights after 0, 2 and 3 updates"
    assert all(r["val/n"] == 3 and 0 <= r["val/format"] <= 1 and 0 <= r["val/repeated"] <= 1 for r in evals)
    for step in (0, 2, 3):  # each eval's completions, to read
        samples = [json.loads(line) for line in open(tmp_path / "run" / "samples" / f"val_step_{step:06d}.jsonl")]
        assert len(samples) == 3 and {"gold", "completion", "finish_reason"} <= samples[0].keys()
    for k in ("reward", "accuracy", "format", "format_rate", "kl", "entropy", "completion_len", "repeated", "loss",
              "clip_frac", "clip_low", "sampler_gap", "grad_norm",
              "gen_tok_s", "train_tok_s", "rewards_flagged") + tuple(f"rewards/{k}" for k in rewards.STAT_KEYS):
        assert all(math.isfinite(r[k]) for r in steps), k
    assert train.load_config([str(tmp_path / "run" / "config.yaml")]) == cfg
    best = json.load(open(tmp_path / "run" / "ckpt" / "best" / "best.json"))  # the random model scores 0 throughout
    assert best == {"step": 0, "val/pass@1_strict": 0.0} and (tmp_path / "run" / "ckpt" / "best" / "model").is_dir()
    ckpt = tmp_path / "run" / "ckpt" / "latest"
    assert os.readlink(ckpt) == "step_000003" and (ckpt / "model" / "config.json").exists()
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["step"] == 3 and state["config"] == dataclasses.asdict(cfg)


def test_tis_cap_trains_and_logs_the_capped_share(tiny_model, tmp_path):
    """A step with truncated importance sampling (tis_cap) runs end to end and logs tis_capped, a share in [0, 1]."""
    train.main(cfg_for(tiny_model, tmp_path / "run", max_steps=1, tis_cap=2.0), reward_fn=digit_reward)
    (row,) = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert 0 <= row["tis_capped"] <= 1 and row["grad_norm"] > 0, row


@pytest.mark.slow
def test_each_step_says_what_compiled_so_far(tiny_model, tmp_path):
    """A compiled run's metrics rows carry the process's torch.compile work so far (compiled_graphs, compile_s): the
    first step compiles the trainer's layers and the engine's decode step; the figures never go down."""
    from torch._dynamo.utils import counters
    before = counters["stats"]["unique_graphs"]  # the process's count: other tests may have compiled already
    train.main(cfg_for(tiny_model, tmp_path / "run", max_steps=2, compile=True, compile_engine=True),
               reward_fn=digit_reward)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[0]["compiled_graphs"] > before and rows[0]["compile_s"] > 0, rows[0]
    assert rows[1]["compiled_graphs"] >= rows[0]["compiled_graphs"] and rows[1]["compile_s"] >= rows[0]["compile_s"]
    if not torch.cuda.is_available():  # no CUDA graphs off the GPU (tests/test_gpu.py counts them on one)
        assert rows[1]["engine_graphs"] == 0 and rows[1]["capture_s"] == 0, rows[1]


def test_compile_compiles_the_policy_not_the_reference(tiny_model, tmp_path):
    """compile: the policy's decoder layers are compiled; the frozen reference's (a no-grad forward in another dtype,
    every log_kl_every-th step) are not, so a cold start does not compile a second set of graphs for it."""
    lm, ref = run.load_models(cfg_for(tiny_model, tmp_path, compile=True, log_kl=True), tiny_model, torch.device("cpu"))
    assert all(layer._compiled_call_impl is not None for layer in lm.model.layers)
    assert ref is not None and all(layer._compiled_call_impl is None for layer in ref.model.layers)


def test_best_model_keeps_the_weights_of_the_best_validation(tiny_model, tmp_path):
    """ckpt/best holds the model of the best validation score offered (the first of equal ones), replaced whole, with
    nothing left beside it; a resumed run goes on from its best.json; keep_best=false writes nothing."""
    from accelerate import Accelerator
    acc, tok = Accelerator(cpu=True), models.load_tokenizer(tiny_model)
    lm = models.load_model(tiny_model, torch.float32, "cpu")
    policy, cfg = batches.Policy(lm), cfg_for(tiny_model, tmp_path / "run")
    best, weight = run.BestModel(cfg), lm.get_input_embeddings().weight
    for step, score in [(0, 0.1), (25, 0.3), (50, 0.2), (75, 0.3)]:
        with torch.no_grad():
            weight.fill_(step)  # the weights, marked with their step
        best.offer(acc, policy, tok, step, score)
    folder = tmp_path / "run" / "ckpt" / "best"
    assert json.load(open(folder / "best.json")) == {"step": 25, "val/pass@1_strict": pytest.approx(0.3)}
    assert (load_file(folder / "model" / "model.safetensors")["model.embed_tokens.weight"] == 25).all()
    assert os.listdir(folder.parent) == ["best"]
    run.BestModel(config.replace(cfg, resume=True)).offer(acc, policy, tok, 100, 0.25)  # below the best before
    assert json.load(open(folder / "best.json"))["step"] == 25
    run.BestModel(config.replace(cfg, resume=False)).offer(acc, policy, tok, 100, 0.0)  # a fresh start: any is best
    assert json.load(open(folder / "best.json"))["step"] == 100
    off = cfg_for(tiny_model, tmp_path / "off", keep_best=False)
    run.BestModel(off).offer(acc, policy, tok, 0, 1.0)
    assert not (tmp_path / "off").exists()


@pytest.mark.extended  # five evals, each starting an engine: too slow for the default run
def test_r1zero_sh_runs_a_recipe_end_to_end(tiny_model, tmp_path):
    """exps/r1zero.sh on a tiny model and 4 test problems: the baseline evals, training, the final checkpoint's eval,
    the best validation's model's eval (the random model scores 0 throughout: step 0's is the best), res/ files, and
    last lines that name both and the degeneration (its completions all run to the cap)."""
    env = os.environ | {"EVAL_LIMIT": "4", "MAJ_K": "0", "RES": str(tmp_path / "res")}
    p = run_group(["bash", os.path.join(ROOT, "exps", "r1zero.sh"), "qwen_coder_r1zero", f"--model={tiny_model}",
                   f"--data={GSM8K}", f"--run_dir={tmp_path / 'run'}", "--max_steps=2", "--prompts_per_step=2",
                   "--group_size=2", "--max_new_tokens=8", "--eval_every=1", "--eval_size=2", "--compile=false",
                   "--compile_engine=false", "--micro_batch_size=4", "--engine_rows=8", "--overlong_buffer=4"],
                  timeout=600, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    last = p.stdout.strip().splitlines()[-6:]
    assert [line.split()[1] for line in last if line.startswith("test ")] == \
        ["before", "reference_cot", "after", "after_best"], last
    assert "the best validation (0.0% strict) was step 0's model:" in last and last[-1].startswith("DEGENERATE"), last
    record = json.load(open(tmp_path / "res" / "run_eval.json"))
    assert record["after_best"]["model"].endswith(os.path.join("ckpt", "best", "model")) and record["after"]["n"] == 4
    assert (tmp_path / "res" / "run.png").exists() and (tmp_path / "res" / "run.jsonl").exists()


def test_fresh_start_in_a_used_folder_sets_the_earlier_run_aside(tiny_model, tmp_path):
    """A second run into the same folder without --resume: its metrics.jsonl holds only its own rows, and the first
    run's metrics, config, checkpoint and validation completions are kept in previous-*/ (regression: rows of both runs
    in one file)."""
    run = tmp_path / "run"
    train.main(cfg_for(tiny_model, run, max_steps=2, eval_every=2, eval_size=2))
    train.main(cfg_for(tiny_model, run, max_steps=1, lr=2e-3))
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1] and not (run / "samples").exists()
    (old,) = run.glob("previous-*")
    assert [r["step"] for r in map(json.loads, open(old / "metrics.jsonl")) if "reward" in r] == [1, 2]
    assert sorted(p.name for p in (old / "samples").iterdir()) == ["val_step_000000.jsonl", "val_step_000002.jsonl"]
    assert (old / "ckpt" / "latest" / "state.pt").exists() and train.load_config([str(old / "config.yaml")]).lr == 1e-3
    assert train.load_config([str(run / "config.yaml")]).lr == 2e-3


def test_stop_after_min_checkpoints_and_resume_finishes(tiny_model, tmp_path):
    """stop_after_min (a job's time limit): the run stops after the step that passes it, with a checkpoint, and
    --resume goes on to max_steps; the last validation row is written only by the run that finishes."""
    cfg = cfg_for(tiny_model, tmp_path / "run", max_steps=3, stop_after_min=1e-6, eval_every=10, eval_size=2)
    train.main(cfg, reward_fn=digit_reward)
    assert os.readlink(tmp_path / "run" / "ckpt" / "latest") == "step_000001"
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [(r["step"], "reward" in r) for r in rows] == [(0, False), (1, True)]
    train.main(config.replace(cfg, resume=True, stop_after_min=0.0), reward_fn=digit_reward)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [(r["step"], "reward" in r) for r in rows] == [(0, False), (1, True), (2, True), (3, True), (3, False)]
    assert os.readlink(tmp_path / "run" / "ckpt" / "latest") == "step_000003"


class Crash(Exception):
    pass


def test_resume_continues_exactly(tiny_model, tmp_path):
    """Crash after the step-2 checkpoint, --resume, finish: parameters equal an uninterrupted run's."""
    train.main(cfg_for(tiny_model, tmp_path / "a", max_steps=4), reward_fn=digit_reward)

    calls = {"n": 0}

    def crashing_reward(completion, answer):
        calls["n"] += 1
        if calls["n"] > 2 * 8:  # 8 completions per step: crash inside step 3
            raise Crash
        return digit_reward(completion, answer)

    cfg_b = cfg_for(tiny_model, tmp_path / "b", max_steps=4, ckpt_every=2)
    with pytest.raises(Crash):
        train.main(cfg_b, reward_fn=crashing_reward)
    assert os.readlink(tmp_path / "b" / "ckpt" / "latest") == "step_000002"
    train.main(config.replace(cfg_b, resume=True), reward_fn=digit_reward)

    a = load_file(tmp_path / "a" / "ckpt" / "latest" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "ckpt" / "latest" / "model" / "model.safetensors")
    init = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a), "training must have moved the weights"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_tiny_model_learns_toy_reward(tiny_model, tmp_path):
    """GRPO raises a learnable reward within a few dozen steps (the loop optimises the right sign)."""
    cfg = cfg_for(tiny_model, tmp_path / "learn", max_steps=30, prompts_per_step=4, group_size=8,
                  micro_batch_size=32, lr=3e-3, max_new_tokens=8)
    train.main(cfg, reward_fn=digit_reward)
    r = [json.loads(line)["reward"] for line in open(tmp_path / "learn" / "metrics.jsonl")]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.1, (first, last, r)


def test_policy_step_skips_zero_advantage_sequences_exactly(tiny_model, tmp_path):
    """Without KL, policy_step forwards only the sequences with a non-zero advantage (plus padding to a whole
    micro-batch): the update equals the one over every sequence (forced here by a reference model at kl_coef 0)."""
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    cfg = cfg_for(tiny_model, tmp_path, micro_batch_size=2, kl_coef=0.0)
    tok = models.load_tokenizer(tiny_model)
    prompts, completions = step_batch([5] * 8, (4, 7, 2, 6, 3, 5, 4, 6))
    adv = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, -1.0, 0.0, 0.0])
    weights, stats = [], []
    for ref in (None, models.load_model(tiny_model, torch.float32, "cpu")):
        lm = models.load_model(tiny_model, torch.float32, "cpu")
        opt = torch.optim.SGD(lm.parameters(), lr=1.0)
        st, _ = train.policy_step(acc, batches.Policy(lm), ref, opt, prompts, completions, adv, cfg, tok.pad_token_id)
        weights.append(torch.cat([p.detach().flatten() for p in lm.parameters()]))
        stats.append(st)
    frac, norm = [s["trained_frac"].item() for s in stats], [s["grad_norm"].item() for s in stats]
    assert frac[0] == pytest.approx(2 / 8) and frac[1] == 1.0
    assert norm[0] > 0 and norm[0] == pytest.approx(norm[1], rel=1e-5)
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-6)


def test_policy_step_is_one_update_whatever_the_micro_batch(tiny_model, tmp_path):
    """The micro-batch and the log-prob chunk only cut a step's batch into pieces, as the recipe trains (packed, the
    prompts shared, the KL to a reference measured on every fifth step): micro-batches of 2, 4 or 8 sequences and
    chunks of 3 or 1024 tokens give the same weights, gradient norm and KL, on a step with the reference and on one
    without (which skips the sequences without a signal)."""
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    tok = models.load_tokenizer(tiny_model)
    prompts, completions = step_batch((5, 3, 6, 4), (4, 7, 2, 6, 3, 5, 4, 6), group=2)
    adv = torch.tensor([0.5, -0.5, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0])
    for with_ref in (True, False):
        weights, stats = [], []
        for mb, chunk in ((2, 1024), (4, 3), (8, 1024)):
            cfg = cfg_for(tiny_model, tmp_path, micro_batch_size=mb, logprob_chunk=chunk, log_kl=True)
            assert cfg.system.packing and cfg.system.share_prompts
            lm, ref = run.load_models(cfg, tiny_model, acc.device)
            noise = torch.Generator().manual_seed(1)
            with torch.no_grad():  # the policy a few steps from its reference, so that the KL is not 0
                start = [p.add_(0.05 * torch.randn(p.shape, generator=noise)).clone() for p in lm.parameters()]
            opt = torch.optim.SGD(lm.parameters(), lr=1.0)
            st, _ = train.policy_step(acc, batches.Policy(lm), ref if with_ref else None, opt, prompts, completions,
                                      adv, cfg, tok.pad_token_id)
            weights.append(torch.cat([p.detach().flatten() for p in lm.parameters()]))
            stats.append(st)
        assert (weights[0] - torch.cat([p.flatten() for p in start])).abs().max() > 1e-4  # the step moved them
        assert not with_ref or stats[0]["kl"].item() > 1e-4
        for w, st in zip(weights[1:], stats[1:]):
            torch.testing.assert_close(w, weights[0], rtol=0, atol=1e-6)
            assert st["grad_norm"].item() == pytest.approx(stats[0]["grad_norm"].item(), rel=1e-5)
            assert ("kl" in st) == with_ref
            if with_ref:
                assert st["kl"].item() == pytest.approx(stats[0]["kl"].item(), rel=1e-5)


def test_a_loss_term_that_lives_at_zero_advantage_is_never_skipped(tiny_model, tmp_path, monkeypatch):
    """An edit to grpo_loss that is not 0 at advantage 0 (an entropy-like bonus on the log-probs) turns the
    zero-advantage skip off: every sequence is trained (it would have been dropped silently), with a warning; a stat the
    new loss returns is logged with no other edit."""
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    cfg = cfg_for(tiny_model, tmp_path, micro_batch_size=2)
    tok, lm = models.load_tokenizer(tiny_model), models.load_model(tiny_model, torch.float32, "cpu")
    prompts, completions = step_batch([5] * 8, (4, 7, 2, 6, 3, 5, 4, 6))
    adv = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, -1.0, 0.0, 0.0])
    opt = torch.optim.SGD(lm.parameters(), lr=1.0)
    st, _ = train.policy_step(acc, batches.Policy(lm), None, opt, prompts, completions, adv, cfg, tok.pad_token_id)
    assert st["trained_frac"].item() == 2 / 8  # the plain loss: the six zero-advantage sequences are skipped
    plain = train.grpo_loss

    def with_bonus(logp, old_logp, ref_logp, adv, mask, cfg, norm):
        loss, stats = plain(logp, old_logp, ref_logp, adv, mask, cfg, norm)
        bonus = -0.01 * (logp * mask).sum() / norm
        return loss + bonus, stats | {"bonus": bonus.detach()}
    monkeypatch.setattr(train, "grpo_loss", with_bonus)
    with pytest.warns(UserWarning, match="not 0 at advantage 0"):
        st, _ = train.policy_step(acc, batches.Policy(lm), None, opt, prompts, completions, adv, cfg, tok.pad_token_id)
        train.main(cfg_for(tiny_model, tmp_path / "run", max_steps=1), reward_fn=digit_reward)
    assert st["trained_frac"].item() == 1.0 and "bonus" in st
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["trained_frac"] == 1.0 and math.isfinite(row["bonus"]), row


def test_log_kl_every_measures_the_kl_on_those_steps_only(tiny_model, tmp_path):
    """log_kl with log_kl_every 2 (kl_coef 0): the KL to the reference is logged at steps 1 and 3; step 2 makes no
    reference forward and trains only the sequences with a signal."""
    cfg = cfg_for(tiny_model, tmp_path / "run", max_steps=3, log_kl=True, log_kl_every=2)
    train.main(cfg, reward_fn=digit_reward)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [("kl" in r) for r in rows] == [True, False, True]
    assert rows[0]["trained_frac"] == rows[2]["trained_frac"] == 1.0  # with the reference: every sequence


def test_prompt_and_format_weight_come_from_the_config(tiny_stop_model, tmp_path, monkeypatch):
    """cfg.prompt is the prompt of every question the run sends (training and in-loop validation), and the default
    reward is cfg.format_weight * format + accuracy [+ overlong], format and accuracy paid only to completions that
    stopped. format_reward is made to pay 1 here, so the weight is visible on a random model; the stop model (a second
    eos it emits often) makes some completions stop, the cap cuts the others."""
    import gsm8k
    used, build = set(), gsm8k.build_prompts
    monkeypatch.setattr(gsm8k, "build_prompts", lambda tok, qs, prompt=gsm8k.DEFAULT_PROMPT:
                        used.add(prompt) or build(tok, qs, prompt))
    monkeypatch.setattr(rewards, "format_reward", lambda text: 1.0)
    cfg = cfg_for(tiny_stop_model[0], tmp_path / "run", max_steps=2, prompt="cot", format_weight=0.3, eval_every=1,
                  eval_size=2, overlong_buffer=4)
    train.main(cfg)
    assert used == {"cot"}
    steps = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"reward"' in line]
    for step in steps:
        assert step["format"] == 1 - step["truncated"], step  # every completion that stopped, none that was cut
        assert step["reward"] == pytest.approx(0.3 * step["format"] + step["accuracy"] + step["overlong"]), step
    assert 0 < sum(s["truncated"] for s in steps) < len(steps) and min(s["overlong"] for s in steps) < 0, steps
    assert train.load_config([str(tmp_path / "run" / "config.yaml")]).prompt == "cot"
    # the checkpoint says what it was trained with, and gsm8k.py evaluates it with that prompt unless told otherwise
    model = tmp_path / "run" / "ckpt" / "latest" / "model"
    p = run_group([sys.executable, os.path.join(ROOT, "gsm8k.py"), "--model", str(model), "--data", GSM8K, "--limit",
                   "1", "--maj-k", "0", "--max-new-tokens", "2", "--engine", "torch", "--out", str(tmp_path / "e.json")],
                  300, cwd=ROOT)
    assert p.returncode == 0 and json.load(open(tmp_path / "e.json"))["prompt"] == "cot", p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.extended  # ~3 min: two real steps of SmolLM2-135M on the CPU
def test_cpu_demo_config_gives_a_learning_signal(tmp_path):
    """README's main job (exps/cpu_smollm2) with its own settings, 2 of its 6 steps: SmolLM2-135M writes the format in
    some completions, so rewards and the gradient are non-zero (regression: with the example inside the system
    message, every reward of the demo was 0 and its update did nothing)."""
    cfg = train.load_config([os.path.join(ROOT, "exps", "cpu_smollm2", "config.yaml"), f"--run_dir={tmp_path / 'run'}",
                             f"--data={GSM8K}", "--max_steps=2", "--eval_every=0"])
    train.main(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any(r["format"] > 0 and r["reward"] > 0 and r["grad_norm"] > 0 for r in rows), rows


@pytest.mark.slow
@pytest.mark.extended  # 2-rank DDP: test_two_rank_step_equals_one_rank, launched the same way
def test_two_ranks_with_accelerate_launch(tiny_model, tmp_path):
    """accelerate launch with 2 CPU processes (gloo DDP) trains and checkpoints."""
    run = tmp_path / "ddp"
    # --multi_gpu only makes accelerate start the ranks through torchrun; train.py picks gloo without CUDA
    p = launch(LAUNCH + ["--multi_gpu", os.path.join(ROOT, "train.py"), f"--model={tiny_model}", f"--data={GSM8K}",
                         f"--run_dir={run}", "--max_steps=2", "--prompts_per_step=2", "--group_size=2",
                         "--max_new_tokens=8"])
    assert "2 rank(s)" in p.stdout + p.stderr
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2]
    assert (run / "ckpt" / "latest" / "state.pt").exists()


@pytest.fixture(scope="module")
def multi_gpu_ref(tmp_path_factory):
    """bench/multi_gpu.py's 1-rank reference run: its folder, and the script + args that compare against it."""
    ref = tmp_path_factory.mktemp("mg_ref")
    script = [os.path.join(ROOT, "bench", "multi_gpu.py"), "--shape", "small", "--prompts", "4", "--ref", str(ref)]
    assert run_group([sys.executable] + script, 600).returncode == 0
    return script


def run_multi_gpu(cmd):
    return json.loads(launch(cmd, timeout=600).stdout.strip().splitlines()[-1])  # the JSON line of the bench


@pytest.mark.slow
def test_two_rank_step_equals_one_rank(multi_gpu_ref):
    """bench/multi_gpu.py on CPU (gloo DDP): 2 ranks' GRPO step = 1 rank's: loss, grad norm, weights."""
    r = run_multi_gpu(LAUNCH + ["--multi_gpu"] + multi_gpu_ref)
    assert r["world"] == 2 and r["loss_rel_diff"] < 1e-5 and r["grad_norm_rel_diff"] < 1e-5, r
    assert r["weights_rel_err_max"] < 1e-3, r


def test_trainer_bench_variants_agree_and_kl_steps_run_the_reference():
    """bench/trainer.py on the CPU (a GPU host's too: its reference would be bf16): padded, packed, shared and
    KL-logging steps from the same weights give the same first-step loss (kl_coef 0: the KL is logged, not trained
    on), and a +kl variant really runs the reference: its KL to the identical initial model is 0. The log-prob chunk
    the command names (one that splits sequences) is the one every variant ran with."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "trainer.py"), "--shape", "small", "--prompts", "2", "--group",
           "4", "--prompt-len", "8", "16", "--completion-len", "4", "24", "--packed-mb", "4", "--iters", "1",
           "--logprob-chunk", "7", "--variants", "padded", "packed", "packed+share", "packed+share+kl"]
    p = run_group(cmd, 300, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["max_loss_rel_diff"] < 1e-5, r["first_step_loss"]
    assert {r[v]["logprob_chunk"] for v in ("padded", "packed", "packed+share", "packed+share+kl")} == {7}, r
    assert "first_step_kl" not in r["packed+share"] and abs(r["packed+share+kl"]["first_step_kl"]) < 1e-6, r


@pytest.mark.parametrize("variant, says", [("packed+compile+share+attn", "TRACE_ATTENTION"),
                                           ("packed+compile+share+kl-eager", "any of +attn")])
def test_trainer_bench_refuses_a_variant_it_would_not_run_as_named(variant, says):
    """+attn with +share would time the eager attention under the traced variant's name, and an unknown part (an old
    name) would be silently dropped: one line, before any work."""
    p = run_group([sys.executable, os.path.join(ROOT, "bench", "trainer.py"), "--variants", variant], 60)
    assert p.returncode == 2 and says in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.extended  # two processes that compile: a benchmark's report, not the training path
def test_trainer_bench_reports_a_warm_compile_cache(tmp_path):
    """bench/trainer.py's "compile" report: the first process with a fresh TORCHINDUCTOR_CACHE_DIR misses Inductor's
    and AOTAutograd's caches and spends its compile time; a second process with the same folder generates no kernel
    anew (no Inductor miss; some graphs can still miss AOTAutograd's cache and be re-traced), and gets the same
    first-step loss."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "trainer.py"), "--shape", "small", "--prompts", "2", "--group",
           "2", "--prompt-len", "8", "16", "--completion-len", "4", "24", "--packed-mb", "4", "--iters", "1",
           "--variants", "packed+compile"]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    runs = []
    for _ in range(2):
        p = run_group(cmd, 600, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    cold, warm = (r["packed+compile"]["compile"] for r in runs)
    assert cold["fx_cache_miss"] > 0 and cold["fx_cache_hit"] == 0 and cold["aot_cache_miss"] > 0, cold
    assert cold["dynamo_s"] >= cold["inductor_s"] > 0, cold
    assert warm["fx_cache_miss"] == 0 and warm["fx_cache_hit"] > 0 and warm["aot_cache_hit"] > 0, warm
    assert runs[0]["first_step_loss"] == runs[1]["first_step_loss"], runs


def test_fsdp_plugin_keeps_fp32_and_full_loading(monkeypatch):
    """run.fsdp_plugin under launch --use_fsdp: accelerate's bf16 leaves params and gradient reduction fp32
    (regression: its default bf16 param/reduce dtypes, ~1% loss off DDP on GPU), and every rank loads full weights
    (regression: zeros in the local engines and reference model off local rank 0). None without FSDP."""
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert run.fsdp_plugin() is None
    for k, v in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}.items():
        monkeypatch.setenv(k, v)  # as accelerate launch --use_fsdp --fsdp_version 2 sets them
    plugin = run.fsdp_plugin()
    plugin.set_mixed_precision("bf16")  # what accelerate does under mixed_precision="bf16"
    mp = plugin.mixed_precision_policy
    assert mp.param_dtype is None and mp.reduce_dtype is None, mp
    assert not plugin.cpu_ram_efficient_loading
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "False"  # what transformers' from_pretrained reads


@pytest.mark.slow
@pytest.mark.extended  # FSDP2 on GPUs: tests/test_gpu.py; its plugin settings: test_fsdp_plugin_keeps_fp32_and_full_loading
def test_fsdp2_step_equals_one_rank(multi_gpu_ref):
    """The same under accelerate's FSDP2 (2 CPU ranks, DTensor shards), and prepare keeps lm_head tied to
    embed_tokens with every parameter in the optimizer (run.check_prepared, else the run fails)."""
    r = run_multi_gpu(fsdp2_launch("Qwen2DecoderLayer") + multi_gpu_ref)
    assert r["world"] == 2 and r["distributed"] == "FSDP", r
    assert r["loss_rel_diff"] < 1e-5 and r["grad_norm_rel_diff"] < 1e-4, r
    assert r["weights_rel_err_max"] < 1e-3 and r["unchanged_tensors"] == 0, r


@pytest.mark.slow
@pytest.mark.extended  # the FSDP2 step itself: test_fsdp2_step_equals_one_rank
def test_fsdp2_train_checkpoint_and_resume(tiny_model, tmp_path):
    """train.py under FSDP2 (2 CPU ranks, a local engine per rank): every rank's engine and reference model hold the
    trainer's full weights (ratio 1 and KL 0 before the first update; regression: with rank-0-only loading, rank 1's
    held zeros); the checkpoint and the best validation's model hold the full model, the checkpoint the full optimizer
    state; resuming at step 2 redoes step 3 exactly."""
    args = ["train", f"--model={tiny_model}", f"--data={GSM8K}", "--max_steps=3", "--ckpt_every=2",
            "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=8", "--lr=1e-3", "--kl_coef=0.1",
            "--eval_every=2", "--eval_size=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    launch(fsdp2_launch("LlamaDecoderLayer") + args + [f"--run_dir={a}"])
    rows = [r for r in map(json.loads, open(a / "metrics.jsonl")) if "reward" in r]  # the steps, not the evals
    assert [r["version"] for r in rows] == [1, 2, 3] and rows[0]["kl"] < 1e-6, rows[0]
    assert all(r["clip_frac"] == 0 for r in rows), [r["clip_frac"] for r in rows]  # engine = trainer at every step
    state = torch.load(a / "ckpt" / "step_000002" / "state.pt", weights_only=False)
    w2 = load_file(a / "ckpt" / "step_000002" / "model" / "model.safetensors")
    assert w2.keys() == load_file(os.path.join(tiny_model, "model.safetensors")).keys()  # the HF layout, lm_head tied
    assert w2["model.embed_tokens.weight"].shape == (512, 64)  # full, not a [256, 64] shard
    adam = state["optimizer"]["state"]["lm.model.embed_tokens.weight"]  # FSDP2 keys it by name (DDP: by index)
    assert adam["exp_avg"].shape == (512, 64) and adam["exp_avg"].abs().sum() > 0, adam["exp_avg"].shape
    best = load_file(a / "ckpt" / "best" / "model" / "model.safetensors")  # the best validation's model, gathered
    assert best["model.embed_tokens.weight"].shape == (512, 64)

    shutil.copytree(a / "ckpt" / "step_000002", b / "ckpt" / "step_000002")
    os.symlink("step_000002", b / "ckpt" / "latest")
    launch(fsdp2_launch("LlamaDecoderLayer") + args + [f"--run_dir={b}", "--resume"])
    wa = load_file(a / "ckpt" / "step_000003" / "model" / "model.safetensors")
    wb = load_file(b / "ckpt" / "step_000003" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and any(not torch.equal(wa[k], w2[k]) for k in wa), "step 3 moved no weight"
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)


def use_cpu_fsdp():
    """Make accelerate take its real FSDP path on CPU ranks. A test-only patch of accelerate internals: on CPU (gloo)
    accelerate silently gives plain DDP (MULTI_CPU) even under launch --use_fsdp; this flips that one switch after
    AcceleratorState's own setup, so prepare runs fully_shard and the params become DTensor shards."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    init = AcceleratorState.__init__

    def init_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            assert self.mixed_precision == "no", "CPU FSDP test runs are fp32"  # else fsdp_plugin.set_mixed_precision
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init_with_fsdp


if __name__ == "__main__":  # fsdp2_launch's script: `train --key=value ...` (digit_reward) or `SCRIPT ARGS...`
    use_cpu_fsdp()
    if sys.argv[1] == "train":
        train.main(train.load_config(sys.argv[2:]), reward_fn=digit_reward)
        run.exit_gloo_rank()  # as train.py's command line ends
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")


def health_rows(cut, fmt, start=1):
    return [{"step": start + i, "reward": f, "format": f, "format_rate": f, "truncated": c,
             "completion_len": 100 + 200 * c, "loss": 0.1, "grad_norm": 1.0} for i, (c, f) in enumerate(zip(cut, fmt))]


def test_health_names_degeneration_once_and_in_the_summary():
    """Health fires each rule once, after PATIENCE steps on the wrong side (cut share at or above CUT; format below
    FORMAT after it was above; a loss that is not finite at once), and its summary says whether the run ended so."""
    h, P = run.Health(max_new_tokens=300), run.Health.PATIENCE
    fired = [h.see(r) for r in health_rows([0.0] * 3 + [0.5] * (P - 1) + [0.0] + [0.5] * (P + 3), [0.9] * (2 * P + 6))]
    assert [i for i, f in enumerate(fired) if f] == [3 + P + P - 1], fired  # the run of P-1 bad steps fired nothing
    assert "50% of completions cut at max_new_tokens=300" in fired[3 + 2 * P - 1][0]
    h.see({"step": 20, "val/n": 500, "val/pass@1_strict": 0.4, "val/pass@1_lenient": 0.4, "val/format": 0.9,
           "val/cut": 0.0})
    last = h.summary()
    assert last[0].startswith("final validation (step 20, n=500): strict 40.0%") and "DEGENERATE" in last[-1], last
    assert h.see(health_rows([0.0], [0.9], start=30)[0]) == [] and "gone by its end" in h.summary()[-1]

    never = run.Health(300)  # a format that was never there does not collapse
    assert not any(never.see(r) for r in health_rows([0.0] * 10, [0.1] * 10))
    assert "DEGENERATE" not in never.summary()[-1]
    lost = run.Health(300)
    fired = [lost.see(r) for r in health_rows([0.0] * 12, [0.9] * 2 + [0.3] * 10)]
    assert "format 30%" in fired[1 + P][0] and sum(map(bool, fired)) == 1
    nan = run.Health(300)
    assert "not finite" in nan.see(health_rows([0.0], [0.9])[0] | {"loss": float("nan")})[0]


def committed_run(name):
    """The metrics rows of a run committed in res/."""
    with open(os.path.join(ROOT, "res", name)) as f:
        return [json.loads(line) for line in f]


def test_health_warns_of_a_drift_towards_the_cap_that_a_run_came_back_from():
    """A committed run of the recipe before TIS (res/qwen_coder_r1zero_ea9cc3f.jsonl) drifted: around step 95 its cut
    share rose past DRIFT_CUT (17% at most), then fell back. Health warns once, at the fifth step in a row, names no
    degeneration, and its summary says the drift came and went; held at a cut share of DRIFT_CUT, the summary says
    DRIFTING."""
    rows = committed_run("qwen_coder_r1zero_ea9cc3f.jsonl")
    h = run.Health(max_new_tokens=300)
    fired = {r["step"]: w for r in rows if (w := h.see(r))}
    cut = {r["step"]: r["truncated"] for r in rows if "truncated" in r}
    (step, said), = fired.items()
    assert all(cut[s] >= run.Health.DRIFT_CUT for s in range(step - run.Health.PATIENCE + 1, step + 1)), cut
    assert "drifting towards the cap" in said[0] and not h.active(), said
    assert h.summary()[-1].startswith("seen during the run, gone by its end: ") and "drifting" in h.summary()[-1]
    held, P = run.Health(300), run.Health.PATIENCE
    for r in health_rows([0.0] + [run.Health.DRIFT_CUT] * (P + 1), [0.9] * (P + 2)):  # from a healthy step 1
        held.see(r)
    assert held.drifting() and held.summary()[-1].startswith("DRIFTING at the end: 10% of completions cut")


def test_health_names_the_collapse_of_the_recipes_300_step_run():
    """The recipe's 300-step run before TIS (res/qwen_coder_r1zero_fe54c2b.jsonl) collapsed near its end: within a few
    steps most of its completions ran to the cap. Replayed, Health warns of the drift and then the degeneration once
    each, on the steps the run itself logged, and the summary names the degeneration."""
    rows = committed_run("qwen_coder_r1zero_fe54c2b.jsonl")
    h = run.Health(max_new_tokens=300)
    fired = {r["step"]: w for r in rows if "reward" in r and (w := h.see(r))}
    logged = {r["step"]: r["warnings"] for r in rows if r.get("warnings")}
    assert fired == logged and len(fired) == 2 and min(fired) > 250, fired
    assert any("DEGENERATE" in line for line in h.summary()), h.summary()


@pytest.mark.parametrize("name, final_strict", [("qwen_coder_r1zero_88cb238.jsonl", "45.4%"),
                                                 ("qwen_coder_r1zero.jsonl", "47.4%")])
def test_health_stays_quiet_on_the_recipes_runs_that_held(name, final_strict):
    """The recipe's committed 300-step runs that held (TIS alone; the headline, TIS and the light overlong penalty):
    replayed, Health fires no warning at any step (the runs logged none) and its summary is the final
    validation and the last step only."""
    rows = committed_run(name)
    h = run.Health(max_new_tokens=300)
    assert not any(h.see(r) for r in rows if "reward" in r or "val/n" in r) and not any(r.get("warnings") for r in rows)
    assert len(h.summary()) == 2
    assert h.summary()[0].startswith(f"final validation (step 300, n=500): strict {final_strict}"), h.summary()


def test_health_warns_when_completions_fall_into_loops():
    """The repetition rule counts from step 1's level: a policy that repeats DRIFT_REPEAT more of its words for PATIENCE
    steps is warned of once (not degenerate: such completions still stop and are paid), and held to the end the summary
    says DRIFTING; a model that repeats as much from step 1 on is not warned."""
    P, bar = run.Health.PATIENCE, run.Health.DRIFT_REPEAT
    loops = run.Health(300)
    rep = [0.05] * 3 + [0.05 + bar] * (P + 2)
    fired = [loops.see(r | {"repeated": x}) for r, x in zip(health_rows([0.0] * len(rep), [0.9] * len(rep)), rep)]
    assert [i for i, f in enumerate(fired) if f] == [3 + P - 1], fired
    assert "20% of completion words repeat the completion's own earlier words" in fired[3 + P - 1][0]
    assert "(5% at step 1)" in fired[3 + P - 1][0] and not loops.active()
    assert loops.summary()[-1].startswith("DRIFTING at the end: 20% of completion words repeat"), loops.summary()
    born = run.Health(300)
    assert not any(born.see(r | {"repeated": 0.3}) for r in health_rows([0.0] * (P + 2), [0.9] * (P + 2)))


def test_a_run_that_runs_to_the_cap_says_so_plainly(tiny_model, tmp_path, capsys):
    """The tiny random model never emits its eos: every completion is cut at max_new_tokens. The run says so at step 1
    (the initial model's level), warns once of the degeneration while it happens (stderr, beside the bar, and in
    metrics.jsonl) and its last lines name it: most completions cut is degenerate however the run began."""
    train.main(cfg_for(tiny_model, tmp_path / "run", max_steps=run.Health.PATIENCE + 1), reward_fn=digit_reward)
    out = capsys.readouterr()
    assert out.err.count("WARNING: 100% of completions cut at max_new_tokens=12 at step 1") == 1, out.err[-2000:]
    assert out.err.count("WARNING: 100% of completions cut at max_new_tokens=12 for 5") == 1, out.err[-2000:]
    assert out.out.strip().splitlines()[-1].startswith("DEGENERATE at the end: 100% of completions cut"), out.out
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [bool(r.get("warnings")) for r in rows] == [True] + [False] * (run.Health.PATIENCE - 2) + [True, False]


def test_health_counts_the_cut_rules_from_an_initial_model_that_already_runs_to_the_cap():
    """README's CPU demo: SmolLM2 at a 128-token cap is cut 25-62% from step 1 on. Health says so once at step 1 and
    fires no drift or degeneration while the cut share stays near where it began; one that rises CUT above its start
    for PATIENCE steps is degenerate. A healthy start keeps the absolute bars."""
    P = run.Health.PATIENCE
    demo = run.Health(max_new_tokens=128)
    fired = [demo.see(r) for r in health_rows([0.38, 0.25, 0.62, 0.5, 0.38, 0.38], [0.4] * 6)]
    assert len(fired[0]) == 1 and fired[0][0].startswith("38% of completions cut at max_new_tokens=128 at step 1")
    assert "drift at 48%, degenerate at 58%" in fired[0][0] and not any(fired[1:]), fired
    assert demo.summary()[-1] == "the run started with 38% of completions cut at max_new_tokens=128", demo.summary()
    worse = run.Health(128)
    fired = [worse.see(r) for r in health_rows([0.38] + [0.6] * P, [0.4] * (P + 1))]
    assert [len(f) for f in fired] == [1] + [0] * (P - 1) + [1] and "for 5 steps in a row" in fired[-1][0], fired
    assert worse.active() == ["cut"] and worse.summary()[-1].startswith("DEGENERATE at the end: 60%")
    healthy = run.Health(128)
    assert healthy.see(health_rows([0.05], [0.9])[0]) == [] and healthy.bar(run.Health.CUT) == run.Health.CUT
