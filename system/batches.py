"""The batches the trainer computes on: sequences packed into one row (shared prompts run once for their completions),
and the log-probs of their tokens, computed in chunks so no [tokens, vocab] tensor is ever whole.

train.policy_step calls collate, then Policy (the LM with token_logprobs as its forward, so DDP/FSDP wrap the call we
make). Everything here is exact: padded, packed and shared-prompt batches give the same log-probs and gradients
(tests/test_grpo.py); what differs is the work and the memory.
"""
import functools

import torch
import torch.nn.functional as F

from system import models


def token_logprobs(model, inputs, temperature=1.0, chunk=1024, compiled=False):
    """Log-prob of each next token, and the entropy of its distribution.

    logp[b, t] = log softmax(logits[b, t] / T)[input_ids[b, t + 1]]   (logits at t predict t + 1)
    inputs: model inputs [B, L] -> ([B, L-1], [B, L-1]) at every position; or collate()'s, padded [B, L] or packed
    [1, N], whose "predict" names the positions that predict a completion token: only those are computed, and come
    back in collate's [B, L-1] grid (0 elsewhere). The lm_head and the fp32 log-softmax run chunk tokens at a time
    under activation checkpointing, so at most [chunk, vocab] logits exist at once, forward or backward;
    compiled: that chunk's cast / log-softmax / gather / entropy run as fused kernels (torch.compile).
    """
    inputs = dict(inputs)
    predict = inputs.pop("predict", None)  # (positions [M] in the flattened hidden states, their targets [M],
    # their places [M] in the flattened grid, the grid's shape)
    with models.untied_sizes():  # compiled layers (models.compile_model): one graph for all batch shapes
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # [R, L, H]
    R, L, H = hidden.shape
    if predict is None:
        h, targets = hidden[:, :-1].reshape(-1, H), inputs["input_ids"][:, 1:].reshape(-1)  # [R*(L-1), H], [R*(L-1)]
    else:
        at, targets, where, grid = predict
        h = hidden.reshape(-1, H)[at]  # [M, H]: the prompt's positions predict nothing the loss uses
    head, fn = model.get_output_embeddings(), _chunk_logprobs_compiled() if compiled else _chunk_logprobs
    logps, ents = [], []
    for i in range(0, h.shape[0], chunk):
        lp, ent = torch.utils.checkpoint.checkpoint(fn, h[i:i + chunk], head.weight, head.bias, targets[i:i + chunk],
                                                    temperature, use_reentrant=False)
        logps.append(lp)
        ents.append(ent)
    logp, ent = torch.cat(logps), torch.cat(ents)
    if predict is None:
        return logp.view(R, L - 1), ent.view(R, L - 1)
    return to_grid(logp, where, grid), to_grid(ent, where, grid)


def to_grid(x, where, shape):
    """x [M] placed at `where` [M] of a zero grid `shape` (collate's "predict"): an index_copy by places collate found
    on the host, whose backward is a gather; masked_scatter's backward (masked_select) would wait for the GPU."""
    return x.new_zeros(shape.numel()).index_copy(0, where, x).view(shape)


def _chunk_logprobs(h, w, b, targets, temperature):
    logp = F.linear(h, w, b).float().div(temperature).log_softmax(-1)  # [N, V] fp32, this chunk only
    entropy = -(logp.exp() * logp).sum(-1).detach()  # [N]
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy  # [N], [N]


@functools.cache
def _chunk_logprobs_compiled():
    """_chunk_logprobs under torch.compile, made on first use: creating it takes seconds, which every process
    importing this module would pay at import, compile or not. The temperature is compiled in as a constant (a run
    has one; another recompiles): left dynamic, Dynamo passes a float as a 0-d CPU tensor, a CPU input to a GPU
    graph, which can make Inductor probe the host CPU's vector ISA (subprocesses that each import torch) in every
    fresh process, warm compile cache or not."""
    return torch._dynamo.config.patch(specialize_float=True)(models.compile_dynamic(_chunk_logprobs))


class Policy(torch.nn.Module):
    """The LM, with a forward that returns token log-probs: so DDP/FSDP wrap the call we make."""
    def __init__(self, lm, compiled=False):
        super().__init__()
        self.lm, self.compiled = lm, compiled

    def forward(self, inputs, temperature, chunk):
        return token_logprobs(self.lm, inputs, temperature, chunk, self.compiled)


