"""The engine interface, and TorchEngine: sampling in plain PyTorch with a static KV cache and CUDA graphs.

The interface (`Engine`) is what the trainer and the evaluation need of an engine; TorchEngine,
infer_workers.VLLMEngine and infer_workers.ServeClient (the Serve app, seen from the trainer) satisfy it, and
tests/test_engine.py::test_engine_protocol holds each of them to it:
    generate(prompts, n, max_new_tokens, temperature, top_p, seed) -> per prompt, n Completions
        prompts are token-id lists (the trainer tokenises once; nothing is tokenised twice); logprobs are those
        of the sampled tokens under softmax(logits / temperature) of the weights named by `version`: the
        trainer's importance ratio divides by exactly these. temperature 0 = greedy (logprobs at temperature 1).
    update_weights(named_tensors, version=None) -> the engine's new weight version (int)
    version: how many weight updates it has taken (or the version it was told)
Receiving weights from another process (a Serve replica) is not part of it: see infer_workers.LocalSync.

TorchEngine is the single-machine default (`--inference local`) and the replica engine where vLLM is absent.
Over ~250 lines because the fast path lives here: for Llama/Qwen2-shaped models our own decode forward over
a static KV cache, with each decode step a CUDA graph on GPUs (12x stock `generate` at bs 256, docs/perf.md).
Left out: continuous batching (a batch runs until its last row stops) and paged memory.
"""
from typing import Iterable, Protocol, TypedDict, runtime_checkable

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # Qwen2's is the same function

from models import eos_token_ids


class Completion(TypedDict):
    """One sampled completion: a plain dict, so it crosses process boundaries as it is."""
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, under the engine's weights at `version`
    text: str
    finish_reason: str  # "stop" (an eos) or "length" (max_new_tokens)
    version: int  # the weight version that sampled it


@runtime_checkable
class Engine(Protocol):
    version: int

    def generate(self, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0) -> list[list[Completion]]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int: ...


def default_max_batch(device) -> int:
    """TorchEngine rows per decode step: bounds its KV cache (256 x 2048 slots of a 0.5B model: ~6 GB)."""
    return 256 if torch.device(device).type == "cuda" else 64


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

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")


@torch.no_grad()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos=None) -> list[list[int]]:
    """Stock HF `generate` (greedy, dynamic cache) on the left-padded batch: the reference TorchEngine is held to
    (tests/test_engine.py, bench/rollout.py). Per row the new tokens, up to and with the first eos (default: the
    model's generation config's)."""
    L, dev = max(map(len, prompts)), model.device
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=dev)
    eos = model.generation_config.eos_token_id if eos is None else eos
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                         eos_token_id=eos)
    stop = set(eos if isinstance(eos, list) else [eos])
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in out[:, L:].tolist()]
