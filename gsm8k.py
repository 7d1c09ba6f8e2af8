"""GSM8K: loading, the R1-Zero prompt, a resumable sampler, and evaluation.

    python gsm8k.py --model runs/cpu_smollm2/ckpt/latest/model --data ../shared/data/gsm8k
        full test set: greedy pass@1 (strict and lenient) and maj@k, JSON next to the model

Evaluation metrics:
  strict  pass@1: greedy completion, answer read from <answer>...</answer> (rewards.accuracy_reward)
  lenient pass@1: greedy completion, the last number anywhere in it (forgives a missing format)
  maj@k:          k samples at temperature T, majority vote over their <answer> values
"""
import argparse
import collections
import json
import os
import random

import rewards


def load_split(data: str, split: str) -> list[dict]:
    """[{"question": str, "answer": str}] from a local folder of jsonl or the hub (openai/gsm8k, main).

    A local folder holds {split}.jsonl, e.g. ../shared/data/gsm8k/train.jsonl.
    """
    if os.path.isdir(data):
        path = os.path.join(data, f"{split}.jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} missing: a local data folder needs train.jsonl and test.jsonl")
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    import datasets  # only for hub datasets: it is slow to import
    return [dict(question=r["question"], answer=r["answer"]) for r in datasets.load_dataset(data, "main", split=split)]


def build_prompt(tok, question: str) -> list[int]:
    """Question -> prompt token ids, ending inside an opened <think> block.

    With a chat template: [system: rewards.SYSTEM_PROMPT, user: question] + assistant header + "<think>".
    Without one, R1-Zero's plain form: "{system}\nUser: {question}\nAssistant: <think>".
    Prefilling <think> is what R1-Zero did; rewards.format_reward accepts completions that start inside it.
    """
    if tok.chat_template:
        msgs = [{"role": "system", "content": rewards.SYSTEM_PROMPT}, {"role": "user", "content": question}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "<think>"
    else:
        text = f"{rewards.SYSTEM_PROMPT}\nUser: {question}\nAssistant: <think>"
    return tok(text, add_special_tokens=False).input_ids


class Sampler:
    """Endless seeded shuffle over n items, resumable from (epoch, pos).

    >>> s = Sampler(5, seed=0); s.next(3), s.next(3), s.state()
    ([4, 1, 3], [0, 2, 0], {'epoch': 1, 'pos': 1})   # (values depend on the seed; shapes don't)
    """
    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self._perm = self._shuffle()

    def _shuffle(self):
        perm = list(range(self.n))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(perm)
        return perm

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._shuffle()
            out.append(self._perm[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


def evaluate(engine, tok, rows, max_new_tokens=512, maj_k=0, temperature=1.0, seed=0, batch=64) -> dict:
    """Greedy strict/lenient pass@1 over rows, and maj@k when maj_k > 0. Returns metrics + samples."""
    golds = [rewards.parse_gold(r["answer"]) for r in rows]
    strict = lenient = maj = 0
    samples = []
    for i in range(0, len(rows), batch):
        prompts = [build_prompt(tok, r["question"]) for r in rows[i:i + batch]]
        greedy = engine.generate(prompts, n=1, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
        voted = engine.generate(prompts, n=maj_k, max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed + i) if maj_k else [[]] * len(prompts)
        for gold, (c,), group in zip(golds[i:i + batch], greedy, voted):
            strict += rewards.accuracy_reward(c["text"], gold)
            lenient_pred = rewards.lenient_answer(c["text"])
            lenient += lenient_pred is not None and rewards.answers_equal(lenient_pred, gold)
            if group:
                answers = (rewards.extract_answer(g["text"]) for g in group)  # vote on canonical numbers: $18 = 18
                votes = collections.Counter(v for v in (rewards.lenient_answer(a) for a in answers if a) if v)
                top = votes.most_common(1)[0][0] if votes else ""
                maj += rewards.accuracy_reward(f"<answer>{top}</answer>", gold)
            samples.append({"gold": gold, "completion": c["text"]})
    n = max(len(rows), 1)
    out = {"n": len(rows), "pass@1_strict": strict / n, "pass@1_lenient": lenient / n}
    if maj_k:
        out[f"maj@{maj_k}"] = maj / n
    return out | {"samples": samples}


if __name__ == "__main__":
    import torch
    from infer_workers import TorchEngine
    from models import load_model, load_tokenizer
    ap = argparse.ArgumentParser(description="Evaluate a model on the GSM8K test set.")
    ap.add_argument("--model", required=True, help="hub name, local HF folder, or smollm2")
    ap.add_argument("--data", default="openai/gsm8k", help="hub dataset or local folder with test.jsonl")
    ap.add_argument("--limit", type=int, default=0, help="first N test problems only (0 = all 1319)")
    ap.add_argument("--maj-k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--out", default="", help="JSON path (default: eval_gsm8k.json beside the model)")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(a.model)
    engine = TorchEngine(load_model(a.model, torch.bfloat16 if dev == "cuda" else torch.float32, dev), tok)
    rows = load_split(a.data, "test")[:a.limit or None]
    res = evaluate(engine, tok, rows, a.max_new_tokens, a.maj_k)
    out = a.out or os.path.join(a.model if os.path.isdir(a.model) else ".", "eval_gsm8k.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}), "->", out)
