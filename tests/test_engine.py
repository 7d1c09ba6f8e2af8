"""TorchEngine against HF: greedy tokens equal `model.generate`, logprobs equal a teacher-forced forward,
seeds, weight updates. Tiny random fp32 models built here (Llama with GQA, Qwen2 with qkv biases and tied
embeddings, GPT-2 for the HF fallback); weights drawn at std 0.3 so greedy paths are varied, not one
repeated token. CUDA-only tests (graphs vs eager vs stock generate) are skipped without a GPU."""
import importlib.util

import pytest
import torch

from system.engine import TorchEngine, hf_greedy
from system.models import load_tokenizer

VOCAB = 512  # the tiny_model tokenizer's: pad 0, eos 1


def build(arch, device="cpu"):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, eos_token_id=1, pad_token_id=0, bos_token_id=None, tie_word_embeddings=True)
    model = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**common)),
             "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),  # qkv biases
             "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                        eos_token_id=1, pad_token_id=0, bos_token_id=None))}[arch]()
    with torch.no_grad():
        for p in model.parameters():  # biases too: zero at init
            p.normal_(0, 1.0 if arch == "gpt2" else 0.3)  # tiny GPT-2 repeats one token at 0.3
    return model.to(device).eval()


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_hf_generate_with_left_padding_and_eos(arch, tok):
    """Greedy tokens equal HF generate's token for token on prompts of mixed lengths; a row that emits an
    eos stops there ("stop"), the others run to max_new_tokens ("length"). GPT-2 takes the HF fallback, and says so
    (it used to fall back silently)."""
    import warnings
    model = build(arch)
    prompts = random_prompts((3, 9, 1, 17, 6))
    free = hf_greedy(model, prompts, 20)
    stop = next(t for row in free for t in row if any(t not in other for other in free))  # some rows emit it, not all
    model.generation_config.eos_token_id = [1, stop]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        engine = TorchEngine(model, tok)
    assert engine.static == (arch != "gpt2")
    assert any("samples through HF generate" in str(w.message) for w in said) == (arch == "gpt2")
    want = hf_greedy(model, prompts, 20)
    got = [g[0] for g in engine.generate(prompts, max_new_tokens=20, temperature=0)]
    assert [c["token_ids"] for c in got] == want
    for c in got:
        assert c["finish_reason"] == ("stop" if c["token_ids"][-1] in (1, stop) else "length")
    assert {c["finish_reason"] for c in got} == {"stop", "length"}


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_logprobs_equal_teacher_forced_log_softmax(temperature, tok):
    """Each sampled token's logprob is log_softmax(logits / T) of a teacher-forced forward over
    prompt + completion (greedy: T = 1), however the row was padded in the batch."""
    model = build("qwen2")
    prompts = random_prompts((4, 11, 2))
    groups = TorchEngine(model, tok).generate(prompts, n=2, max_new_tokens=12, temperature=temperature, seed=5)
    for p, group in zip(prompts, groups):
        for c in group:
            with torch.no_grad():
                logits = model(torch.tensor([p + c["token_ids"]])).logits[0, len(p) - 1:-1]  # [N, V]
            want = torch.log_softmax(logits / (temperature or 1.0), -1).gather(-1, torch.tensor(c["token_ids"])[:, None])
            torch.testing.assert_close(torch.tensor(c["logprobs"]), want[:, 0], atol=1e-4, rtol=1e-4)


def test_same_seed_same_samples_other_seed_other_samples(tok):
    """Sampling is a function of the seed: equal seeds give equal completions, another seed others."""
    engine = TorchEngine(build("llama"), tok)
    prompts = random_prompts((5, 8))
    run = lambda seed: [c["token_ids"] for g in engine.generate(prompts, n=3, max_new_tokens=16, seed=seed) for c in g]  # noqa: E731
    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("continuous, check_every", [(True, 1), (False, 1), (True, 5), (False, 5)])
def test_refilled_rows_give_hf_greedy_and_teacher_forced_logprobs(continuous, check_every, tok):
    """More sequences than cache rows: a row that stops (eos) takes the next waiting sequence at the next look
    (continuous; every check_every steps, 16 on CUDA) or once its whole batch stopped; either way every sequence's
    greedy tokens are HF generate's and its logprobs those of a teacher-forced forward (a stopped row decoding on
    until the look, and the prefill into a used row from slot 0, leave nothing behind)."""
    model = build("llama")
    prompts = random_prompts((3, 9, 1, 17, 6, 4, 12))
    free = hf_greedy(model, prompts, 24)
    model.generation_config.eos_token_id = [1, next(t for row in free for t in row if any(t not in o for o in free))]
    want = hf_greedy(model, prompts, 24)
    assert len({len(w) for w in want}) > 1, "rows must stop at different steps"
    engine = TorchEngine(model, tok, max_batch=2, continuous=continuous)
    engine.check_every = check_every
    got = [g[0] for g in engine.generate(prompts, max_new_tokens=24, temperature=0)]
    assert [c["token_ids"] for c in got] == want
    for p, c in zip(prompts, got):
        with torch.no_grad():
            logits = model(torch.tensor([p + c["token_ids"]])).logits[0, len(p) - 1:-1]
        want_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c["token_ids"])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c["logprobs"]), want_lp, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("check_every", [1, 5])
