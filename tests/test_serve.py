"""The Ray Serve app for real: a Ray cluster on 127.0.0.1, 2 replicas (vLLM-CPU engines, then torch
engines) of a tiny model, the trainer's weight sync over gloo, and GRPO steps through the app."""
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

import gsm8k
import train
from system import batches, config
from test_train import cfg_for, digit_reward

from conftest import PROMPTS, check_engine_contract, check_finish_reasons

pytestmark = pytest.mark.slow  # a Ray cluster and its replicas


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_takes_the_torch_engine_knobs_by_the_trainers_names(monkeypatch):
    """ENGINE_ROWS, COMPILE_ENGINE and FUSE_ENGINE (or builder arguments of those names) reach every replica's engine,
    each defaulting as the system.config.SystemConfig field of its name does: one name and one default per knob."""
    import infer_workers
    from system.config import SystemConfig
    def knobs(**args):  # the last three arguments each replica's InferenceWorker is built with
        return infer_workers.build_app({"model": "m", "engine": "torch", **args})._bound_deployment.init_args[-3:]
    for var in ("ENGINE_ROWS", "COMPILE_ENGINE", "FUSE_ENGINE"):
        monkeypatch.delenv(var, raising=False)
    assert knobs() == (SystemConfig.engine_rows, SystemConfig.compile_engine, SystemConfig.fuse_engine)
    monkeypatch.setenv("ENGINE_ROWS", "32")
    monkeypatch.setenv("COMPILE_ENGINE", "1")
    assert knobs(fuse_engine="false") == (32, True, False)
    assert knobs(engine_rows=8, compile_engine=False) == (8, False, True)


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind 127.0.0.1 only
    import ray
    from ray import serve
    import infer_workers
    # 3 CPU slots: the module's app (2 replicas, a CPU each) and a one-replica app beside it
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
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


def torch_only(app):
    """The fault tests exercise ServeClient / WeightSync logic, the same for any engine: the torch app runs them (a
    skip, not indirect parametrization, which made pytest start the vLLM app twice)."""
    if app[0] == "tiny_vllm":
        pytest.skip("client and sync logic: run on the torch app")


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


