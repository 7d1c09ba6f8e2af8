"""The GRPO math in train.py, checked against naive and hand-computed values on CPU."""
import dataclasses
import math

import pytest
import torch
import yaml

import train
from system import models
from system.batches import collate, token_logprobs
from train import Config, group_advantages, grpo_loss, load_config, loss_norm


@pytest.fixture(scope="module")
def lm(tiny_model):
    from system.models import load_model
    return load_model(tiny_model)


def naive_logprobs(model, ids, attn, temperature=1.0):
    logits = model(input_ids=ids, attention_mask=attn).logits.float() / temperature  # [B, L, V]
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            out[b, t] = torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]]  # position t predicts token t+1
    return out


def test_logprobs_match_naive_shift(lm):
    """token_logprobs[b, t] is log p(ids[t+1] | ids[:t+1]): the original Simple-R1's off-by-one regression."""
    torch.manual_seed(0)
    ids = torch.randint(2, 500, (3, 11))
    attn = torch.ones_like(ids)
    for temperature in (1.0, 0.7):
        fast, _ = token_logprobs(lm, {"input_ids": ids, "attention_mask": attn}, temperature, chunk=4)  # chunk 4 splits rows mid-sequence
        torch.testing.assert_close(fast, naive_logprobs(lm, ids, attn, temperature), atol=1e-5, rtol=1e-5)
    unshifted = torch.log_softmax(lm(input_ids=ids).logits.float(), -1)[:, 1:].gather(-1, ids[:, 1:, None])[..., 0]
    assert not torch.allclose(fast, unshifted, atol=1e-3), "an off-by-one would match this"