def test_rows_packed_down_as_they_stop_keep_outputs(check_every, tok):
    """With nothing waiting, rows that stop make the busy rows move down (cache and state), so steps run over a
    smaller batch bucket: every sequence still gets HF generate's greedy tokens and its teacher-forced logprobs."""
    model = build("llama")
    prompts = random_prompts((3, 9, 1, 17, 6, 4, 12, 5, 8, 2, 7, 10, 3))
    free = hf_greedy(model, prompts, 30)
    model.generation_config.eos_token_id = [1] + [row[(7 * i) % 30] for i, row in enumerate(free[:4])]
    want = hf_greedy(model, prompts, 30)
    assert len({len(w) for w in want}) > 3, "rows must stop at different steps"
    engine = TorchEngine(model, tok)
    engine.check_every = check_every
    got = [g[0] for g in engine.generate(prompts, max_new_tokens=30, temperature=0)]
    assert [c["token_ids"] for c in got] == want
    st = engine.last_stats
    assert st["compactions"] > 0 and st["row_steps"] < st["decode_steps"] * engine._bucket(len(prompts)), st
    for p, c in zip(prompts, got):
        with torch.no_grad():
            logits = model(torch.tensor([p + c["token_ids"]])).logits[0, len(p) - 1:-1]
        want_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c["token_ids"])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c["logprobs"]), want_lp, atol=1e-4, rtol=1e-4)


def test_samples_are_reproducible_per_sequence_whatever_the_batching(tok):
    """Sequence i's samples depend on (seed, i) alone: the same with 2, 3 or 64 cache rows, refilled continuously or
    not (the original engine drew them from one generator for the whole batch)."""
    model = build("qwen2")
    prompts = random_prompts((5, 8, 2, 11))
    runs = [[c["token_ids"] for g in TorchEngine(model, tok, max_batch=mb, continuous=cont).generate(
        prompts, n=3, max_new_tokens=16, temperature=1.0, seed=11) for c in g]
        for mb, cont in ((64, True), (2, True), (3, False), (3, True))]
    assert all(r == runs[0] for r in runs[1:])
    assert len({tuple(r) for r in runs[0]}) > 6, "different sequences of one prompt sample differently"


@pytest.mark.parametrize("sampler", ["inverse_cdf", "race"])
def test_sampler_draws_softmax_and_respects_top_p(sampler):
    """Both samplers (the inverse CDF, and the exponential race of compile=True) draw each token with probability
    softmax(logits / T)[token] (40,000 draws, one per key; then one key over 40,000 steps), logprobs are of the full
    softmax; top_p (inverse CDF only) keeps only the nucleus."""
    from system.engine import _sample, _sample_race, sequence_keys
    draw = _sample if sampler == "inverse_cdf" else lambda lg, t, _top_p, k, st: _sample_race(lg, t, k, st)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 40_000
    logits = (probs.log() * 0.7).expand(n, 5)  # at T = 0.7 these are the probabilities above
    for keys, step in ((sequence_keys(3, n, "cpu"), torch.zeros(n, dtype=torch.long)),
                       (sequence_keys(3, 1, "cpu").expand(n), torch.arange(n))):
        nxt, lp = draw(logits, 0.7, 1.0, keys, step)
        freq = torch.bincount(nxt, minlength=5).float() / n
        torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
        torch.testing.assert_close(lp, probs.log()[nxt], atol=1e-5, rtol=1e-5)
    if sampler == "race":
        return
    nxt, lp = _sample(logits, 0.7, 0.7, sequence_keys(4, n, "cpu"), torch.zeros(n, dtype=torch.long))
    freq = torch.bincount(nxt, minlength=5).float() / n
    assert set(nxt.tolist()) == {0, 1} and abs(freq[0] - 2 / 3) < 0.01, freq  # nucleus {0.5, 0.25}, renormalised
    torch.testing.assert_close(lp, probs.log()[nxt], atol=1e-5, rtol=1e-5)  # not renormalised: the ratio stays unbiased


