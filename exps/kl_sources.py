"""Where a run's KL to the initial model comes from: the initial model's log-probs on the run's own validation
completions (RUN/samples/val_step_<step>.jsonl, greedy), token by token.

    python exps/kl_sources.py runs/qwen_coder_r1zero --steps 50 100 300 --data ../shared/data/gsm8k
    python exps/kl_sources.py RUN_A RUN_B --steps 300 --n 100     # runs side by side, the first n problems each

The logged KL is k3 = exp(d) - d - 1, d = log p_ref - log p_policy, averaged over sampled tokens. On a token the
policy is sure of (log p_policy ~ 0, as on its greedy choices) it is about -log p_ref - 1 once p_ref is small: a few
tokens per completion that the initial model finds very unlikely (a habit the policy picked up) can outweigh all the
rest. Per run and step this prints one JSON line: the tokens scored, the mean initial-model log-prob, "k3_if_sure"
(k3 with log p_policy = 0 on every token: what the KL would be if the policy were certain of its greedy text; no
trained weights needed), the share of tokens below --below and the share of k3_if_sure they carry, and the contexts
(three tokens before -> the token) most often below it.
The prompts are rebuilt from the run's config.yaml (prompt, val_size; --data and --model where the run's paths are
not this machine's). The samples hold text, not ids: each completion is tokenised again (and an eos appended to the
stopped ones), which can differ from the sampled ids at a few places. The model runs in fp32, on a GPU if there is one.
"""
import argparse
import collections
import copy
import json
import os
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gsm8k  # noqa: E402
import rewards  # noqa: E402
from system.models import load_model, load_tokenizer  # noqa: E402


def read_prompt(lm, prompt: list[int]):
    """The model over a prompt: its KV cache and the log-probs of the token after it ([V]). Every run's completion of
    a problem continues the same prompt, so it is read once."""
    with torch.no_grad():
        out = lm(torch.tensor([prompt], device=lm.device), use_cache=True)
    return out.past_key_values, torch.log_softmax(out.logits[0, -1].float(), -1)


def completion_logprobs(lm, read, completion: list[int]) -> torch.Tensor:
    """The model's log-prob of each completion token after the prompt `read` (read_prompt) and the tokens before it:
    [len(completion)]."""
    cache, first = read
    logp = first[None]  # [1, V]: the first token's
    if len(completion) > 1:
        with torch.no_grad():
            logits = lm(torch.tensor([completion[:-1]], device=lm.device),
                        past_key_values=copy.deepcopy(cache)).logits[0].float()
        logp = torch.cat([logp, torch.log_softmax(logits, -1)])  # [len(completion), V]
    return logp.gather(1, torch.tensor(completion, device=lm.device)[:, None])[:, 0].cpu()


def k3_if_sure(ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 per token with the policy's log-prob taken as 0: exp(d) - d - 1 at d = log p_ref."""
    return torch.exp(ref_logp) - ref_logp - 1


def tokens(tok, sample: dict) -> list[int]:
    """A sample's completion as ids: its text tokenised again, an eos appended where it stopped."""
    return tok(sample["completion"], add_special_tokens=False)["input_ids"] + \
        ([tok.eos_token_id] if sample.get("finish_reason") == "stop" else [])


def summary(tok, scored: list[tuple[list[int], torch.Tensor]], below: float, top: int = 8) -> dict:
    """(ids, initial-model log-probs) of each completion -> token count, mean log-prob, k3_if_sure, the share of tokens
    below `below`, their share of k3_if_sure, and the most frequent contexts of those tokens."""
    contexts = collections.Counter()
    for ids, lp in scored:
        for i in (lp < below).nonzero().view(-1).tolist():
            contexts[f"{tok.decode(ids[max(0, i - 3):i])!r} -> {tok.decode(ids[i:i + 1])!r}"] += 1
    lp = torch.cat([lp for _, lp in scored])
    k3, low = k3_if_sure(lp), lp < below
    return {"completions": len(scored), "tokens": lp.numel(), "mean_logp": round(lp.mean().item(), 4),
            "k3_if_sure": round(k3.mean().item(), 4), "share_below": round(low.float().mean().item(), 4),
            "k3_share_below": round((k3[low].sum() / k3.sum()).item(), 4) if k3.sum() > 0 else 0.0,
            "below": below, "top_contexts": contexts.most_common(top)}


def validation_prompts(tok, cfg: dict, data: str | None, n: int) -> tuple[list[list[int]], list[str]]:
    """The first n validation problems of a run (its config.yaml) as its evals prompted them, and their gold answers."""
    rows = gsm8k.split_train_val(gsm8k.load_split(data or cfg["data"], "train"), cfg["val_size"])[1][:n]
    return (gsm8k.build_prompts(tok, [r["question"] for r in rows], cfg["prompt"]),
            [rewards.parse_gold(r["answer"]) for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (config.yaml and samples/)")
    ap.add_argument("--steps", type=int, nargs="+", required=True, help="validation steps to read")
    ap.add_argument("--n", type=int, default=100, help="completions per step (the first n problems)")
    ap.add_argument("--below", type=float, default=-10.0, help="a token the initial model finds this unlikely (nats)")
    ap.add_argument("--data", help="GSM8K folder, where the run's config names another machine's")
    ap.add_argument("--model", help="the initial model, where not the run's config.yaml `model`")
    args = ap.parse_args(argv)
    configs = {r: yaml.safe_load(open(os.path.join(r, "config.yaml"))) for r in args.runs}
    models = {args.model or cfg["model"] for cfg in configs.values()}
    if len(models) > 1:
        raise SystemExit(f"the runs start from different models ({sorted(models)}); compare runs of one model")
    name = models.pop()
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # fp32 either way: a GPU only makes it faster
    tok, lm = load_tokenizer(name), load_model(name, torch.float32, dev).eval()
    prompts, samples = {}, {}  # run -> its validation prompts; (run, step) -> its first n samples
    for run_dir in args.runs:
        prompts[run_dir], golds = validation_prompts(tok, configs[run_dir], args.data, args.n)
        for step in args.steps:
            path = os.path.join(run_dir, "samples", f"val_step_{step:06d}.jsonl")
            samples[run_dir, step] = [json.loads(line) for line in open(path)][:args.n]
            if [s["gold"] for s in samples[run_dir, step]] != golds[:len(samples[run_dir, step])]:
                raise SystemExit(f"{path}: its gold answers are not the run's validation problems in order; "
                                 f"pass the --data the run used")
    scored = {key: [] for key in samples}
    for i in range(args.n):  # problem by problem: its prompt read once for every run and step that answered it
        reads = {}
        for (run_dir, step), rows in samples.items():
            if i < len(rows):
                p = prompts[run_dir][i]
                if tuple(p) not in reads:
                    reads[tuple(p)] = read_prompt(lm, p)
                ids = tokens(tok, rows[i])
                scored[run_dir, step].append((ids, completion_logprobs(lm, reads[tuple(p)], ids)))
    for (run_dir, step), rows in scored.items():
        print(json.dumps({"run": run_dir, "step": step} | summary(tok, rows, args.below)), flush=True)


if __name__ == "__main__":
    main()
