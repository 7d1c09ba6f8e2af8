"""train.py end to end on a tiny random model: a run, exact resume, learning, several ranks."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import GSM8K, ROOT


def digit_reward(text, answer):
    """Toy reward with signal even for a random model: the fraction of characters that are digits."""
    return {"reward": sum(ch.isdigit() for ch in text) / max(len(text), 1)}


def cfg_for(model, run_dir, **kw):
    base = dict(model=model, data=GSM8K, run_dir=str(run_dir), prompts_per_step=2, group_size=4,
                max_new_tokens=12, micro_batch_size=3, lr=1e-3, seed=0)
    return train.Config(**(base | kw))


def test_three_steps_end_to_end(tiny_model, tmp_path):
    """3 steps with the real GSM8K rewards and KL: metrics per step, config, eval and an HF checkpoint."""
    cfg = cfg_for(tiny_model, tmp_path / "run", max_steps=3, kl_coef=0.05, eval_every=2, eval_size=3)
    train.main(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["version"] for r in rows] == [1, 2, 3], "the engine took one weight update per step"
    assert "eval/pass@1_strict" in rows[0] and "eval/pass@1_strict" in rows[2] and "eval/pass@1_strict" not in rows[1]
    for k in ("reward", "accuracy", "format", "kl", "entropy", "completion_len", "loss", "grad_norm", "gen_tok_s",
              "train_tok_s"):
        assert all(isinstance(r[k], float) for r in rows), k
    assert train.load_config([str(tmp_path / "run" / "config.yaml")]) == cfg
    ckpt = tmp_path / "run" / "ckpt" / "latest"
    assert os.readlink(ckpt) == "step_000003" and (ckpt / "model" / "config.json").exists()
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["step"] == 3 and state["config"] == dataclasses.asdict(cfg)


class Crash(Exception):
    pass


def test_resume_continues_exactly(tiny_model, tmp_path):
    """Crash after the step-2 checkpoint, --resume, finish: parameters equal an uninterrupted run's."""
    train.main(cfg_for(tiny_model, tmp_path / "a", max_steps=4), reward_fn=digit_reward)

    calls = {"n": 0}

    def crashing_reward(text, answer):
        calls["n"] += 1
        if calls["n"] > 2 * 8:  # 8 completions per step: crash inside step 3
            raise Crash
        return digit_reward(text, answer)

    cfg_b = cfg_for(tiny_model, tmp_path / "b", max_steps=4, ckpt_every=2)
    with pytest.raises(Crash):
        train.main(cfg_b, reward_fn=crashing_reward)
    assert os.readlink(tmp_path / "b" / "ckpt" / "latest") == "step_000002"
    train.main(dataclasses.replace(cfg_b, resume=True), reward_fn=digit_reward)

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


def test_two_ranks_with_accelerate_launch(tiny_model, tmp_path):
    """accelerate launch with 2 CPU processes (gloo DDP) trains and checkpoints."""
    run = tmp_path / "ddp"
    # --multi_gpu only makes accelerate start the ranks through torchrun; train.py picks gloo without CUDA
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "train.py"),
           f"--model={tiny_model}", f"--data={GSM8K}", f"--run_dir={run}", "--max_steps=2", "--prompts_per_step=2",
           "--group_size=2", "--max_new_tokens=8"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 rank(s)" in p.stdout + p.stderr
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2]
    assert (run / "ckpt" / "latest" / "state.pt").exists()


def test_two_rank_step_equals_one_rank(tmp_path):
    """bench/multi_gpu.py on CPU (gloo DDP): 2 ranks' GRPO step = 1 rank's: loss, grad norm, weights."""
    script = [os.path.join(ROOT, "bench", "multi_gpu.py"), "--shape", "small", "--prompts", "4", "--ref", str(tmp_path)]
    subprocess.run([sys.executable] + script, check=True, timeout=600, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", *script], check=True, timeout=600, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["world"] == 2 and r["loss_rel_diff"] < 1e-5 and r["grad_norm_rel_diff"] < 1e-5, r
    assert r["weights_rel_err_max"] < 1e-3, r
