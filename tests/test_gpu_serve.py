"""2+ GPUs, vLLM and Ray only (skipped otherwise): the Serve app with a vLLM replica on GPU 1, the trainer on GPU 0,
weights over NCCL into vLLM's model (its CUDA graphs on), as the mission runs it."""
import importlib.util
import json
import os

import pytest
import torch

import train
from system import batches, config
from conftest import PROMPTS
from test_train import cfg_for, digit_reward

pytestmark = [pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
              pytest.mark.skipif(not (importlib.util.find_spec("vllm") and importlib.util.find_spec("ray")),
                                 reason="needs vLLM and Ray"),
              pytest.mark.slow]


@pytest.fixture(scope="module")
def app(tiny_model):
    import ray
    from ray import serve
    import infer_workers
    from test_serve import free_port
    torch.cuda.init()  # this process keeps every GPU; Ray, started now, hands its replica GPU 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"], os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1", "0"
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": infer_workers.ray_env()})
    if visible is None:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    serve.run(infer_workers.build_app({"model": tiny_model, "engine": "vllm", "num_workers": 1, "dtype": "bfloat16",
                                       "gpu_memory_utilization": 0.3}), name="gpu_vllm", route_prefix="/gpu_vllm")
    yield "gpu_vllm"
    serve.shutdown()
    ray.shutdown()


def client(name):
    from infer_workers import ServeClient
    return ServeClient(name, timeout_s=600, sync={"timeout_s": 120, "device": "cuda:0", "bucket_mb": 0.05})


def greedy(c):
    return [g[0]["token_ids"] for g in c.generate(PROMPTS, max_new_tokens=16, temperature=0)]


def perturbed(model, seed=0, scale=0.05):
    """Noise of 2.5x the weights' init scale: other greedy outputs, logits still in bf16's comfortable range."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def test_vllm_replica_takes_pushes_exactly(app, tiny_model):
    """A push of perturbed weights changes vLLM's greedy output and its log-probs are the trainer's (fp32 weights,
    bf16 autocast, as train.py) within bf16 noise; pushing the originals back restores the greedy output exactly."""
    from system.models import load_model
    c = client(app)
    hf = load_model(tiny_model, torch.float32, "cuda:0")
    c.update_weights(hf.state_dict().items())  # the checkpoint's weights, through our path (tied lm_head included)
    before = greedy(c)
    v = c.update_weights(perturbed(hf).state_dict().items())
    assert greedy(c) != before
    groups = c.generate(PROMPTS, n=4, max_new_tokens=16, temperature=1.0, seed=3)
    comps = [x for g in groups for x in g]
    assert {x["version"] for x in comps} == {v}
    inputs, mask, sampler = batches.collate([p for p in PROMPTS for _ in range(4)], comps, 0, "cuda:0")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        lp, _ = batches.token_logprobs(hf, inputs)
    gap = (lp.float() - sampler).abs()[mask.bool()]
    assert gap.mean() < 0.05 and gap.max() < 1.0, f"|vLLM - trainer| mean {gap.mean():.4f}, max {gap.max():.4f} nats"
    hf = load_model(tiny_model, torch.float32, "cuda:0")
    c.update_weights(hf.state_dict().items())
    assert greedy(c) == before
    c.close()


def test_two_grpo_steps_through_vllm_on_gpu(app, tiny_model, tmp_path):
    """train.py --inference serve on cuda:0 against the vLLM replica: the initial push, then one per step."""
    cfg = config.replace(cfg_for(tiny_model, tmp_path / "run", max_steps=2), inference="serve", serve_app=app,
                              sync_timeout_s=120.0)
    train.main(cfg, reward_fn=digit_reward)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["version"] for r in rows] == [2, 3] and all(r["sync_s"] > 0 for r in rows)


def test_killed_vllm_replica_rejoins_with_the_current_weights(app, tiny_model):
    """The replica is killed; Serve restarts it (a fresh vLLM, the checkpoint's weights) and it refuses to sample
    until the trainer's re-push (resync) gives it the current ones: the greedy output is the pushed weights'."""
    import ray
    from system.models import load_model
    c = client(app)
    state = list(perturbed(load_model(tiny_model, torch.float32, "cuda:0"), seed=1).state_dict().items())
    v = c.update_weights(state)
    want = greedy(c)
    c.resync = lambda: c.update_weights(state, c.version)
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#"))
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
    assert greedy(c) == want and c.version == v
    c.close()