@pytest.mark.extended  # compiling on 2 CPU cores takes a minute; tests/test_gpu.py runs it on CUDA with graphs
def test_compiled_engine_matches_eager_greedy_and_samples_per_sequence(tok):
    """compile=True (the decode forward and the race sampler under torch.compile): the eager engine's greedy tokens;
    sampled ones the same for a sequence however it is batched."""
    model = build("qwen2")
    prompts = random_prompts((5, 8, 2, 11))
    compiled = TorchEngine(model, tok, compile=True)
    assert [g[0]["token_ids"] for g in compiled.generate(prompts, max_new_tokens=12, temperature=0)] == \
        [g[0]["token_ids"] for g in TorchEngine(model, tok).generate(prompts, max_new_tokens=12, temperature=0)]
    runs = [[c["token_ids"] for g in TorchEngine(model, tok, max_batch=mb, compile=True).generate(
        prompts, n=3, max_new_tokens=12, temperature=1.0, seed=5) for c in g] for mb in (64, 3)]
    assert runs[0] == runs[1] and len({tuple(r) for r in runs[0]}) > 6


def test_compiled_decode_step_compiles_once_for_every_batch_bucket(tok):
    """compile=True compiles the decode step on the first call, each function once; calls over fewer rows than the
    cache holds (other batch buckets, down to one sequence) compile nothing more. What it guards against: traced with
    duck sizing, the rows in play tie to the cache's rows, so each new bucket compiles again; a 1-row step
    specializes on size 1; a final norm over [B, D] after the layers' over [B, 1, D] compiles the norm twice."""
    from torch._dynamo.utils import counters
    engine = TorchEngine(build("qwen2"), tok, max_batch=32, compile=True)
    with torch._dynamo.config.patch(error_on_recompile=True):  # no function compiled twice in the first call either
        engine.generate(random_prompts([5] * 8), n=4, max_new_tokens=4)  # 32 rows: the cache's
    before = counters["stats"]["unique_graphs"]
    for n in (24, 12, 5, 2, 1):
        engine.generate(random_prompts([7] * n), max_new_tokens=4)
    assert counters["stats"]["unique_graphs"] == before