def collate(prompts, completions, pad_id, device, packed=False, share_prompts=False):
    """Prompt + completion ids as model inputs, plus the loss mask and the engine's log-probs.

    prompts [[5, 6]], completions [{"token_ids": [7, 8, 9], "logprobs": [a, b, c]}], pad 0 ->
      input_ids [[5, 6, 7, 8, 9]], attention [[1, 1, 1, 1, 1]]   (right-padded to the longest)
      loss_mask [[0, 1, 1, 1]]      over the L-1 predicted positions: 1 where a completion token is predicted
      old_logp  [[0, a, b, c]]      the engine's log-probs, aligned to the same positions
    inputs["predict"]: (the positions in the flattened inputs whose next token is a completion token, those tokens,
    their places in the flattened loss_mask, loss_mask's shape): token_logprobs computes only those.
    packed: the sequences are concatenated into one row [1, N] with position ids restarting at 0 and their starts
    cu_seq_lens [S+1]. share_prompts (packed): consecutive sequences with the same prompt become one packed sequence
    [prompt, completion 1, completion 2, ..] (positions of each completion from len(prompt); "shared": the blocks
    models.packed_attention attends, which keep the completions apart, made here on the host), so the prompt runs once:
    [5, 6] twice with [7, 8] and [9] -> input_ids [[5, 6, 7, 8, 9]], position_ids [[0, 1, 2, 3, 2]].
    Returns (model inputs, loss_mask [B, L-1], old_logp [B, L-1]).
    """
    L = max(len(p) + len(c["token_ids"]) for p, c in zip(prompts, completions))
    mask, old = torch.zeros((len(prompts), L - 1)), torch.zeros((len(prompts), L - 1))
    for b, (p, c) in enumerate(zip(prompts, completions)):
        mask[b, len(p) - 1:len(p) - 1 + len(c["token_ids"])] = 1
    predicted = mask.bool()
    where = predicted.view(-1).nonzero().view(-1)  # on the host: no device sync
    old[predicted] = torch.tensor([x for c in completions for x in c["logprobs"]])  # row by row, in order
    if not packed:
        ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, (p, c) in enumerate(zip(prompts, completions)):
            ids[b, :len(p) + len(c["token_ids"])] = torch.tensor(p + c["token_ids"])
            attn[b, :len(p) + len(c["token_ids"])] = 1
        at = (torch.arange(len(prompts))[:, None] * L + torch.arange(L - 1))[predicted]  # in the flattened [B*L]
        inputs = {"input_ids": ids, "attention_mask": attn, "predict": (at, ids.view(-1)[at + 1], where, mask.shape)}
    else:
        ids, pos, starts, at, targets, blocks = [], [], [0], [], [], []
        for b, (p, c) in enumerate(zip(prompts, completions)):
            c = c["token_ids"]
            if not (share_prompts and b and prompts[b - 1] == p):  # a new packed sequence, from its prompt
                base = len(ids)
                ids += p
                pos += range(len(p))
                starts.append(len(ids))
                blocks.append((base, len(ids), base, base))  # the prompt: its own keys
            at += ([base + len(p) - 1] + list(range(len(ids), len(ids) + len(c) - 1))) if c else []  # predictors
            if c:
                blocks.append((len(ids), len(ids) + len(c), base, base + len(p)))  # its prompt's keys, then its own
            targets += c
            ids += c
            pos += range(len(p), len(p) + len(c))
            starts[-1] = len(ids)
        long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731 (a given dtype: no per-element inference)
        inputs = {"input_ids": long([ids]), "position_ids": long([pos]),  # [1, N] each
                  "cu_seq_lens_q": torch.tensor(starts, dtype=torch.int32), "max_length_q": L,
                  "predict": (long(at), long(targets), where, mask.shape)}
        inputs |= {"cu_seq_lens_k": inputs["cu_seq_lens_q"], "max_length_k": L}
        if share_prompts:
            inputs["shared"] = models.shared_prompt_layout(blocks)
    # non_blocking: a host-to-device copy from pageable memory is staged before .to() returns (safe), and the host then
    # need not wait for the GPU to finish the previous micro-batch's work first
    to = lambda x: x.to(device, non_blocking=True) if torch.is_tensor(x) else x  # noqa: E731
    inputs = {k: tuple(map(to, v)) if isinstance(v, tuple) else to(v) for k, v in inputs.items()}
    return inputs, to(mask), to(old)
