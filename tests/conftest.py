"""Shared fixtures: a tiny random Llama and a tokenizer trained here, saved as a local HF folder.

Nothing is downloaded. The tokenizer is a byte-level BPE fit on GSM8K-like text in well under a
second; the model has head_dim 32, which vLLM's CPU attention accepts.
"""
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GSM8K = os.environ.get("GSM8K_DIR", os.path.join(os.path.dirname(ROOT), "shared", "data", "gsm8k"))  # the jsonl folder


def make_tiny_model(path, vocab=512, hidden=64, layers=2, heads=2, kv_heads=1, seed=0):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    texts = ["<think> </think> <answer> </answer> User: Assistant: 0123456789 + - * / = $ ,",
             "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
             "How many clips did Natalia sell altogether? The answer is 72 dollars."] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def kill_tree(pid):
    """SIGKILL pid and every process under it, in any session, and return once each is a zombie or gone. Each process
    is stopped before its children are read: a stopped process starts no more, so none is missed (listing first raced
    a parent starting a child just then, and that child, in a session of its own, lived on holding the output pipes)."""
    import time
    import psutil
    seen, todo = {}, [pid]
    while todo:
        try:
            q = psutil.Process(todo.pop())
            q.suspend()
            deadline = time.monotonic() + 5
            while q.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE) and time.monotonic() < deadline:
                time.sleep(0.001)  # SIGSTOP lands asynchronously: a fork in flight completes first
            seen[q.pid] = q
            todo += [c.pid for c in q.children() if c.pid not in seen]
        except psutil.NoSuchProcess:
            pass
    for q in seen.values():
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)  # and any of its process group no longer under it
    except ProcessLookupError:
        pass
    # SIGKILL lands asynchronously: a killed process runs on through its exit, its pipes already closed, before it is
    # a zombie or gone (a check right after run_group returned saw one "running")
    deadline = time.monotonic() + 30
    for q in seen.values():
        while time.monotonic() < deadline:
            try:
                if q.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)


