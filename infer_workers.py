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

TorchEngine is the plain-PyTorch engine: the single-machine default and what runs where vLLM does
not. It samples a batch with a KV cache, one forward per token; no continuous batching, no CUDA
graphs yet (left for the GPU work, where rollout speed matters).
"""
import torch

from models import eos_token_ids


class TorchEngine:
    def __init__(self, model, tokenizer, max_batch: int = 64):
        self.model = model.eval().requires_grad_(False)
        self.tok = tokenizer
        self.eos = torch.tensor(eos_token_ids(tokenizer, model), device=model.device)
        self.max_batch = max_batch  # sequences per forward: bounds the KV cache's memory
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
        mask = torch.zeros((B, L), dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p, device=dev)
            mask[b, L - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L] real positions despite the padding
        cache, x = None, ids
        tokens = torch.zeros((B, max_new_tokens), dtype=torch.long, device=dev)
        logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        length = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
        for t in range(max_new_tokens):
            out = self.model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            logits = out.logits[:, -1].float()  # [B, V]
            logp = torch.log_softmax(logits / (temperature or 1.0), -1)  # [B, V]
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = logp.exp()
                if top_p < 1.0:  # nucleus: keep the smallest set of tokens with mass >= top_p
                    p_sorted, idx = probs.sort(-1, descending=True)
                    drop = p_sorted.cumsum(-1) - p_sorted > top_p
                    probs = probs.scatter(-1, idx, p_sorted.masked_fill(drop, 0.0))
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)  # [B]
            nxt = torch.where(done, self.tok.pad_token_id, nxt)
            tokens[:, t] = nxt
            logps[:, t] = logp.gather(-1, nxt[:, None]).squeeze(-1)
            hit_eos = ~done & torch.isin(nxt, self.eos)
            length = torch.where(hit_eos, t + 1, length)
            done |= hit_eos
            if done.all():
                break
            x = nxt[:, None]
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], -1)
            pos = pos[:, -1:] + 1
        length, tokens, logps = length.tolist(), tokens.tolist(), logps.tolist()
        outs = []
        for b in range(B):
            ids_b = tokens[b][:length[b]]
            stopped = length[b] < max_new_tokens or (ids_b and ids_b[-1] in self.eos.tolist())
            outs.append({"token_ids": ids_b, "logprobs": logps[b][:length[b]],
                         "text": self.tok.decode(ids_b, skip_special_tokens=True),
                         "finish_reason": "stop" if stopped else "length", "version": self.version})
        return outs

    @torch.no_grad()
    def update_weights(self, named_tensors) -> int:
        """Copy new weights into the live parameters (cast to the engine's dtype)."""
        params = dict(self.model.named_parameters())
        seen = 0
        for name, tensor in named_tensors:
            assert name in params, f"unknown parameter {name!r} (engine has e.g. {next(iter(params))!r})"
            params[name].copy_(tensor)
            seen += 1
        assert seen == len(params), f"got {seen} tensors for {len(params)} parameters"
        self.version += 1
        return self.version
