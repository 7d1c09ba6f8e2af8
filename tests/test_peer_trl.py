"""bench/peer_trl.py on the CPU: TRL's GRPOTrainer (its HF generate) beside our loop on a tiny model, 2 steps each.

The TRL tests skip where trl is not importable (CI may not install it; PYTHONPATH=<a pip --target folder> works).
"""
import json
import os
import sys

import pytest

from conftest import ROOT, run_group

sys.path.insert(0, os.path.join(ROOT, "bench"))
import peer_trl  # noqa: E402

BENCH = os.path.join(ROOT, "bench", "peer_trl.py")
TINY = ["--steps", "2", "--prompts", "2", "--group", "2", "--max-new-tokens", "8", "--val-size", "2", "--no-vllm",
        "--eval-engine", "torch", "--timeout-min", "10",
        "--set", "val_size=2", "compile=false", "compile_engine=false", "micro_batch_size=2", "engine_rows=0",
        "overlong_buffer=4"]  # the recipe's penalty, over the last half of these completions


def gsm8k_like(folder):
    """8 train rows (2 held out for validation) and 1 test row, in gsm8k.load_split's jsonl form."""
    folder.mkdir()
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
             "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a, b in
            [(3, 4), (5, 6), (7, 8), (12, 9), (20, 22), (1, 1), (9, 30), (14, 6)]]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    return str(folder)


def bench(tiny_model, tmp_path, *extra):
    cmd = [sys.executable, BENCH, "--model", tiny_model, "--data", gsm8k_like(tmp_path / "gsm8k"),
           "--out", str(tmp_path / "out"), *TINY, *extra]
    p = run_group(cmd, 900, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_reward_bridge_reads_the_finish_reason_off_the_ids():
    """trl_reward: a completion of max_new_tokens ids whose last is no eos was cut ("length") and earns nothing for
    its answer; the same text ending in an eos at the cap, or shorter, stopped and is graded. The recipe's overlong
    penalty counts the ids: at the cap it costs overlong_weight, before the buffer nothing."""
    import types
    cfg = peer_trl.recipe(types.SimpleNamespace(recipe=os.path.join(ROOT, "exps", "qwen_coder_r1zero", "config.yaml"),
                                                steps=2, model="", data="", prompts=0, group=0, max_new_tokens=4,
                                                set=["overlong_buffer=2"]))
    tally = types.SimpleNamespace(eos={1}, scores=[])
    text = "<think> 3 + 4 = 7 </think><answer> 7 </answer>"
    got = peer_trl.trl_reward(cfg, tally)(completions=[text] * 3, completion_ids=[[5, 6, 7, 8], [5, 6, 7, 1], [5, 1]],
                                          answer=["3 + 4 = 7\n#### 7"] * 3, trainer_state=None, log_metric=None)
    w = cfg.overlong_weight
    assert w > 0 and got == pytest.approx([-w, cfg.format_weight + 1.0 - w, cfg.format_weight + 1.0]), got
    assert [s["cut"] for s in tally.scores] == [True, False, False] and [s["tokens"] for s in tally.scores] == [4, 4, 2]


@pytest.mark.slow
def test_both_sides_run_their_steps_and_are_graded(tiny_model, tmp_path):
    """One JSON line: TRL (HF generate, 2 completions per micro-batch, 2 accumulated) and ours each ran 2 steps,
    with the step time's parts, sampled tokens and a strict validation score of the step-2 model; TRL's tokeniser
    gave our prompt ids back and its batch mapping is one generation of P x G completions per optimizer step."""
    pytest.importorskip("trl")
    r = bench(tiny_model, tmp_path)
    assert (r["bench"], r["trl_generation"], r["steps"], r["prompts"], r["group"]) == \
        ("peer_trl", "hf-generate", 2, 2, 2), r
    for side in ("trl", "ours"):
        s = r[side]
        assert "error" not in s, s
        assert s["steps_run"] == 2 and len(s["step_s_each"]) == 2 and s["first_step_s"] > 0, s
        for k in ("step_s", "gen_s", "train_s", "gen_tok_s", "tok_s"):
            assert s[k] is not None and s[k] > 0, (side, k, s)
        assert s["reward_s"] is not None and s["reward_s"] >= 0, s  # 4 completions: well under a millisecond
        assert 1 <= s["completion_len_mean"] <= 8 and 0 <= s["cut_mean"] <= 1, s
        assert "error" not in s["val"] and s["val"]["n"] == 2 and 0 <= s["val"]["pass@1_strict"] <= 1, s["val"]
    assert {k: len(v) for k, v in r["ours"]["warmup"].items()} == {
        "compiled_graphs": 2, "compile_s": 2, "engine_graphs": 2, "capture_s": 2}, r["ours"]  # one per step
    assert r["trl"]["trl_batch"] == {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                     "gradient_checkpointing": True, "generation_batch_size": 4,
                                     "use_vllm": False}, r["trl"]
    assert r["trl"]["prompt_ids_equal"] == 1.0, r["trl"]
    # the finish reasons trl_reward derives agree with TRL's own truncation test
    assert r["trl"]["cut_mean"] == pytest.approx(r["trl"]["trl_logged_clipped_ratio_mean"], abs=1e-3), r["trl"]
    assert r["trl_over_ours_step_s"] > 0, r


@pytest.mark.slow
def test_a_failing_side_says_what_failed(tiny_model, tmp_path):
    """A TRL side that raises (here a micro-batch that does not divide the step) is the exception's last line under
    "error" in the JSON, not a crash or a silent gap."""
    pytest.importorskip("trl")
    r = bench(tiny_model, tmp_path, "--sides", "trl", "--trl-micro-batch", "3")
    assert r["trl"]["error"] == "ValueError: --trl-micro-batch 3 does not divide the 4 completions of a step", r
    assert "ours" not in r and "trl_over_ours_step_s" not in r, r