def test_http_sampling_differs_without_a_seed_and_repeats_with_one(app):
    """Two identical HTTP requests without a seed sample differently (regression: the seed defaulted to 0, so every
    such request returned the same completions); the seed each used comes back, and sending it reproduces them."""
    name, port = app

    def ask(**extra):
        body = json.dumps({"prompts": ["Natalia sold clips to"], "n": 4, "max_new_tokens": 12, "temperature": 1.0,
                           **extra}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/{name}", body, {"Content-Type": "application/json"})
        out = json.load(urllib.request.urlopen(req, timeout=60))
        return [c["token_ids"] for c in out["completions"][0]], out["seed"]
    (a, seed_a), (b, seed_b) = ask(), ask()
    assert a != b and seed_a != seed_b
    assert ask(seed=seed_a) == (a, seed_a) and ask(seed=7) == ask(seed=7)


def test_serve_client_satisfies_the_engine_contract(app, tiny_model):
    """The app seen from the trainer (ServeClient over 2 replicas) is an system.engine.Engine like the in-process ones."""
    name, _ = app
    check_engine_contract(client(name), tiny_model)


def test_replicas_pass_the_finish_reason_through(app, tiny_stop_model):
    """Through the app, a completion that ended at an eos is "stop" and one cut at the cap "length", as in the engines
    (test_engine.py::test_engine_protocol checks both engines in process; a replica returns what its engine gives, so
    one torch replica of the stop model, beside the module's app, shows the path)."""
    torch_only(app)
    from ray import serve
    import infer_workers
    stop_dir, rows, reasons = tiny_stop_model
    serve.run(infer_workers.build_app({"model": stop_dir, "engine": "torch", "num_workers": 1, "dtype": "float32"}),
              name="tiny_stop", route_prefix="/tiny_stop")
    try:
        check_finish_reasons(client("tiny_stop"), rows, reasons)
    finally:
        serve.delete("tiny_stop")


@pytest.mark.parametrize("transport", ["broadcast", "shared", "mixed"])
def test_push_perturbed_then_original(app, tiny_model, transport, monkeypatch):
    """Pushed weights are what the replicas compute with (logprobs equal HF's on them, tied lm_head
    included), and pushing the originals back restores the exact greedy outputs (fp32). Through the gloo broadcast,
    through the trainer's shared buffer (both replicas read it in place: the CPU form of a replica on the trainer's
    GPU, CUDA IPC there), and mixed: one replica reads the buffer, the other gets the broadcast, in the same push."""
    import weight_sync
    from system.models import load_model
    name, _ = app
    if transport == "mixed":  # ipc "always" would take both replicas (one machine): let it take the first only
        first, takes = min(r for r, _ in replica_processes(name)), weight_sync.WeightSync.takes_ipc
        monkeypatch.setattr(weight_sync.WeightSync, "takes_ipc", lambda self, s: takes(self, s) and s["replica"] == first)
    c = client(name, bucket_mb=0.05, ipc="never" if transport == "broadcast" else "always")  # tiny buckets: many
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
            lp = batches.token_logprobs(hf, {"input_ids": ids}, 0.7)[0][0, len(p) - 1:]
        torch.testing.assert_close(lp, torch.tensor(comp["logprobs"]), atol=1e-3, rtol=1e-3)
        assert comp["version"] == v1
    hf.load_state_dict(original, strict=False)
    hf.tie_weights()
    assert c.update_weights(hf.state_dict().items()) == v1 + 1
    assert greedy(c) == before
    n_ipc = {"broadcast": 0, "shared": 2, "mixed": 1}[transport]
    assert len(c.sync.ipc_members) == n_ipc and (c.sync.group is None) == (n_ipc == 2), (c.sync.ipc_members, c.sync.group)
    if c.sync.shared:  # the replicas copied out of the trainer's buffer: rewriting it changes nothing they compute
        c.sync.shared.buf.zero_()
        assert greedy(c) == before
    shared = c.sync.shared.path if c.sync.shared else None
    assert not c.sync.close() and (shared is None or not os.path.exists(shared))  # replicas left; the buffer is gone


def test_two_grpo_steps_through_the_app(app, tiny_model, tmp_path):
    """train.py --inference serve: the initial push, then one push per step, versions 1, 2, 3."""
    name, _ = app
    cfg = config.replace(cfg_for(tiny_model, tmp_path / "serve", max_steps=2), inference="serve", serve_app=name,
                              sync_timeout_s=120.0)
    train.main(cfg, reward_fn=digit_reward)
    rows = [json.loads(line) for line in open(tmp_path / "serve" / "metrics.jsonl")]
    assert [r["version"] for r in rows] == [2, 3]
    assert [r["sample_version"] for r in rows] == [1, 2]  # on-policy: each batch sampled by the weights it trains
    assert all(r["sync_s"] > 0 for r in rows)


def test_one_step_off_samples_ahead_and_trains_every_batch_once_across_a_resume(app, tiny_model, tmp_path):
    """max_staleness 1: from the second step on, the batch was sampled during the step before, by the weights one
    version behind the policy's. A run stopped after step 1 (its batch 2 already sampled ahead) and resumed trains
    exactly the batches an uninterrupted sampler draws, in order: none skipped, none twice; the resumed step samples
    afresh from the checkpoint's weights."""
    torch_only(app)
    name, _ = app
    cfg = config.replace(cfg_for(tiny_model, tmp_path / "async", max_steps=3, stop_after_min=1e-6),
                              inference="serve", serve_app=name, sync_timeout_s=120.0, max_staleness=1)
    answers = []

    def recording_reward(completion, answer):
        answers.append(answer)
        return digit_reward(completion, answer)

    train.main(cfg, reward_fn=recording_reward)
    train.main(config.replace(cfg, resume=True, stop_after_min=0.0), reward_fn=recording_reward)
    rows = [json.loads(line) for line in open(tmp_path / "async" / "metrics.jsonl")]
    assert [r["version"] for r in rows] == [2, 3, 4]
    assert [r["sample_version"] for r in rows] == [1, 2, 2]  # step 3 trains a batch sampled by version 2
    train_rows = gsm8k.split_train_val(gsm8k.load_split(cfg.data, "train"), cfg.val_size)[0]
    sampler = gsm8k.Sampler(len(train_rows), cfg.seed)
    want = [train_rows[i]["answer"] for _ in range(3) for i in sampler.next(cfg.prompts_per_step)
            for _ in range(cfg.group_size)]
    assert answers == want


@pytest.mark.parametrize("ipc", ["never", pytest.param("always", marks=pytest.mark.extended)])
def test_killed_replica_is_replaced_and_rejoins(app, tiny_model, ipc):
    """A replica killed between steps: Serve restarts it, the next push re-forms the group, no hang. Also when the
    replicas read the trainer's shared buffer (the CPU form of a replica on the trainer's GPU): the new replica is
    pushed the weights through it, and the buffer is freed only at close."""
    torch_only(app)  # a vLLM replica's start: the app fixture
    import ray
    name, _ = app
    c = client(name, timeout_s=300, ipc=ipc)
    hf_state = load_file(os.path.join(tiny_model, "model.safetensors"))
    v = c.update_weights(hf_state.items())
    gen_before = c.sync.generation
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{name}#")]
    assert len(victims) == 2, victims
    ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
    assert c.update_weights(hf_state.items()) == v + 1  # waits for the restart, re-forms the group, pushes
    assert c.sync.generation == gen_before + 1 and len(c.sync.members) == 2  # (a hang would have raised at 300 s)
    assert len(c.sync.ipc_members) == (2 if ipc == "always" else 0)
    assert len(greedy(c)) == len(PROMPTS)
    assert not c.sync.close()


def test_replica_that_never_joins_fails_clearly(app):
    """The trainer expects more workers than ever come up: a clear error within the timeout, no hang."""
    torch_only(app)
    name, _ = app
    c = client(name, timeout_s=5, expected_workers=3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"expected 3 replica workers, 2 answered within 5 s"):
        c.update_weights([("model.norm.weight", torch.ones(64))])
    assert time.monotonic() - t0 < 30


# ----------------------------------------------------------------------------- faults (docs/reliability.md)

def replica_processes(name, n=2, timeout_s=300):
    """[(replica id, pid)] of the app's replicas, as they report themselves, once n of them answer (a replica an
    earlier test killed may still be restarting)."""
    from ray import serve
    deadline = time.monotonic() + timeout_s
    while True:
        res = serve.get_app_handle(name).broadcast("sync_state").results(timeout_s=60, return_exceptions=True)
        states = [s for s in res if not isinstance(s, BaseException)]
        if len(states) == n or time.monotonic() > deadline:
            return sorted((s["replica"], s["pid"]) for s in states)
        time.sleep(1)


def original_state(tiny_model):
    return list(load_file(os.path.join(tiny_model, "model.safetensors")).items())


def test_frozen_replica_fails_the_push_naming_it(app, tiny_model):
    """A replica frozen (SIGSTOP) when a push starts: the push fails within its timeout with an error that names the
    replica and the operation, not a hang; thawed, the next push re-forms the group and succeeds."""
    torch_only(app)
    name, _ = app
    replica_processes(name)  # both up
    c = client(name, timeout_s=8)
    v = c.update_weights(original_state(tiny_model))  # the group exists; both replicas are members
    victim, pid = replica_processes(name)[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises((TimeoutError, RuntimeError), match=rf"sync_state.*no answer from replicas \['{victim}'\]"):
            c.sync.push(original_state(tiny_model))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert c.update_weights(original_state(tiny_model)) > v and len(c.sync.members) == 2


def test_replica_killed_during_generation_costs_a_retry(app, tiny_model):
    """SIGKILL a replica as a batch is sent: the batch still comes back whole, every completion from the trainer's
    current weights; the restarted replica (initial weights) is re-pushed them (resync) before it serves."""
    torch_only(app)
    name, _ = app
    replica_processes(name)  # both up
    c = client(name, timeout_s=300)
    state = original_state(tiny_model)
    torch.manual_seed(1)
    trained = [(k, v + 0.3 * torch.randn_like(v)) for k, v in state]  # "the trainer's" weights: not the initial ones
    v = c.update_weights(trained)
    resyncs = []
    c.resync = lambda: resyncs.append(c.update_weights(trained, c.version))  # what train.py sets on the pushing rank
    victim, pid = replica_processes(name)[0]
    os.kill(pid, signal.SIGKILL)
    out = c.generate(PROMPTS * 4, n=4, max_new_tokens=32, temperature=1.0, seed=3)
    assert len(out) == 16 and all(comp["version"] == v for g in out for comp in g)
    assert victim not in dict(replica_processes(name)) and len(replica_processes(name)) == 2  # restarted
    for _ in range(4):  # the replacement holds version 0: it refuses until resync has pushed it version v
        assert {comp["version"] for g in c.generate(PROMPTS * 4, max_new_tokens=4) for comp in g} == {v}
    assert resyncs == [v] and victim not in {r for r, _ in c.sync.members}
    c.update_weights(state)  # leave the app as the other tests expect it


def test_replica_killed_during_a_push_costs_a_retry(app, tiny_model, monkeypatch):
    """SIGKILL a replica while weights are on the wire (after the trainer's third bucket): the push is tried once
    more, after Serve has replaced the replica, and every replica ends up with the pushed weights."""
    torch_only(app)
    import weight_sync
    name, _ = app
    replica_processes(name)  # both up
    c = client(name, timeout_s=300, bucket_mb=0.0002)  # a bucket per tensor: ~20 broadcasts per push
    state = original_state(tiny_model)
    v = c.update_weights(state)
    before, (victim, pid) = greedy(c), replica_processes(name)[1]
    real, sent = weight_sync.broadcast, []

    def broadcast_then_kill(group, tensor, timeout_s, wait=True):  # the trainer's side of each bucket; the replicas are real
        sent.append(tensor.numel())
        if len(sent) == 3:
            os.kill(pid, signal.SIGKILL)
        return real(group, tensor, timeout_s, wait)

    monkeypatch.setattr(weight_sync, "broadcast", broadcast_then_kill)
    assert c.update_weights(state) == v + 1
    assert victim not in {r for r, _ in c.sync.members} and len(c.sync.members) == 2  # its replacement holds v + 1
    assert greedy(c) == before


def test_stranger_on_the_sync_port_changes_nothing(app, tiny_model):
    """Someone who reaches the sync store (no secret) grabs the ranks it can guess and sends garbage: the push goes
    on, to the real replicas, with the right weights."""
    torch_only(app)
    import datetime
    name, _ = app
    replica_processes(name)  # both up
    c = client(name)
    state = original_state(tiny_model)
    c.update_weights(state)
    before = greedy(c)
    stranger = torch.distributed.TCPStore("127.0.0.1", c.sync.port, world_size=None, is_master=False,
                                          timeout=datetime.timedelta(seconds=10))
    for g in range(1, 6):
        stranger.add(f"g{g}/next_rank", 1)
        stranger.set(f"g{g}/0", b"garbage")
    with socket.create_connection(("127.0.0.1", c.sync.port)) as raw:
        raw.sendall(os.urandom(4096))
    c.sync.close_group()  # force a new group (a new generation) while the stranger is connected
    torch.manual_seed(2)
    c.update_weights([(k, v + 0.5 * torch.randn_like(v)) for k, v in state])
    assert greedy(c) != before
    c.update_weights(state)
    assert greedy(c) == before


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"n": 2}', 400, "'prompts' must be"),
    (b'{"prompts": []}', 400, "'prompts' must be"),
    (b'{"prompts": ["hi"], "n": -1}', 400, "'n' must be in"),
    (b'{"prompts": ["hi"], "n": 100000}', 400, "'n' must be in"),
    (b'{"prompts": ["hi"], "max_new_tokens": 100000000}', 400, "'max_new_tokens' must be in"),
    (b'{"prompts": ["hi"], "temperature": -1}', 400, "'temperature' must be >= 0"),
    (b'{"prompts": ["hi"], "top_p": 0}', 400, "'top_p'"),
    (b'{"prompts": ["hi"], "n": "2"}', 400, "'n' must be a number"),
    (b'{"prompts": ["hi"], "steps": 2}', 400, "unknown keys ['steps']"),
    (b'{"prompts": [[99999999]]}', 400, "token ids in"),
    (json.dumps({"prompts": ["x" * 200_000]}).encode(), 400, "characters: too long"),
    (json.dumps({"prompts": ["x " * 600_000]}).encode(), 413, "byte cap"),
    (None, 405, "POST a JSON body"),
])
def test_bad_http_request_gets_a_4xx_and_the_app_stays_up(app, body, status, says):
    """Each bad request is answered 4xx with what is wrong; a good request right after it still works."""
    name, port = app
    url = f"http://127.0.0.1:{port}/{name}"
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"}) if body is not None else url
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == status and says in json.load(e.value)["error"], (e.value.code, says)
    good = urllib.request.Request(url, json.dumps({"prompts": ["2+3="], "max_new_tokens": 3}).encode(),
                                  {"Content-Type": "application/json"})
    assert len(json.load(urllib.request.urlopen(good, timeout=60))["completions"][0][0]["token_ids"]) > 0


