"""exps/kl_sources.py: the initial model's log-probs on a run's validation completions (CPU, seconds)."""
import json
import os
import sys

import pytest
import torch
import yaml

from conftest import GSM8K, ROOT

sys.path.insert(0, os.path.join(ROOT, "exps"))
import kl_sources  # noqa: E402
import gsm8k  # noqa: E402
import rewards  # noqa: E402
from system.models import load_model, load_tokenizer  # noqa: E402

COMPLETIONS = [" <think> 48 / 2 = 24 </think> <answer> 72 </answer>", " The answer is 72 dollars.",
               " <think> 48 + 24 </think> <answer> 72"]


def make_run(path, model, golds=None):
    """A run folder as train.py leaves it, as far as kl_sources reads it: config.yaml and one step's samples."""
    os.makedirs(path / "samples")
    (path / "config.yaml").write_text(yaml.safe_dump({"model": model, "data": GSM8K, "prompt": gsm8k.DEFAULT_PROMPT,
                                                      "val_size": 7}))
    val = gsm8k.split_train_val(gsm8k.load_split(GSM8K, "train"), 7)[1]
    golds = golds or [rewards.parse_gold(r["answer"]) for r in val]
    with open(path / "samples" / "val_step_000004.jsonl", "w") as f:
        for gold, text, reason in zip(golds, COMPLETIONS, ["stop", "stop", "length"]):
            f.write(json.dumps({"gold": gold, "completion": text, "finish_reason": reason}) + "\n")
    return str(path)


def test_the_log_probs_are_the_models_own_next_token_log_likelihood(tiny_model):
    tok, lm = load_tokenizer(tiny_model), load_model(tiny_model).eval()
    prompt, completion = tok("Natalia sold clips")["input_ids"], tok(COMPLETIONS[0])["input_ids"]
    read = kl_sources.read_prompt(lm, prompt)  # once, for every completion of this prompt
    lp = kl_sources.completion_logprobs(lm, read, completion)
    assert torch.equal(kl_sources.completion_logprobs(lm, read, completion), lp)  # the prompt's cache left as it was
    assert kl_sources.completion_logprobs(lm, read, completion[:1]).tolist() == pytest.approx(lp[:1].tolist())
    labels = torch.tensor([[-100] * len(prompt) + completion])  # HF's loss shifts the labels itself
    with torch.no_grad():
        nll = lm(torch.tensor([prompt + completion]), labels=labels).loss
    assert lp.shape == (len(completion),) and (lp <= 0).all()
    assert lp.sum().item() == pytest.approx(-nll.item() * len(completion), rel=1e-5)
    assert kl_sources.k3_if_sure(torch.tensor([0.0, -1.0, -20.0])).tolist() == pytest.approx(
        [0.0, torch.exp(torch.tensor(-1.0)).item(), 19.0 + torch.exp(torch.tensor(-20.0)).item()])


def test_one_line_per_step_and_the_unlikely_tokens_named(tiny_model, tmp_path, capsys):
    run = make_run(tmp_path / "run", tiny_model)
    tok = load_tokenizer(tiny_model)
    n_tok = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in COMPLETIONS) + 2  # an eos per stopped one
    kl_sources.main([run, "--steps", "4", "--n", "3", "--below", "0"])  # every token is below 0 nats
    everything = json.loads(capsys.readouterr().out)
    assert (everything["run"], everything["step"], everything["completions"]) == (run, 4, 3)
    assert everything["tokens"] == n_tok
    assert everything["share_below"] == 1.0 and everything["k3_share_below"] == 1.0
    assert everything["k3_if_sure"] > 0 and 0 < len(everything["top_contexts"]) <= 8
    kl_sources.main([run, "--steps", "4", "--n", "3", "--below", "-1000"])  # no token is this unlikely
    nothing = json.loads(capsys.readouterr().out)
    assert nothing["share_below"] == 0.0 and nothing["k3_share_below"] == 0.0 and nothing["top_contexts"] == []
    assert nothing["k3_if_sure"] == everything["k3_if_sure"] and nothing["mean_logp"] == everything["mean_logp"]


def test_samples_of_other_problems_are_refused(tiny_model, tmp_path):
    run = make_run(tmp_path / "run", tiny_model, golds=["1", "2", "3"])
    with pytest.raises(SystemExit, match="not the run's validation problems in order; pass the --data"):
        kl_sources.main([run, "--steps", "4", "--n", "3"])