def test_logprob_chunks_do_not_change_values_or_grads(lm):
    """Chunk size is a memory knob only: values and gradients are identical for any chunk."""
    ids = torch.randint(2, 500, (2, 9))
    attn = torch.ones_like(ids)
    grads = []
    for chunk in (3, 1000):
        lm.zero_grad()
        lp, ent = token_logprobs(lm, {"input_ids": ids, "attention_mask": attn}, 1.0, chunk)
        lp.sum().backward()
        grads.append((lp.detach(), ent, lm.model.embed_tokens.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert (grads[0][1] > 0).all() and (grads[0][1] <= math.log(lm.config.vocab_size) + 1e-4).all()


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_engine_logprobs_equal_trainer_logprobs(lm, tiny_model, top_p):
    """The engine's sampled-token logprobs line up with the trainer's (same weights, fp32): ratio == 1; with top_p < 1
    too: they are of the full softmax(logits / T), not renormalised over the nucleus (that would bias the ratio)."""
    from system.engine import TorchEngine
    from system.models import load_model, load_tokenizer
    tok = load_tokenizer(tiny_model)
    engine = TorchEngine(load_model(tiny_model), tok)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]  # different lengths: exercises left padding in the engine
    groups = engine.generate(prompts, n=2, max_new_tokens=6, temperature=0.8, top_p=top_p, seed=3)
    comps = [c for g in groups for c in g]
    inputs, mask, old = collate([p for p in prompts for _ in range(2)], comps, tok.pad_token_id, "cpu")
    with torch.no_grad():
        lp, _ = token_logprobs(lm, inputs, 0.8)
    torch.testing.assert_close(lp * mask, old, atol=1e-4, rtol=1e-4)


def test_engine_batching_and_padding_do_not_change_greedy_output(tiny_model):
    """A prompt's greedy completion is the same alone or left-padded in a batch with a longer one."""
    from system.engine import TorchEngine
    from system.models import load_model, load_tokenizer
    engine = TorchEngine(load_model(tiny_model), load_tokenizer(tiny_model))
    short, long = [5, 6, 7], list(range(20, 40))
    alone = engine.generate([short], max_new_tokens=8, temperature=0)[0][0]["token_ids"]
    batched = engine.generate([long, short], max_new_tokens=8, temperature=0)[1][0]["token_ids"]
    assert alone == batched


def test_collate_aligns_mask_and_old_logprobs():
    """loss_mask and old_logp sit at the L-1 positions that predict completion tokens."""
    prompts, comps = [[5, 6], [7]], [{"token_ids": [1, 2, 3], "logprobs": [-.1, -.2, -.3]}, {"token_ids": [4], "logprobs": [-.4]}]
    inputs, mask, old = collate(prompts, comps, 0, "cpu")
    assert inputs["input_ids"].tolist() == [[5, 6, 1, 2, 3], [7, 4, 0, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    torch.testing.assert_close(old, torch.tensor([[0, -.1, -.2, -.3], [-.4, 0, 0, 0]]))
    packed, pmask, pold = collate(prompts, comps, 0, "cpu", packed=True)
    assert packed["input_ids"].tolist() == [[5, 6, 1, 2, 3, 7, 4]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert packed["cu_seq_lens_q"].tolist() == [0, 5, 7] and packed["max_length_q"] == 5
    for x in (inputs, packed):  # the positions whose next token is a completion token, in the flattened inputs
        at, targets, where, grid = x["predict"]
        assert at.tolist() == [1, 2, 3, 5] and targets.tolist() == [1, 2, 3, 4] and where.tolist() == [1, 2, 3, 4]
        assert grid == mask.shape
    assert torch.equal(pmask, mask) and torch.equal(pold, old)
    shared, smask, sold = collate([[5, 6], [5, 6], [7]], [{"token_ids": [7, 8], "logprobs": [-.1, -.2]},
                                                          {"token_ids": [9], "logprobs": [-.3]}, comps[1]], 0, "cpu",
                                  packed=True, share_prompts=True)
    assert shared["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 4]]  # [5, 6] once, then both its completions
    assert shared["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1]]  # each completion from len(prompt)
    assert shared["cu_seq_lens_q"].tolist() == [0, 5, 7]
    keys, cu_q, cu_k, max_q, max_k = shared["shared"]  # blocks: prompt [5, 6], its completions [7, 8] and [9], [7], [4]
    assert cu_q.tolist() == [0, 2, 4, 5, 6, 7] and (max_q, max_k) == (2, 4)
    assert cu_k.tolist() == [0, 2, 6, 9, 10, 12] and keys.tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 4, 5, 5, 6]
    at, targets, _, _ = shared["predict"]
    assert at.tolist() == [1, 2, 1, 5] and targets.tolist() == [7, 8, 9, 4]  # 6 predicts both completions' first
    assert smask.tolist() == [[0, 1, 1], [0, 1, 0], [1, 0, 0]]
    torch.testing.assert_close(sold, torch.tensor([[0, -.1, -.2], [0, -.3, 0], [-.4, 0, 0]]))


def test_packed_shared_and_compiled_logprobs_and_grads_equal_padded(lm):
    """Packing, prompt sharing and torch.compile are speed knobs only: same log-probs, entropies and gradients as the
    padded eager batch (compiled: batches of new lengths compile no new graph). Shared: the prompt runs once for its
    completions, which must not see each other (a leak would change the later ones' log-probs)."""
    import copy
    packed_lm = models.use_packed_attention(copy.deepcopy(lm))
    compiled_lm = models.compile_model(models.use_packed_attention(copy.deepcopy(lm)))
    prompts = [[5, 6, 7], [5, 6, 7], [5, 6, 7], list(range(10, 19)), list(range(10, 19)), [20]]
    comps = [{"token_ids": list(range(30, 30 + n)), "logprobs": [-1.0] * n} for n in (6, 3, 5, 2, 4, 4)]
    runs = ((lm, False, False, False), (packed_lm, True, False, False), (packed_lm, True, True, False),
            (compiled_lm, True, False, True), (compiled_lm, True, True, True))
    graphs = []  # torch.compile's graphs after each batch: the later batches' new lengths must compile nothing (the
    # first's sequence starts are as many as the model's heads: traced with duck sizing, that tie would recompile)
    for sl in (slice(0, 1), slice(0, 6), slice(1, 5)):
        out = []
        for model, packed, share, compiled in runs:
            model.zero_grad()
            inputs, mask, _ = collate(prompts[sl], comps[sl], 0, "cpu", packed=packed, share_prompts=share)
            if packed and len(prompts[sl]) > 1:  # shared: each prompt once (the later batches repeat prompts)
                assert share == (inputs["input_ids"].numel() < mask.sum() + sum(map(len, prompts[sl])))
            lp, ent = token_logprobs(model, inputs, 0.9, chunk=5, compiled=compiled)
            (lp * mask).sum().backward()
            out.append((lp * mask, ent * mask, model.model.layers[0].self_attn.q_proj.weight.grad.clone(),
                        model.model.embed_tokens.weight.grad.clone()))
        for other in out[1:]:
            for a, b in zip(out[0], other):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert out[0][2].abs().sum() > 0
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[2] == graphs[1] == graphs[0], f"graphs after each batch: {graphs} (recompiles)"


def test_shared_prompt_completions_do_not_see_each_other(lm):
    """Changing one completion's tokens leaves the other completions of its prompt exactly as they were."""
    model = models.use_packed_attention(__import__("copy").deepcopy(lm))
    prompts = [[5, 6, 7]] * 3
    lps = []
    for middle in ([40, 41, 42], [50, 51, 52]):
        comps = [{"token_ids": t, "logprobs": [0.0] * len(t)} for t in ([30, 31], middle, [60, 61, 62, 63])]
        inputs, mask, _ = collate(prompts, comps, 0, "cpu", packed=True, share_prompts=True)
        with torch.no_grad():
            lps.append(token_logprobs(model, inputs)[0])
    torch.testing.assert_close(lps[0][[0, 2]], lps[1][[0, 2]], atol=0, rtol=0)
    assert not torch.allclose(lps[0][1], lps[1][1])


def test_group_advantages_by_hand():
    """(r - mean) / (std + 1e-4) within each group; a constant group gives zeros."""
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    std = torch.tensor([1.0, 0, 0, 0]).std().item()  # unbiased, as torch.std
    want = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(r, 4), torch.cat([want, torch.zeros(4)]))
    torch.testing.assert_close(group_advantages(r, 4, scale=False), torch.tensor([.75, -.25, -.25, -.25, 0, 0, 0, 0]))


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_loss_sign_moves_likelihood_with_advantage(lm, adv):
    """One SGD step on a positive-advantage completion raises its log-likelihood; negative lowers it."""
    import copy
    model = copy.deepcopy(lm)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    mask = torch.tensor([[0.0, 0, 1, 1, 1]])  # tokens 6, 7, 8 are the completion
    with torch.no_grad():
        before = (token_logprobs(model, inputs)[0] * mask).sum()
    logp, _ = token_logprobs(model, inputs)
    loss, _ = grpo_loss(logp, logp.detach(), None, torch.tensor([adv]), mask, Config(), norm=1)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
        after = (token_logprobs(model, inputs)[0] * mask).sum()
    assert (after - before) * adv > 0, (before.item(), after.item(), adv)


def test_loss_aggregation_by_hand():
    """grpo / dr_grpo / dapo weights and norms, at ratio 1 (pg_t = -A) on hand-sized data."""
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    cases = {"grpo": (-(1 * 1) - (-2 * 1)) / 2,  # mean over sequences of per-sequence token means
             "dr_grpo": (-(1 * 2) - (-2 * 4)) / (2 * 8),  # token sum / (B * max_new_tokens)
             "dapo": (-(1 * 2) - (-2 * 4)) / 6}  # token mean over the batch
    for lt, want in cases.items():
        cfg = Config(loss_type=lt, max_new_tokens=8)
        loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask, cfg, loss_norm(cfg, 2, 6))
        assert loss.item() == pytest.approx(want), lt


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_truncated_importance_sampling_by_hand(adv):
    """tis_cap C: the ratio is against the trainer's own log-probs (1, with their gradient) and each token is weighted
    by min(p_trainer / p_sampler, C). Trainer log-probs [-1, -2], sampler's [-1.5, -1], C = 1.5: weights
    [min(e^0.5, 1.5), e^-1] = [1.5, 0.3679]; grpo: loss = -A (1.5 + 0.3679) / 2, d loss / d logp = -A w / 2;
    the first token's weight hit the cap (tis_capped 1/2)."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old, mask = torch.tensor([[-1.5, -1.0]]), torch.ones(1, 2)
    loss, st = grpo_loss(logp, old, None, torch.tensor([adv]), mask, Config(tis_cap=1.5), norm=1)
    loss.backward()
    w = torch.tensor([1.5, math.exp(-1.0)])
    assert loss.item() == pytest.approx(-adv * w.sum().item() / 2, rel=1e-6)
    torch.testing.assert_close(logp.grad, -adv * w[None] / 2)
    assert st["tis_capped"].item() == 0.5 and st["clip_frac"].item() == 0.0


def test_truncated_importance_sampling_is_the_plain_loss_when_sampler_and_trainer_agree():
    """With the sampler's log-probs equal to the trainer's (weights 1), TIS gives today's loss and gradient exactly;
    tis_cap 0 is today's loss (the default)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) - 2
    mask, adv = (torch.rand(3, 5, generator=g) > 0.3).float(), torch.tensor([1.0, -0.5, 2.0])
    grads = []
    for cap in (0.0, 2.0):
        logp = base.clone().requires_grad_(True)
        loss, _ = grpo_loss(logp, base, None, adv, mask, Config(tis_cap=cap), norm=3)
        loss.backward()
        grads.append((loss.detach(), logp.grad))
    torch.testing.assert_close(grads[0], grads[1])
    assert Config().tis_cap == 0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_sum_to_the_full_batch(loss_type):
    """Splitting a batch into micro-batches (and ranks) gives the same loss and gradient."""
    torch.manual_seed(1)
    cfg = Config(loss_type=loss_type, max_new_tokens=5, clip_eps_high=0.28, kl_coef=0.1)
    logp = torch.randn(4, 5, requires_grad=True)
    old, ref, adv = torch.randn(4, 5) * 0.1, torch.randn(4, 5), torch.randn(4)
    mask = (torch.rand(4, 5) > 0.3).float()
    norm = loss_norm(cfg, 4, int(mask.sum()))
    full, _ = grpo_loss(logp, old + logp.detach(), ref, adv, mask, cfg, norm)
    g_full, = torch.autograd.grad(full, logp)
    parts = sum(grpo_loss(logp[i:i + 2], old[i:i + 2] + logp.detach()[i:i + 2], ref[i:i + 2], adv[i:i + 2],
                          mask[i:i + 2], cfg, norm)[0] for i in (0, 2))
    g_parts, = torch.autograd.grad(parts, logp)
    torch.testing.assert_close(full, parts)
    torch.testing.assert_close(g_full, g_parts)


def test_clip_stops_gradient_outside_trust_region():
    """Ratio above 1 + eps_high with A > 0 (or below 1 - eps_low with A < 0) gets no policy gradient; the stats say
    which tokens were clipped, which of them the sampler overrated (ratio below 1 - eps_low), and the mean |log ratio|."""
    cfg = Config(clip_eps_low=0.2, clip_eps_high=0.28)
    mask = torch.ones(1, 3)
    for adv, ratio, zero in [(1.0, 1.3, True), (1.0, 1.25, False), (-1.0, 0.7, True), (-1.0, 0.85, False),
                             (-1.0, 1.5, False)]:  # A < 0 and ratio high: min() keeps the unclipped term
        logp = torch.full((1, 3), math.log(ratio), requires_grad=True)
        loss, st = grpo_loss(logp, torch.zeros(1, 3), None, torch.tensor([adv]), mask, cfg, 1)
        g, = torch.autograd.grad(loss, logp)
        assert (g.abs().sum() == 0) == zero, (adv, ratio, g)
        assert st["clip_frac"].item() == (1.0 if not 0.8 <= ratio <= 1.28 else 0.0)
        assert st["clip_low"].item() == (1.0 if ratio < 0.8 else 0.0)  # the sampler overrated these tokens
        assert st["sampler_gap"].item() == pytest.approx(abs(math.log(ratio)))


def test_k3_kl_value_and_gradient():
    """k3 = e^(ref-logp) - (ref-logp) - 1: zero at ref == logp, hand value elsewhere, pulls logp to ref."""
    cfg = Config(kl_coef=1.0)
    mask = torch.ones(1, 2)
    ref = torch.tensor([[-1.0, -2.0]])
    logp = ref.clone().requires_grad_(True)
    loss, st = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), mask, cfg, 1)
    assert loss.item() == pytest.approx(0.0) and st["kl"].item() == pytest.approx(0.0)
    logp = torch.tensor([[-0.5, -2.5]], requires_grad=True)
    loss, st = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), mask, cfg, 1)
    d = torch.tensor([-0.5, 0.5])
    want = (torch.exp(d) - d - 1)
    assert st["kl"].item() == pytest.approx(want.mean().item())
    assert loss.item() == pytest.approx(want.mean().item())  # grpo: mean over the one sequence
    g, = torch.autograd.grad(loss, logp)
    assert g[0, 0] > 0 and g[0, 1] < 0, "descent lowers logp above ref and raises it below"