def test_update_weights_changes_outputs_and_restoring_restores_them(tok):
    """update_weights copies in place: perturbed weights change greedy outputs, the originals bring them back."""
    model = build("qwen2")
    engine = TorchEngine(model, tok)
    prompts = random_prompts((6, 3, 10))
    greedy = lambda: [g[0]["token_ids"] for g in engine.generate(prompts, max_new_tokens=12, temperature=0)]  # noqa: E731
    before, original = greedy(), {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    engine.update_weights((k, v + 0.3 * torch.randn_like(v)) for k, v in original.items())
    assert greedy() != before
    assert engine.update_weights(original.items()) == 2
    assert greedy() == before


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_projections_are_the_parameters(arch, tok):
    """q/k/v and gate/up run as one GEMM each over fused weights whose rows are the model's parameters: the unfused
    forward's tokens and logprobs, one copy of the weights, and an engine that follows parameters moved after it was
    made (model.to()) instead of computing with stale fused copies, whether the move is seen first by generate or by
    update_weights."""
    model = build(arch)
    prompts = random_prompts((6, 3, 10))
    fused, plain = TorchEngine(model, tok), TorchEngine(model, tok, fuse=False)
    run = lambda e: [g[0] for g in e.generate(prompts, max_new_tokens=12, temperature=0)]  # noqa: E731
    a, b = run(fused), run(plain)
    assert [c["token_ids"] for c in a] == [c["token_ids"] for c in b]
    assert torch.allclose(torch.tensor(sum((c["logprobs"] for c in a), [])),
                          torch.tensor(sum((c["logprobs"] for c in b), [])), atol=1e-5)
    attn = model.model.layers[0].self_attn
    (w, bias), (gate_up, _) = fused.proj[0]
    assert attn.k_proj.weight.data_ptr() == w[attn.q_proj.out_features].data_ptr()  # a view, not a copy
    assert (bias is None) == (arch == "llama")
    assert model.model.layers[0].mlp.up_proj.weight.data_ptr() == gate_up[gate_up.shape[0] // 2].data_ptr()
    assert TorchEngine(model, tok).proj[0][0] is fused.proj[0][0]  # a second engine on the model: the same weights
    with torch.no_grad():
        for p in model.parameters():  # moved (as model.to() does), then changed in place
            p.data = p.data.clone()
            p.add_(0.3 * torch.randn_like(p))
    assert [c["token_ids"] for c in run(fused)] == hf_greedy(model, prompts, 12) != [c["token_ids"] for c in a]
    fused.update_weights((k, v.detach()) for k, v in model.named_parameters())  # copy destinations planned on these
    for p in model.parameters():  # moved again, then new weights through update_weights before any generate
        p.data = p.data.clone()
    torch.manual_seed(2)
    new = {k: v.detach() + 0.3 * torch.randn_like(v) for k, v in model.named_parameters()}  # a tied weight once
    fused.update_weights(new.items())
    want = build(arch)
    assert want.load_state_dict(new, strict=False).missing_keys == ["lm_head.weight"]  # tied: the embedding's
    assert [c["token_ids"] for c in run(fused)] == hf_greedy(want, prompts, 12)


def test_cache_grown_by_a_longer_call_keeps_outputs(tok):
    """A cache grown (more rows, more slots) by a later call gives a fresh engine's outputs."""
    model = build("llama")
    prompts = random_prompts((5, 12, 2, 7, 9))
    fresh = TorchEngine(model, tok).generate(prompts, max_new_tokens=150, temperature=0)
    engine = TorchEngine(model, tok)
    engine.generate(prompts[:1], max_new_tokens=3, temperature=0)  # a small cache first
    assert engine.generate(prompts, max_new_tokens=150, temperature=0) == fresh


def test_context_ending_on_a_cache_block_edge(tok):
    """prompt + max_new_tokens - 1 = a whole number of cache blocks: the step that samples a row's last token still
    has a slot to feed it into (the serve tests found this edge), and the tokens are HF generate's."""
    model = build("llama")
    prompts = random_prompts((TorchEngine.BLOCK + 1 - 12, 40))
    got = [g[0]["token_ids"] for g in TorchEngine(model, tok).generate(prompts, max_new_tokens=12, temperature=0)]
    assert got == hf_greedy(model, prompts, 12)


def test_too_long_request_names_max_model_len(tok):
    """prompt + max_new_tokens over max_model_len is an error that names the knob."""
    engine = TorchEngine(build("llama"), tok, max_model_len=32)
    with pytest.raises(AssertionError, match="max_model_len"):
        engine.generate(random_prompts((10,)), max_new_tokens=30)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_equal_eager_and_hf_generate_and_follow_weight_updates(tok):
    """fp32 on CUDA: graph-replayed decode steps (batch bucket 3 for 3 rows, attended length crossing a
    128-slot bucket) give eager's and HF generate's greedy tokens; after update_weights the same graphs
    compute with the new weights (no re-capture)."""
    model = build("qwen2", "cuda")
    prompts = random_prompts((100, 90, 120))
    graphs, eager = TorchEngine(model, tok), TorchEngine(model, tok, cuda_graphs=False)
    run = lambda e: [g[0]["token_ids"] for g in e.generate(prompts, max_new_tokens=60, temperature=0)]  # noqa: E731
    assert run(graphs) == run(eager) == hf_greedy(model, prompts, 60)
    assert {k[:2] for k in graphs.graphs} >= {(3, 128), (3, 256)}  # (rows bucket, slots bucket); fewer rows as they stop
    refill = TorchEngine(model, tok, max_batch=2)  # 3 sequences on 2 rows: the third is prefilled into a used row
    assert run(refill) == run(eager)
    captured = dict(graphs.graphs)
    torch.manual_seed(1)
    state = {k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}
    for e in (graphs, eager):  # both engines share the model: the second copy writes the same values again
        e.update_weights(state.items())
    assert run(graphs) == run(eager) == hf_greedy(model, prompts, 60)
    assert graphs.graphs == captured  # the same CUDAGraph objects


@pytest.mark.parametrize("kind", ["torch", pytest.param("vllm", marks=[pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs vLLM")])])
def test_engine_protocol(kind, tiny_model, tiny_stop_model):
    """TorchEngine and VLLMEngine (in its own process: vLLM pins the process's threads) satisfy system.engine.Engine
    (conftest.check_engine_contract; ServeClient takes the same check in test_serve.py), and report the finish
    reason as HF generate's greedy rows have it (conftest.check_finish_reasons: "stop" at an eos, "length" at the
    cap)."""
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT, check_engine_contract, check_finish_reasons
    if kind == "torch":
        from system.models import load_model
        check_engine_contract(TorchEngine(load_model(tiny_model), load_tokenizer(tiny_model)), tiny_model)
        stop_dir, rows, reasons = tiny_stop_model
        check_finish_reasons(TorchEngine(load_model(stop_dir), load_tokenizer(stop_dir)), rows, reasons)
        return
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "conftest.py"), "vllm", tiny_model,
                        tiny_stop_model[0], json.dumps(tiny_stop_model[1:])], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))})
    assert p.returncode == 0 and "contract ok" in p.stdout, (p.stdout + p.stderr)[-3000:]