def test_clients_that_hang_up_mid_generation_leave_the_replicas_right(app):
    """HTTP clients that hang up mid-generation (Serve cancels their requests) leave both replicas answering, with
    the same greedy tokens as before. Regression: the replica let go of its lock at the cancel while its engine still
    ran the request, so the next one entered the engine beside it; vLLM's broke and answered every later request
    with a 500 (`serve run` under a 30 s client timeout, CI)."""
    import threading
    name, port = app
    c = client(name)
    before = greedy(c)
    slow = json.dumps({"prompts": ["Natalia sold clips"] * 8, "n": 8, "max_new_tokens": 1500,
                       "temperature": 1.0}).encode()
    hung_up = []

    def hang_up():
        req = urllib.request.Request(f"http://127.0.0.1:{port}/{name}", slow, {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=0.5)
        except TimeoutError:  # the client gives up: Serve cancels the request at the replica
            hung_up.append(True)
    threads = [threading.Thread(target=hang_up) for _ in range(4)]  # enough that both replicas get some
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(hung_up) == 4, "a slow request answered within 0.5 s: it no longer tests a cancel mid-generation"
    for _ in range(3):
        assert greedy(c) == before


def test_app_with_another_model_or_a_short_context_is_refused(app, tiny_model):
    """The trainer checks what the replicas report before it trains: another model, or a context shorter than its
    longest prompt + max_new_tokens, is an error that says how to restart the app."""
    name, _ = app
    from infer_workers import ServeClient
    with pytest.raises(ValueError, match="serves model .* restart the app with MODEL_NAME_OR_PATH=random:small"):
        ServeClient(name, model="random:small")
    with pytest.raises(ValueError, match="has max_model_len 2048, the trainer needs 5000 .* MAX_MODEL_LEN=5000"):
        ServeClient(name, model=tiny_model, min_model_len=5000)


def test_top_p_below_one_is_refused_with_vllm_replicas(app):
    """vLLM's log-probs with top_p < 1 are renormalised over the nucleus (its "processed" mode), the trainer's are
    of the full softmax: a trainer sampling with top_p < 1 from vLLM replicas is refused; torch replicas are fine."""
    name, _ = app
    from infer_workers import ServeClient
    if name.endswith("vllm"):
        with pytest.raises(ValueError, match=r"top_p=0.9 with vLLM replicas: .* INFER_ENGINE=torch"):
            ServeClient(name, top_p=0.9)
    else:
        assert ServeClient(name, top_p=0.9).num_replicas == 2


def test_trainer_leaves_the_sync_group_at_the_end(app, tiny_model, tmp_path):
    """At the end of a run the trainer has every replica leave the sync group before its store closes (regression:
    replicas printed 'TCPStore server has shut down' stack traces after every GPU run)."""
    name, _ = app
    cfg = config.replace(cfg_for(tiny_model, tmp_path / "bye", max_steps=1), inference="serve", serve_app=name)
    train.main(cfg, reward_fn=digit_reward)
    from ray import serve
    states = serve.get_app_handle(name).broadcast("sync_state").results(timeout_s=60)
    assert [s["generation"] for s in states] == [None, None], states
