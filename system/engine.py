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
Over ~500 lines because the fast path lives here: for Llama/Qwen2-shaped models our own forward over a static KV
cache with continuous batching (a finished row's cache slot takes the next waiting sequence), each decode step one
CUDA graph on GPUs (docs/perf.md times it against stock `generate`).
Left out: paged memory (each cache row holds one sequence's whole context; the G completions of a prompt share its
prefill, not its cache slots).
"""
import time
import warnings
from typing import Iterable, Protocol, TypedDict, runtime_checkable

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # Qwen2's is the same function

from system.models import compile_dynamic, eos_token_ids
from weight_sync import ParamCopy


class Completion(TypedDict):
    """One sampled completion: a plain dict, so it crosses process boundaries as it is."""
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, under the engine's weights at `version`
    text: str
    finish_reason: str  # "stop" (an eos) or "length" (max_new_tokens)
    version: int  # the weight version that sampled it


def finish_reason(token_ids: list[int], max_new_tokens: int, eos: set[int]) -> str:
    """How a completion ended, from its ids (up to and with its first eos): "stop" when it ended at an eos or short of
    the cap, "length" when it ran to max_new_tokens without one (an eos as the cap's last token is a stop)."""
    return "stop" if len(token_ids) < max_new_tokens or (token_ids and token_ids[-1] in eos) else "length"


@runtime_checkable
class Engine(Protocol):
    version: int

    def generate(self, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0) -> list[list[Completion]]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int: ...


def default_max_batch(device) -> int:
    """TorchEngine rows per decode step: bounds its KV cache (rows x context slots of every layer's keys and values)."""
    return 256 if torch.device(device).type == "cuda" else 64


def _static_cache_ok(model) -> bool:
    """Our forward covers Llama/Qwen2-shaped models: full attention everywhere, a RoPE that never re-scales."""
    inner, cfg = getattr(model, "model", None), model.config
    return (cfg.model_type in ("llama", "qwen2") and hasattr(inner, "rotary_emb") and hasattr(model, "lm_head")
            and set(getattr(cfg, "layer_types", None) or ["full_attention"]) == {"full_attention"}
            and not any(k in inner.rotary_emb.rope_type for k in ("dynamic", "longrope")))


def _attention_bias(mask, group, dtype):
    """mask [B, T, S] (True = attend) -> the additive bias _attend takes, [B, 1, group * T, S] in dtype: made once per
    forward, not by every layer's sdpa (which turns a boolean mask into this at each call)."""
    B, T, S = mask.shape
    mask = mask[:, None].expand(B, group, T, S).reshape(B, 1, group * T, S)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _attend(q, k, v, bias, scale):
    """q [B, H, T, hd], k/v [B, KV, S, hd], bias [B, 1, H/KV * T, S] (_attention_bias) -> [B, T, H*hd].
    GQA without copying k/v: the H/KV query heads that share a kv head are stacked along T."""
    B, H, T, hd = q.shape
    KV = k.shape[1]
    q = q.reshape(B, KV, H // KV * T, hd)  # head h = kv * g + r reads k/v head kv: row r * T + t
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # [B, KV, g*T, hd]
    return o.reshape(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)


@torch.compiler.disable  # eager inside a compiled decode step: compiled, the in-place write into the KV cache (a graph
# input) becomes a copy of the whole cache at every step
def _store_and_attend(store, i, q, k, v, bias, scale):
    """store(i, k, v) puts layer i's new keys/values into the cache and returns those to attend; then _attend."""
    k, v = store(i, k, v)
    return _attend(q, k, v, bias, scale)


def _fuse(linears):
    """The weights (and biases) of linears that read the same input, stacked into one [sum of outputs, in] tensor, so
    they are one GEMM (q/k/v; gate/up). The linears' parameters become row views of it: HF's forward, update_weights'
    in-place copies and the CUDA graphs all read the same memory. Kept on the first linear and reused while its
    parameters still are those views (several engines on one model); made again if they moved (model.to()).
    -> (weight, bias or None)."""
    fused = getattr(linears[0], "_engine_fused", None)
    if fused is None or not _views_of(fused, linears):
        w = torch.cat([m.weight.detach() for m in linears])
        b = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
        rows = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = w[rows:rows + n]
            if b is not None:
                m.bias.data = b[rows:rows + n]
            rows += n
        fused = linears[0]._engine_fused = (w, b)
    return fused


def _views_of(fused, linears):
    """Whether each linear's weight (and bias) is still its rows of the fused ones."""
    w, b, rows = *fused, 0
    for m in linears:
        if m.weight.data_ptr() != w[rows].data_ptr() or (b is not None and m.bias.data_ptr() != b[rows].data_ptr()):
            return False
        rows += m.weight.shape[0]
    return True


CAPTURED = {"engine_graphs": 0, "capture_s": 0.0}  # every TorchEngine in the process: the CUDA graphs it captured and
# the host seconds that took (each graph's warm-up step, and any compiling that step did, included): warm-up's share


M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (Mueller's), elementwise on int64 tensors; every product stays under 2^63."""
    x = x & M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & M32
    return x ^ (x >> 16)


def sequence_keys(seed: int, n: int, device) -> torch.Tensor:
    """[n] sampling keys, one per sequence of a generate call: sequence i's samples depend on (seed, i) only, not on
    the batch, the cache row or the step at which it was scheduled."""
    return _mix32(_mix32(torch.tensor(seed & M32, device=device)) + torch.arange(n, device=device) * 0x2545F491)


def _sample(logits, temperature, top_p, keys, step):
    """logits [B, V], keys [B] (sequence_keys), step [B] (tokens each row sampled so far) -> next tokens [B] and their
    logprobs [B] under softmax(logits / temperature) (temperature 0: greedy, logprobs at temperature 1).

    Sampling is by inverse CDF with one uniform per row drawn from hash(key, step): a row's token is a function of its
    own logits, key and step, whatever else is in the batch (torch.multinomial with one generator is not).
    """
    logits = logits.float() / (temperature or 1.0)  # [B, V]
    if temperature == 0:
        nxt = logits.argmax(-1)
    else:
        probs = logits.softmax(-1)
        if top_p < 1.0:  # nucleus: keep the smallest set of tokens with mass >= top_p
            p_sorted, idx = probs.sort(-1, descending=True)
            drop = p_sorted.cumsum(-1) - p_sorted > top_p
            probs = probs.scatter(-1, idx, p_sorted.masked_fill(drop, 0.0))
        cdf = probs.cumsum(-1)  # [B, V]
        u = (_mix32(_mix32(keys) ^ (step * 0x27D4EB2D & M32)) >> 8).float() / 2**24  # [B] in [0, 1), 24 bits
        nxt = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
    return nxt, logits.gather(-1, nxt[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _sample_race(logits, temperature, keys, step):
    """_sample at top_p 1 and temperature > 0 by an exponential race (the Gumbel-max trick) instead of an inverse
    CDF: token = argmax_v (logits_v / T - log E_v) with E_v ~ Exp(1) from hash(key, step, v), which is a draw from
    softmax(logits / T). No cumulative sum or search over the vocabulary: compiled, the token and its logprob come out
    of one pass over the logits (TorchEngine(compile=True)). E_v = -log1p(-w_v) with w_v uniform on 32 bits, fine
    near 0, so a token is cut off only below ~e^-22 of the top one's probability.
    """
    x = logits.float() / temperature  # [B, V]
    base = _mix32(keys ^ (step * 0x27D4EB2D & M32))  # [B]
    h = _mix32(base[:, None] + torch.arange(x.shape[-1], device=x.device) * 0x2545F491)  # [B, V] uniform 32-bit
    e = -torch.log1p(-(h.float() + 0.5) * 2.0**-32)  # [B, V] Exp(1)
    nxt = (x - e.log()).argmax(-1)
    return nxt, x.gather(-1, nxt[:, None]).squeeze(-1) - x.logsumexp(-1)


class TorchEngine:
    """Batched sampling in plain PyTorch, one forward per token.

    Llama/Qwen2-shaped models run our own forward that reuses the HF modules (norms, linears, MLP, RoPE) and does
    only the KV cache and attention itself: a static cache [layers, k|v, rows, kv heads, slots, head dim] written in
    place, each row one sequence from slot 0, attention over its filled slots by a boolean mask. Continuous batching:
    every `check_every` decode steps the host looks which rows have stopped, and waiting sequences take those rows
    (a prefill writes their prompts into the cache), so a call of more sequences than rows keeps every row busy until
    the last ones (continuous=False: a new batch starts only when the whole last one has stopped); when none waits,
    the busy rows are packed down, so the steps run over fewer rows as sequences finish. On CUDA each decode step
    (sampling and its bookkeeping included) is one CUDA graph per (batch bucket, attended-length bucket, sampling
    settings), captured on first use, so the host only replays between its looks at the rows; weight updates copy in
    place, so the graphs stay valid. q/k/v and gate/up run as one GEMM each over fused weights that the parameters are
    row views of (_fuse; fuse=False: separate GEMMs). Other architectures take HF's forward + DynamicCache, in
    batches of max_batch. compile=True: the decode step runs under torch.compile and sampling at top_p 1 is
    _sample_race, compiled (docs/perf.md has its speed). The cache write and attention (_store_and_attend) stay eager
    inside the loop over the layers, and Dynamo cannot resume after a graph break inside a loop, so it runs _forward
    itself eagerly and compiles each function _forward calls: the RoPE tables, the attention bias, the norms, RoPE's
    rotation, SiLU; the GEMMs, the residual adds and the MLP's product run as eager kernels. The CUDA graphs are
    captured of that step. Config.compile_engine turns it on (the reproduction recipe does), off by default since on
    a CPU it gains nothing and costs a warm-up.
    """
    BLOCK = 128  # cache slots come in multiples of this: the cache's length and each graph's attended length

    def __init__(self, model, tokenizer, max_batch: int = 64, max_model_len: int | None = None,
                 cuda_graphs: bool = True, continuous: bool = True, compile: bool = False, fuse: bool = True):
        self.model = model.eval().requires_grad_(False)
        self.tok = tokenizer
        self.eos = torch.tensor(eos_token_ids(tokenizer, model), device=model.device)
        self.max_batch = max_batch  # cache rows: sequences decoded at once; bounds the KV cache's memory
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", 2048)  # prompt + completion
        self.static = _static_cache_ok(model)  # else the HF loop
        if not self.static:
            warnings.warn(f"TorchEngine: {model.config.model_type} is not Llama/Qwen2-shaped, so it samples through HF "
                          f"generate (correct, much slower); vLLM serves it fast (--inference=serve)", stacklevel=2)
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self.continuous = continuous
        self.check_every = 16 if model.device.type == "cuda" else 1  # a look at the rows is a host sync: it stalls CUDA
        self.cache, self.graphs = None, {}
        self.version = 0
        self.fuse = fuse and self.static
        self.proj = self._projections()
        self.loader = ParamCopy(dict(model.named_parameters(remove_duplicate=False)))  # update_weights' name map
        self.compiled = compile
        # compiled once for all batch buckets: traced under untied_sizes, never over one row (_bucket)
        self._decode_fn = compile_dynamic(self._decode) if compile else self._decode
        self._race = compile_dynamic(_sample_race) if compile else _sample_race

    def _projections(self):
        """Per layer the fused q/k/v and gate/up weights (_fuse), or None (fuse=False, or the HF loop)."""
        return [(_fuse([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]),
                 _fuse([l.mlp.gate_proj, l.mlp.up_proj])) if self.fuse else None for l in self.model.model.layers] \
            if self.static else []

    def _follow_parameters(self):
        """If the model's parameters moved since the fused weights were made (model.to()), fuse them again and drop
        what points at the old memory: the CUDA graphs and update_weights' destinations."""
        proj = self._projections()  # the same objects while nothing moved
        if any(a is not b for p, q in zip(proj, self.proj) if p for a, b in zip(p, q)):
            self.proj, self.graphs = proj, {}
            self.loader.maps.clear()

    def _sample(self, logits, temperature, top_p, keys, step):
        if self.compiled and temperature > 0 and top_p >= 1.0:
            return self._race(logits, temperature, keys, step)
        return _sample(logits, temperature, top_p, keys, step)

    @torch.no_grad()
    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=0):
        """temperature 0 = greedy (logprobs then from temperature 1). Same seed, same samples: sequence i of the call
        (prompt i // n) samples from sequence_keys(seed)[i], however it is batched."""
        flat = [p for p in prompts for _ in range(n)]
        self._follow_parameters()
        keys = sequence_keys(seed, len(flat), self.model.device)
        if self.static:
            rows = self._generate_static(flat, max_new_tokens, temperature, top_p, keys)
        else:
            rows = []
            for i in range(0, len(flat), self.max_batch):
                rows += self._generate_hf(flat[i:i + self.max_batch], max_new_tokens, temperature, top_p,
                                          keys[i:i + self.max_batch])
        eos = set(self.eos.tolist())
        outs = [{"token_ids": ids, "logprobs": lps, "text": self.tok.decode(ids, skip_special_tokens=True),
                 "finish_reason": finish_reason(ids, max_new_tokens, eos),
                 "version": self.version} for ids, lps in rows]
        return [outs[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _generate_static(self, flat, max_new_tokens, temperature, top_p, keys):
        """Llama/Qwen2: continuous batching over min(N, max_batch) cache rows -> [(token ids, logprobs)] per sequence.

        Each decode step is _step on the engine's static row state (one CUDA graph per bucket on GPUs). The host keeps
        its own view (which sequence each busy row holds, an upper bound of each row's slot) and looks at the device
        only every check_every steps: it copies the stopped rows' outputs out, frees them, packs the busy rows into
        the lowest ones when nothing waits (so the steps' batch bucket shrinks as rows finish), and admits waiting
        sequences into free rows.
        """
        dev, N = self.model.device, len(flat)
        longest = max(map(len, flat))
        assert longest + max_new_tokens <= self.max_model_len, \
            f"longest prompt {longest} + max_new_tokens {max_new_tokens} > max_model_len {self.max_model_len} tokens: " \
            f"pass TorchEngine(..., max_model_len=...) (its KV cache grows up to max_batch x max_model_len slots)"
        R = min(N, self.max_batch)
        self._reserve(R, longest + max_new_tokens)  # the step that samples a row's last token feeds it too
        self.done.fill_(True)  # rows outside the call stay stopped: their writes go to the spare column
        self.max_new.fill_(max_new_tokens)
        tokens = torch.zeros((N, max_new_tokens), dtype=torch.long, device=dev)
        logps = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=dev)
        length = torch.zeros(N, dtype=torch.long, device=dev)
        waiting, free, busy = list(range(N))[::-1], list(range(R)), {}  # busy: row -> (seq, prompt len, step admitted)
        step, changed, self.last_stats = 0, False, {"rows": R, "prefills": 0, "decode_steps": 0, "row_steps": 0,
                                                   "compactions": 0}
        while waiting or busy:
            if waiting and free and (self.continuous or not busy):  # --- admit: prefill waiting sequences into free rows
                take, free = free[:len(waiting)], free[len(waiting):]
                seqs = [waiting.pop() for _ in take]
                rows = torch.tensor(take, device=dev)
                self.logits[rows] = self._prefill([flat[s] for s in seqs], rows)
                self.keys[rows], self.gen[rows], self.done[rows] = keys[torch.tensor(seqs, device=dev)], 0, False
                busy |= {r: (s, len(flat[s]), step) for r, s in zip(take, seqs)}
                self.last_stats["prefills"] += 1
                changed = True
            if changed:  # the host's bounds over the busy rows, without a look at the device
                W = self._bucket(max(busy) + 1)  # rows in play
                grow = max(n - at for _, n, at in busy.values())  # a row's next slot is n + (step - at) < n + max_new
                cap = max(n for _, n, _ in busy.values()) + max_new_tokens
                last_admitted, changed = max(at for _, _, at in busy.values()), False
            self._run_step(W, min(grow + step + 1, cap), temperature, top_p)  # --- sample, record, decode
            self.last_stats["decode_steps"] += 1
            self.last_stats["row_steps"] += W
            step += 1
            if step % self.check_every == 0 or step - last_admitted >= max_new_tokens:  # (then every row has stopped)
                stopped = sorted(set(torch.nonzero(self.done[:W]).view(-1).tolist()) & busy.keys())
                if stopped:  # --- copy their outputs out, free them
                    r, s = torch.tensor(stopped, device=dev), torch.tensor([busy.pop(i)[0] for i in stopped], device=dev)
                    tokens[s], logps[s] = self.row_tok[r, :max_new_tokens], self.row_lp[r, :max_new_tokens]
                    length[s] = self.gen[r]
                    free, changed = sorted(free + stopped), True
                    if not waiting and busy and self._bucket(max(busy) + 1) > self._bucket(len(busy)):
                        busy = self._compact(busy, min(grow + step, cap))
                        self.last_stats["compactions"] += 1
                        free = sorted(set(range(R)) - busy.keys())
        length, tokens, logps = length.tolist(), tokens.tolist(), logps.tolist()
        return [(tokens[i][:length[i]], logps[i][:length[i]]) for i in range(N)]

    BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]  # then multiples of 256

    def _bucket(self, n):
        """The batch bucket of n rows in play: the smallest of BUCKETS (then of 256s) that holds them, at most
        max_batch (not the cache's rows, which earlier calls may have grown: a call's steps, and so its numbers, depend
        on the call alone). Steps run over a whole bucket; a bucket is one CUDA graph per attended length."""
        n = max(n, 2 if self.compiled else 1)  # compiled, a 1-row step would compile again (Dynamo specializes size 1)
        b = next((b for b in self.BUCKETS if b >= n), -(-n // 256) * 256)
        return min(b, self.max_batch)

    def _compact(self, busy, filled):
        """Move the busy rows above len(busy) into the free rows below it (cache slots [:filled] and row state), so
        they fill rows 0..len(busy)-1 and the steps run over a smaller bucket -> the new busy map."""
        n = len(busy)
        src = [r for r in sorted(busy) if r >= n]
        dst = [r for r in range(n) if r not in busy]
        i, j = (torch.tensor(x, device=self.model.device) for x in (src, dst))
        view = self.cache[:, :, :, :, :filled]
        view[:, :, j] = view[:, :, i]
        for t in (self.in_col, self.gen, self.done, self.keys, self.logits, self.row_tok, self.row_lp):
            t[j] = t[i]
        self.done[i] = True
        moved = dict(zip(src, dst))
        return {moved.get(r, r): v for r, v in busy.items()}

    def _step(self, B, S, temperature, top_p):
        """One decode step of rows 0..B-1, all on static engine state (so a CUDA graph can replay it): sample each
        row's next token from logits, record it and its logprob at column gen of the row's outputs (a stopped row:
        the spare last column), count it, stop the row at an eos or max_new tokens, then feed the tokens at slot
        in_col (which a stopped row keeps) through the model, attending slots 0..S-1, -> logits."""
        done, gen = self.done[:B], self.gen[:B]
        nxt, lp = self._sample(self.logits[:B], temperature, top_p, self.keys[:B], gen)
        rows, at = torch.arange(B, device=nxt.device), torch.where(done, self.row_tok.shape[1] - 1, gen)
        self.row_tok[rows, at], self.row_lp[rows, at] = nxt, lp
        gen += ~done
        done |= (nxt[:, None] == self.eos).any(-1) | (gen >= self.max_new)
        self.in_tok[:B] = nxt
        self.logits[:B] = self._decode_fn(self.in_tok[:B], self.in_col[:B], S)
        self.in_col[:B] += ~done

    def _run_step(self, W, S, temperature, top_p):
        """_step over W rows attending S slots: eager, or on CUDA the replay of its graph for (W, S's bucket of
        BLOCK slots, temperature, top_p), captured on first use."""
        if not self.cuda_graphs:
            return self._step(W, S, temperature, top_p)
        key = (W, min(self._in_blocks(S), self.cache.shape[4]), temperature, top_p)
        if key not in self.graphs:
            t = time.perf_counter()
            self.graphs[key] = self._capture(*key)
            CAPTURED["engine_graphs"] += 1
            CAPTURED["capture_s"] += time.perf_counter() - t
        self.graphs[key].replay()

    def _in_blocks(self, slots):
        """slots rounded up to whole BLOCKs: 1 -> 128, 128 -> 128, 129 -> 256."""
        return -(-slots // self.BLOCK) * self.BLOCK

    def _generate_hf(self, prompts, max_new_tokens, temperature, top_p, keys):
        """Any architecture: HF's forward + DynamicCache over one left-padded batch, run until its last row stops."""
        dev, B = self.model.device, len(prompts)
        L = max(len(p) for p in prompts)
        ids = torch.full((B, L), self.tok.pad_token_id, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p, device=dev)
        mask = (torch.arange(L, device=dev) >= torch.tensor([L - len(p) for p in prompts], device=dev)[:, None]).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L] real positions despite the padding
        tokens = torch.zeros((B, max_new_tokens), dtype=torch.long, device=dev)
        logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        length = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
        cache, x = None, ids
        for t in range(max_new_tokens):
            out = self.model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            cache = out.past_key_values
            nxt, lp = _sample(out.logits[:, -1], temperature, top_p, keys, torch.full_like(keys, t))
            nxt = torch.where(done, self.tok.pad_token_id, nxt)
            tokens[:, t], logps[:, t] = nxt, lp
            hit_eos = ~done & torch.isin(nxt, self.eos)
            length = torch.where(hit_eos, t + 1, length)
            done |= hit_eos
            if (t + 1) % self.check_every == 0 and done.all():
                break
            x, mask, pos = nxt[:, None], torch.cat([mask, mask.new_ones((B, 1))], -1), pos[:, -1:] + 1
        length, tokens, logps = length.tolist(), tokens.tolist(), logps.tolist()
        return [(tokens[b][:length[b]], logps[b][:length[b]]) for b in range(B)]

    def _reserve(self, B, slots):
        """A cache for B rows x `slots` slots and the rows' static state: grown (and graphs dropped) only when the
        current one is too small."""
        old = self.cache.shape if self.cache is not None else (0,) * 6
        rows = max(old[2], self._bucket(B))  # room for B's bucket
        slots = max(old[4], self._in_blocks(slots))
        if (rows, slots) == (old[2], old[4]):
            return
        a, dev = self.model.model.layers[0].self_attn, self.model.device
        self.cache, self.graphs = None, {}  # free the old cache and the graphs that point into it first
        self.cache = torch.zeros(len(self.model.model.layers), 2, rows, a.k_proj.out_features // a.head_dim, slots,
                                 a.head_dim, dtype=self.model.dtype, device=dev)  # [layers, k|v, rows, KV, slots, hd]
        # each row's state, static, so a CUDA graph reads and writes it at fixed addresses
        self.in_tok = torch.zeros(rows, dtype=torch.long, device=dev)  # this step's input token
        self.in_col = torch.zeros(rows, dtype=torch.long, device=dev)  # the slot (= position) it goes to
        self.gen = torch.zeros(rows, dtype=torch.long, device=dev)  # tokens sampled
        self.done = torch.ones(rows, dtype=torch.bool, device=dev)  # stopped (or holding no sequence)
        self.keys = torch.zeros(rows, dtype=torch.long, device=dev)  # its sequence's sampling key
        self.logits = torch.zeros((rows, self.model.config.vocab_size), dtype=self.model.dtype, device=dev)  # next
        self.row_tok = torch.zeros((rows, slots + 1), dtype=torch.long, device=dev)  # its outputs; last column: spare
        self.row_lp = torch.zeros((rows, slots + 1), dtype=torch.float32, device=dev)
        self.max_new = torch.zeros((), dtype=torch.long, device=dev)  # the call's max_new_tokens
        self.pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None  # one memory pool for all graphs

    def _capture(self, B, S, temperature, top_p):
        """CUDA graph of _step(B, S, temperature, top_p). Captured mid-generation: the warm-up step (off the capture:
        lazy inits, compilation) runs on a copy of the rows' state, which is put back after it, so the replay right
        after takes the step once (its cache writes are the warm-up's again)."""
        state = (self.in_tok, self.in_col, self.gen, self.done, self.logits, self.row_tok, self.row_lp)
        saved = [t[:B].clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(B, S, temperature, top_p)
        torch.cuda.current_stream().wait_stream(side)
        for t, v in zip(state, saved):
            t[:B] = v
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):  # other threads: NCCL, Ray
            self._step(B, S, temperature, top_p)
        return graph

    def _prefill(self, prompts, rows):
        """New sequences into cache rows `rows` [n] from slot 0 -> logits at each one's last prompt token [n, V].
        Each distinct prompt runs once (the G completions of a prompt share it) and its keys/values are copied into
        every row that holds it. Right-padded: a row's pad columns write slots its decode steps overwrite before
        attending them."""
        dev = self.model.device
        first = {}  # distinct prompt -> its index among the distinct ones
        which = torch.tensor([first.setdefault(tuple(p), len(first)) for p in prompts], device=dev)  # [n]
        distinct = [list(p) for p in first]
        L = max(map(len, distinct))
        ids = torch.full((len(distinct), L), self.tok.pad_token_id, dtype=torch.long, device=dev)
        for i, p in enumerate(distinct):
            ids[i, :len(p)] = torch.tensor(p, device=dev)
        lens = torch.tensor([len(p) for p in distinct], device=dev)
        self.in_col[rows] = lens[which]  # where each row's first sampled token goes

        def store(i, k, v):  # k, v [distinct, KV, L, hd]: the prompts' keys/values, attended to directly
            self.cache[i, 0][rows, :, :L], self.cache[i, 1][rows, :, :L] = k[which], v[which]
            return k, v
        ar = torch.arange(L, device=dev)
        return self._forward(ids, ar.expand(len(distinct), L), (ar[:, None] >= ar)[None], lens - 1, store)[which]

    def _decode(self, tok, col, S):
        """One token per row: tok, col [B] (the slot it goes to = its position), attending over slots 0..S-1
        -> logits [B, V]."""
        B, dev = tok.shape[0], tok.device
        rows = torch.arange(B, device=dev)

        def store(i, k, v):  # k, v [B, KV, 1, hd] -> slot col[b] of row b; attend the row's slots 0..S-1
            kc, vc = self.cache[i, 0, :B], self.cache[i, 1, :B]  # [B, KV, slots, hd]
            kc[rows, :, col], vc[rows, :, col] = k[:, :, 0], v[:, :, 0]
            return kc[:, :, :S], vc[:, :, :S]
        mask = torch.arange(S, device=dev) <= col[:, None]  # [B, S] the row's prompt and everything it generated
        return self._forward(tok[:, None], col[:, None], mask[:, None], torch.zeros_like(col), store)

    def _forward(self, ids, pos, mask, last, store):
        """Our forward with the HF modules: ids, pos [B, T]; mask [B, T, S] over the keys store returns; store(layer,
        k, v) puts the T new keys/values into the cache and returns the keys/values to attend. -> logits [B, V] at
        column last [B]."""
        m, (B, T) = self.model.model, ids.shape
        h = m.embed_tokens(ids)  # [B, T, D]
        cos, sin = m.rotary_emb(h, pos)  # [B, T, hd]
        a = m.layers[0].self_attn
        heads = [a.q_proj.out_features // a.head_dim] + [a.k_proj.out_features // a.head_dim] * 2  # q, k, v heads
        bias = _attention_bias(mask, heads[0] // heads[1], h.dtype)
        for i, layer in enumerate(m.layers):
            a, mlp, x = layer.self_attn, layer.mlp, layer.input_layernorm(h)
            if self.proj[i]:  # one GEMM for q/k/v, one for gate/up
                qkv, gate_up = self.proj[i]
                q, k, v = F.linear(x, *qkv).view(B, T, -1, a.head_dim).transpose(1, 2).split(heads, 1)
            else:
                q, k, v = (p(x).view(B, T, -1, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)  # q [B, H, T, hd], k/v [B, KV, T, hd]
            h = h + a.o_proj(_store_and_attend(store, i, q, k, v, bias, a.scaling))
            x = layer.post_attention_layernorm(h)
            if self.proj[i]:
                gate, up = F.linear(x, *gate_up).chunk(2, -1)
                h = h + mlp.down_proj(mlp.act_fn(gate) * up)
            else:
                h = h + mlp(x)
        h = h[torch.arange(B, device=h.device), last, None]  # [B, 1, D]: the layers' rank, so that the norm, compiled
        # as a frame of its own in a compiled step (TorchEngine's docstring), is one graph for both
        return self.model.lm_head(m.norm(h))[:, 0]  # [B, V]

    @torch.no_grad()
    def update_weights(self, named_tensors, version=None) -> int:
        """Copy new weights into the live parameters (cast to the engine's dtype; one fused copy, ParamCopy); every
        parameter must be among them, tied ones under either name."""
        named = list(named_tensors)
        self._follow_parameters()
        self.loader.load(named, {n: tuple(t.shape) for n, t in named})
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