def test_lr_schedule_warmup_then_cosine():
    """Warmup ramps linearly to 1, cosine ends at min_lr_ratio."""
    cfg = Config(warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [train.lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.lr_at(9, cfg) == pytest.approx(0.55)
    assert train.lr_at(14, cfg) == pytest.approx(0.1)


def test_config_yaml_then_cli(tmp_path):
    """YAML overrides defaults, --key=value overrides YAML; a systems field goes to cfg.system whether named flat or
    under `system:` (YAML) / `--system.` (CLI), and the nested config a run saves reads back the same; unknown keys and
    wrong types are errors."""
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-5\ngroup_size: 4\nloss_type: dapo\ncompile: true\nsystem:\n  micro_batch_size: 3\n")
    c = load_config([str(p), "--group_size=2", "--resume", "--model=123", "--system.packing=false"])
    assert (c.lr, c.group_size, c.loss_type, c.resume, c.model) == (1e-5, 2, "dapo", True, "123")
    assert (c.system.compile, c.system.micro_batch_size, c.system.packing) == (True, 3, False)
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(dataclasses.asdict(c)))
    assert load_config([str(saved)]) == c
    with pytest.raises(ValueError, match="unknown config key 'lrr'"):
        load_config(["--lrr=1"])
    with pytest.raises(ValueError, match="group_size"):
        load_config(["--group_size=2.5"])
    with pytest.raises(ValueError, match="lr"):
        load_config(["--lr=fast"])
    with pytest.raises(ValueError, match="loss_type='ppo': use one of grpo, dr_grpo, dapo"):
        load_config(["--loss_type=ppo"])


def test_empty_cli_value_is_an_empty_string(tmp_path):
    """--key= sets "" (regression: --wandb_project= parsed as True, then failed as a bool); a bare --flag is True;
    an empty value for a number is a type error, not a silent default."""
    p = tmp_path / "c.yaml"
    p.write_text("wandb_project: simple-r1\n")
    assert load_config([str(p), "--wandb_project="]).system.wandb_project == ""
    assert load_config(["--compile"]).system.compile is True
    with pytest.raises(ValueError, match="lr"):
        load_config(["--lr="])


def test_logprob_gap_counts_each_side_of_the_clip_range():
    """bench/logprob_gap's stats: ratio = p_trainer / p_sampler per token; below_clip (< 0.8: the sampler overrated it)
    and above_clip (> 1.28) add up to outside_clip."""
    import os
    import runpy
    from conftest import ROOT
    stats = runpy.run_path(os.path.join(ROOT, "bench", "logprob_gap.py"))["stats"]
    ratios = [0.5, 0.79, 0.9, 1.0, 1.2, 1.3]
    out = stats([[0.0] * len(ratios)], [[math.log(r) for r in ratios]])
    assert out["below_clip"] == pytest.approx(2 / 6, abs=1e-6) and out["above_clip"] == pytest.approx(1 / 6, abs=1e-6)
    assert out["outside_clip"] == pytest.approx(3 / 6, abs=1e-6)


def test_compiled_chunk_logprobs_take_the_temperature_as_a_constant(monkeypatch):
    """The compiled log-softmax chunk's inputs are the batch's tensors and sizes, not the temperature: Dynamo would pass
    a dynamic float as a 0-d CPU float64 tensor (a CPU input to a GPU graph, which can cost every fresh process
    Inductor's probe of the host CPU). So each temperature is its own graph, and the numbers are the eager function's."""
    from system import batches
    graphs = []

    def record(gm, example_inputs):  # a backend that keeps what each graph takes
        graphs.append([x for x in example_inputs if isinstance(x, torch.Tensor)])
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **kw, backend=record))
    torch._dynamo.reset()
    batches._chunk_logprobs_compiled.cache_clear()
    try:
        g = torch.Generator().manual_seed(0)
        h, w, targets = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g), torch.tensor([1, 2, 3, 4, 10])
        for temperature in (0.7, 0.9, 0.7):
            got = batches._chunk_logprobs_compiled()(h, w, None, targets, temperature)
            for a, b in zip(got, batches._chunk_logprobs(h, w, None, targets, temperature)):
                torch.testing.assert_close(a, b)
    finally:
        batches._chunk_logprobs_compiled.cache_clear()
        torch._dynamo.reset()
    assert len(graphs) == 2, f"{len(graphs)} graphs for temperatures 0.7, 0.9, 0.7: one per temperature"
    scalars = [x for inputs in graphs for x in inputs if x.dim() == 0]
    assert not scalars, f"0-d tensor inputs {[(x.dtype, x.device) for x in scalars]}: the temperature is an input"