def run_group(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) in a process group of its own: on timeout it and every
    process under it are killed (a launcher's hung ranks too: torchrun starts each in a session of its own, where
    killing the group misses them and they keep the output pipes open) and TimeoutError shows the output's tail."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate()
        raise TimeoutError(f"{' '.join(map(str, cmd))[:200]} ran past {timeout} s; it and its processes were killed\n"
                           f"{(out + err)[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


PROMPTS = [[5, 6, 7, 8, 9], [30, 31, 32], [100, 101, 102, 103], [7, 7, 7]]
STOP_TOKENS = 8  # greedy tokens of PROMPTS in which the stop model's second eos comes up for some rows, not all


def make_stop_model(src, path):
    """The tiny model of src with a second eos: a token its greedy completions of PROMPTS emit within STOP_TOKENS in
    some rows and not in others (generation_config.json, which every engine reads), so that both finish reasons come
    up. Returns (path, the greedy rows: new tokens up to and with the first eos, and each row's finish reason)."""
    import shutil
    from transformers import AutoModelForCausalLM
    from system.engine import hf_greedy
    shutil.copytree(src, path)
    model = AutoModelForCausalLM.from_pretrained(path)
    free = hf_greedy(model, PROMPTS, STOP_TOKENS)
    stop = next(t for row in free for t in row[1:] if sum(t in r for r in free) < len(free))
    model.generation_config.eos_token_id = [model.config.eos_token_id, stop]
    model.generation_config.save_pretrained(path)
    rows = hf_greedy(model, PROMPTS, STOP_TOKENS)
    return str(path), rows, row_reasons(rows, model.generation_config.eos_token_id)


def row_reasons(rows, eos):
    """The finish reason of each of hf_greedy's rows (cut after its first eos): "stop" if it ends with an eos."""
    return ["stop" if r[-1] in eos else "length" for r in rows]


@pytest.fixture(scope="session")
def tiny_stop_model(tmp_path_factory, tiny_model):
    """(model folder, its greedy rows of PROMPTS, their finish reasons): make_stop_model's."""
    return make_stop_model(tiny_model, tmp_path_factory.mktemp("tiny_stop") / "model")


def check_finish_reasons(engine, rows, reasons):
    """Greedy completions of PROMPTS (STOP_TOKENS new tokens) are the rows HF generate gives, with their reasons: a
    row that emits an eos ends with it, "stop"; the others run to the cap, "length". The same for every engine."""
    got = [g[0] for g in engine.generate(PROMPTS, max_new_tokens=STOP_TOKENS, temperature=0)]
    assert [c["token_ids"] for c in got] == rows
    assert [c["finish_reason"] for c in got] == reasons
    assert set(reasons) == {"stop", "length"}


def check_engine_contract(engine, model_dir):
    """system.engine.Engine, as the trainer and the evaluation use it, for any engine holding the model in model_dir (fp32):
    completions well formed, seeded sampling repeatable, update_weights -> the new int version, carried by the
    completions, and what the engine computes with: perturbed weights change greedy output, the originals restore it."""
    import torch
    from safetensors.torch import load_file
    from system.engine import Engine
    assert isinstance(engine, Engine), type(engine)
    out = engine.generate(PROMPTS, n=2, max_new_tokens=6, temperature=1.0, seed=1)
    assert [len(g) for g in out] == [2] * len(PROMPTS)
    for c in (c for g in out for c in g):
        assert set(c) >= {"token_ids", "logprobs", "text", "finish_reason", "version"}, c.keys()
        assert 0 < len(c["token_ids"]) == len(c["logprobs"]) <= 6 and all(lp <= 0 for lp in c["logprobs"])
        assert isinstance(c["text"], str)
        # the tiny model's one eos (id 1) is almost never sampled: a completion short of the cap ended with it
        assert c["finish_reason"] == ("stop" if len(c["token_ids"]) < 6 or c["token_ids"][-1] == 1 else "length"), c
    assert engine.generate(PROMPTS, n=2, max_new_tokens=6, temperature=1.0, seed=1) == out, "same seed, same samples"

    def greedy():
        return [g[0]["token_ids"] for g in engine.generate(PROMPTS, max_new_tokens=8, temperature=0)]

    before, original = greedy(), load_file(os.path.join(model_dir, "model.safetensors"))
    if "lm_head.weight" not in original:  # tied: engines that keep their own head (vLLM) need it named
        original["lm_head.weight"] = original["model.embed_tokens.weight"]
    torch.manual_seed(0)
    perturbed = {k: v + 0.5 * torch.randn_like(v) for k, v in original.items()}
    perturbed["lm_head.weight"] = perturbed["model.embed_tokens.weight"]  # keep the tie
    v1 = engine.update_weights(perturbed.items())
    assert isinstance(v1, int) and v1 == engine.version, (v1, engine.version)
    comps = engine.generate(PROMPTS, max_new_tokens=8, temperature=0)
    assert [g[0]["token_ids"] for g in comps] != before and {g[0]["version"] for g in comps} == {v1}
    assert engine.update_weights(original.items()) == v1 + 1 == engine.version
    assert greedy() == before, "the original weights restore the original greedy output"


def check_no_stale_prefix_cache(engine, model_dir):
    """vLLM with prefix caching: KV cached under old weights is never reused after a weight update. A prompt of two
    full KV blocks is first run under perturbed weights, then under the originals again: its greedy tokens must be
    those of a run with the prefix cache emptied by hand."""
    import torch
    from safetensors.torch import load_file
    cache = engine.llm.llm_engine.vllm_config.cache_config
    assert cache.enable_prefix_caching, "the check needs vLLM's prefix caching on"
    original = load_file(os.path.join(model_dir, "model.safetensors"))
    torch.manual_seed(1)
    perturbed = {k: v + 0.5 * torch.randn_like(v) for k, v in original.items()}
    long = [[5 + i % 500 for i in range(2 * cache.block_size + 1)]]
    greedy = lambda: engine.generate(long, max_new_tokens=8, temperature=0)[0][0]["token_ids"]  # noqa: E731
    engine.update_weights(perturbed.items())
    stale = greedy()  # its prompt's blocks now cached, computed by the perturbed weights
    engine.update_weights(original.items())
    after = greedy()
    engine.llm.reset_prefix_cache()
    assert after == greedy() != stale, "a request after the update reused KV cached under the old weights"


if __name__ == "__main__":  # python tests/conftest.py vllm MODEL_DIR [STOP_MODEL_DIR '[ROWS, REASONS]']: the contract
    # on an in-process VLLMEngine, and the stop model's greedy rows and finish reasons (HF generate's, as JSON)
    sys.argv[1] == "vllm" or sys.exit(f"unknown engine {sys.argv[1]!r}")
    import json
    from infer_workers import make_engine
    e = make_engine(sys.argv[2], "vllm", dtype="float32", max_model_len=1024)
    check_engine_contract(e, sys.argv[2])
    check_no_stale_prefix_cache(e, sys.argv[2])
    if len(sys.argv) > 3:
        del e
        check_finish_reasons(make_engine(sys.argv[3], "vllm", dtype="float32", max_model_len=1024),
                             *json.loads(sys.argv[4]))
    print("contract ok")
