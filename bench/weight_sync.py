"""Trainer -> K replicas weight sync vs a raw broadcast of the same bytes, in one run. One JSON line.

    python bench/weight_sync.py --replicas 2 --shape small          # CPU: gloo, torch-engine replicas
    python bench/weight_sync.py --replicas 1 --shape qwen0.5b       # GPU: NCCL (trainer on GPU 0)

It starts Ray on 127.0.0.1 and a Serve app of K torch-engine replicas holding a random model of the
given shape, then times, in alternation:
  ours: WeightSync.push: state RPC + pack (cast, concat) + bucketed broadcast + every replica loads
  raw:  the same buckets broadcast over the same group, replicas receive and drop (this bench's DropWorker
        replicas, switched by an RPC), timed from the first to the last bucket on the trainer: the group's floor
and checks that the replicas' weights equal the trainer's afterwards (a greedy sample agrees).
"""
import argparse
import json
import os
import socket
import statistics
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

from models import SHAPES, load_model, resolve_model  # noqa: E402
import infer_workers  # noqa: E402


class DropWorker(infer_workers.InferenceWorker):
    """The app's replica with one bench-only switch: while `drop` is on, it takes part in every broadcast and
    loads nothing (the raw floor). Production replicas have no such mode."""
    drop = False

    async def set_drop(self, drop: bool) -> None:
        self.drop = drop

    async def receive_weights(self, plan, timeout_s) -> dict:
        if not self.drop:
            return await super().receive_weights(plan, timeout_s)

        def drain():
            for _ in self.sync.receiver.receive(plan, timeout_s):
                pass
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return plan["version"]
        return {"replica": self.replica, "version": await self._locked(drain)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--bucket-mb", type=float, default=256.0)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--deploy-timeout-s", type=float, default=300.0)
    a = ap.parse_args()
    import ray
    from ray import serve

    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    path = resolve_model(f"random:{a.shape}")
    model = load_model(path, dtype, "cuda:0" if gpu else "cpu")  # the trainer's copy
    n_params = sum(p.numel() for p in model.parameters())
    if gpu:  # CUDA is up in this process with every GPU; Ray (started now) hands replicas GPUs 1..n only
        assert torch.cuda.device_count() > a.replicas, f"{a.replicas} replicas + the trainer need more GPUs"
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(1, a.replicas + 1))
    ray.init(num_cpus=max(a.replicas, 2), num_gpus=a.replicas if gpu else 0, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=True, runtime_env={"env_vars": infer_workers.ray_env()})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = infer_workers.build_app({"model": f"random:{a.shape}", "engine": "torch", "num_workers": a.replicas,
                                   "dtype": str(dtype).removeprefix("torch.")}, worker_cls=DropWorker)
    deploy = threading.Thread(target=lambda: (serve.start(http_options={"host": "127.0.0.1", "port": port}),
                                              serve.run(app, name="bench", route_prefix="/bench")), daemon=True)
    deploy.start()
    deploy.join(a.deploy_timeout_s)  # serve.run itself waits without a limit
    assert not deploy.is_alive(), f"the app was not up after {a.deploy_timeout_s} s: see the replica errors above"
    c = infer_workers.ServeClient("bench", timeout_s=300, sync={"bucket_mb": a.bucket_mb, "timeout_s": 300,
                                                                 "device": "cuda:0" if gpu else "cpu"})
    state = list(model.state_dict().items())
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    def drop(on):  # every replica receives and drops (raw), or receives and loads (ours)
        c.handle.broadcast("set_drop", on).results(timeout_s=60)

    c.update_weights(state)  # warm-up: forms the group
    drop(True)
    c.update_weights(state)
    ours, raw = [], []
    for _ in range(a.iters):  # alternate, so drift hits both alike
        drop(False)
        c.update_weights(state)
        ours.append(c.sync.timing)
        drop(True)
        c.update_weights(state)
        raw.append(c.sync.timing)
    drop(False)
    c.update_weights(state)  # the replicas load the trainer's weights: the check below needs them
    with torch.no_grad():  # the replicas now hold the trainer's weights: their greedy sample matches ours
        prompt = [5, 6, 7, 8]
        want = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=4, do_sample=False)
        got = c.generate([prompt], max_new_tokens=4, temperature=0)[0][0]["token_ids"]
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    out = {"bench": "weight_sync", "device": torch.cuda.get_device_name(0) if gpu else "cpu",
           "backend": c.sync.backend, "shape": a.shape, "params": n_params, "dtype": str(dtype).removeprefix("torch."),
           "replicas": a.replicas, "bucket_mb": a.bucket_mb, "buckets": ours[0]["buckets"],
           "mbytes": round(ours[0]["bytes"] / 2**20, 1), "ours_ms": round(1e3 * med(ours, "total_s"), 2),
           "ours_broadcast_ms": round(1e3 * med(ours, "broadcast_s"), 2),
           "ours_load_wait_ms": round(1e3 * med(ours, "load_wait_s"), 2), "raw_ms": round(1e3 * med(raw, "broadcast_s"), 2),
           "greedy_match": got == want[0, len(prompt):].tolist()}
    out["ours_over_raw"] = round(out["ours_ms"] / out["raw_ms"], 2)
    if gpu:
        out["trainer_peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - sum(
            p.numel() * p.element_size() for p in model.parameters())) / 2**20, 1)
    print(json.dumps(out))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
