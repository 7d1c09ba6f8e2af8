"""GSM8K: loading, the held-out validation split, the prompts (PROMPTS), a resumable sampler, evaluation.

    python gsm8k.py --model smollm2 --data ../shared/data/gsm8k --limit 50      # a quick look (CPU: ~8 min)
    python gsm8k.py --model runs/x/ckpt/latest/model --data ../shared/data/gsm8k  # all 1319 test problems
    python gsm8k.py --model qwen-coder --prompt cot --maj-k 0 ...   # the model's own chain of thought (reference)

Splits: "train" and "test" as published; the trainer holds out the LAST val_size problems of train as its
validation set (in-loop eval, hyper-parameter choices), and trains on the rest. The test set is for reported
numbers only.

Evaluation metrics (each with its 95% Wilson interval):
  strict  pass@1: greedy completion that stopped by itself, in the exact format (format 1.0), with the right
                  number in the answer block that ends it (rewards.reward_components)
  lenient pass@1: greedy completion, the last number anywhere in it (forgives the format and a cut at the cap)
  format:         share of greedy completions that stopped in the exact format (rewards.reward_components)
  cut:            share of greedy completions cut at max_new_tokens (they earn no strict credit)
  maj@k:          k samples at temperature T, majority vote over the answers of those that stopped with one
The in-loop eval (train.py) and this script call the same `evaluate` with the same prompt (the run's Config.prompt;
the eval JSON records it).
"""
import argparse
import collections
import json
import os
import random
from typing import NamedTuple

import rewards

(THINK, THINK_END), (ANSWER, ANSWER_END) = rewards.THINK, rewards.ANSWER  # the graders' tags, one home
# R1-Zero's instruction, with one line added for GSM8K's numeric answers; rewards.format_reward checks its tags
R1_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    f"the answer. The reasoning process and answer are enclosed within {THINK} {THINK_END} and "
    f"{ANSWER} {ANSWER_END} tags, respectively, i.e., {THINK} reasoning process here {THINK_END}"
    f"{ANSWER} answer here {ANSWER_END}. The answer is just the final number, with no units or words."
)
# One worked example, made up here (no GSM8K problem): the reasoning inside the think tags, the bare number in the
# answer tags. Without it a 0.5B instruct model follows the tags only half the time and, paid for the form, drops
# the reasoning for its first steps (docs/results.md: the ablation rows).
EXAMPLE_QUESTION = ("A shelf holds 3 rows of 14 books. A librarian adds 9 books and lends out 11. "
                    "How many books are on the shelf now?")
EXAMPLE_REPLY = (f"{THINK} 3 rows of 14 books is 3 * 14 = 42 books. Adding 9 gives 42 + 9 = 51, and lending out 11 "
                 f"leaves 51 - 11 = 40. {THINK_END}{ANSWER} 40 {ANSWER_END}")
EXAMPLE = f' For example, if the user asks "{EXAMPLE_QUESTION}", the assistant replies: {EXAMPLE_REPLY}'


class Prompt(NamedTuple):
    """How a question is asked (build_prompts renders it, through the model's chat template when it has one)."""
    system: str | None  # the system message; None: the chat template's default
    suffix: str  # text after the question
    start: str  # the start of the assistant's reply, prefilled (R1-Zero opens the think block)
    example: tuple[str, str] | None  # a worked example as an earlier (user, assistant) exchange
    tagged: bool  # the answer comes in the answer tags (graded strictly); else its last number (lenient)


# Config.prompt and gsm8k.py --prompt pick one. "cot" is the model's own chain of thought: its chat template's default
# system message, no tags (score it lenient): the reference an R1-Zero run has to beat without any training.
# "r1_turn" gives the example as a previous exchange instead of inside the system message: SmolLM2-135M ignores a
# system message's example but copies an earlier turn's form (docs/results.md), so the CPU demo uses it.
PROMPTS = {
    "r1": Prompt(R1_SYSTEM, "", THINK, None, True),
    "r1_example": Prompt(R1_SYSTEM + EXAMPLE, "", THINK, None, True),
    "r1_turn": Prompt(R1_SYSTEM, "", THINK, (EXAMPLE_QUESTION, EXAMPLE_REPLY), True),
    "cot": Prompt(None, "\nSolve it step by step, then give the final number on the last line.", "", None, False),
}
DEFAULT_PROMPT = "r1_example"  # train.Config.prompt's default, and gsm8k.py's


def load_split(data: str, split: str) -> list[dict]:
    """[{"question": str, "answer": str}] from a local folder of jsonl or the hub (openai/gsm8k, main).

    A local folder holds {split}.jsonl, e.g. ../shared/data/gsm8k/train.jsonl. Every row is checked here, at load
    (check_row), so a bad one is an error naming its file and line, not a crash at the step that first samples it.
    """
    if os.path.isdir(data):
        path = os.path.join(data, f"{split}.jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} missing: a local data folder needs train.jsonl and test.jsonl")
        rows = []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        row = json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from None
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
                    rows.append(check_row(row, f"{path}:{n}"))
        if not rows:
            raise ValueError(f"{path} holds no rows")
        return rows
    import datasets  # only for hub datasets: it is slow to import
    return [check_row(dict(r), f"{data} ({split} split) row {i}")
            for i, r in enumerate(datasets.load_dataset(data, "main", split=split))]


def check_row(row, where: str) -> dict:
    """A GSM8K row as the trainer needs it: a non-empty question and an answer whose final number (after "####")
    can be graded. Returns {"question", "answer"}; raises ValueError naming `where` otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object with question and answer, got {type(row).__name__}")
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"{where}: {key!r} is missing or empty (keys: {sorted(row)[:10]})")
    if rewards.lenient_answer(row["answer"].rpartition("####")[2]) is None:
        raise ValueError(f"{where}: the answer has no final number after '####' to grade against")
    return {"question": row["question"], "answer": row["answer"]}


def build_prompts(tok, questions: list[str], prompt: str = DEFAULT_PROMPT) -> list[list[int]]:
    """Questions -> prompt token ids, in PROMPTS[prompt]'s form; the R1 prompts end inside an opened <think> block.

    With a chat template: [system, (user: example, assistant: its reply,) user: question + suffix] + assistant header
    + the reply's start ("<think>"). Without one, R1-Zero's plain form: "{system}\nUser: {question}{suffix}\nAssistant:
    <think>" (the example exchange, if any, as one more User/Assistant pair before the question).
    Prefilling <think> is what R1-Zero did; rewards.format_reward accepts completions that start inside it.
    Batched (one template render, one tokenizer call): the whole train split takes well under a second.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"prompt {prompt!r}: use one of {', '.join(PROMPTS)}")
    system, suffix, start, shot, _ = PROMPTS[prompt]
    if tok.chat_template:
        head = [{"role": "system", "content": system}] * bool(system) + (
            [{"role": "user", "content": shot[0]}, {"role": "assistant", "content": shot[1]}] if shot else [])
        chats = [head + [{"role": "user", "content": q + suffix}] for q in questions]
        texts = [t + start for t in tok.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)]
    else:
        head = (f"{system}\n" if system else "") + (f"User: {shot[0]}\nAssistant: {shot[1]}\n" if shot else "")
        texts = [head + f"User: {q}{suffix}\nAssistant: {start}".rstrip() for q in questions]
    return tok(texts, add_special_tokens=False).input_ids if texts else []


def build_prompt(tok, question: str, prompt: str = DEFAULT_PROMPT) -> list[int]:
    return build_prompts(tok, [question], prompt)[0]


def reward(completion, answer: str, cfg) -> dict[str, float]:
    """The reward the trainer optimises for one completion (the engine's: text, token ids, finish reason) of a question
    whose GSM8K answer field is `answer`, and its components, each logged per step:
        format_weight * format + accuracy [+ overlong_weight * overlong]   (cfg: train.Config)
    rewards.py grades: a completion cut at max_new_tokens, or going on after its answer block, earns no format or
    accuracy; overlong is DAPO's soft length penalty (cfg.overlong_buffer > 0). A new reward term goes here."""
    return rewards.reward_components(completion, answer, cfg.format_weight, cfg.max_new_tokens, cfg.overlong_buffer,
                                     cfg.overlong_weight)


class Sampler:
    """Endless seeded shuffle over n items, resumable from (epoch, pos).

    >>> s = Sampler(5, seed=0); s.next(3), s.next(3), s.state()   # the second call crosses into epoch 1
    ([2, 1, 0], [4, 3, 2], {'epoch': 1, 'pos': 1})
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


def split_train_val(rows: list[dict], val_size: int) -> tuple[list[dict], list[dict]]:
    """Train rows -> (rows to train on, held-out validation rows): the last val_size rows are held out.

    10 rows, val_size 3 -> (rows[0:7], rows[7:10]). GSM8K's train file is in no particular order, and the
    hub's openai/gsm8k has the same order, so both sources hold out the same problems.
    """
    if not 0 <= val_size < len(rows):
        raise ValueError(f"val_size={val_size} must be in [0, {len(rows)}): the train split has {len(rows)} rows")
    return rows[:len(rows) - val_size], rows[len(rows) - val_size:]


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n: (low, high). wilson(0, 100) -> (0.0, 0.037)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    center, half = (p + z2 / (2 * n)) / (1 + z2 / n), z / (1 + z2 / n) * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5
    return max(0.0, center - half), min(1.0, center + half)


def majority(completions: list[dict], tagged: bool = True) -> str:
    """Majority vote over k completions, on canonical numbers ($18 = 18); "" if none. tagged: the answers of those
    that stopped by themselves and end with an answer block (rewards.final_answer), as the strict score reads them;
    else the last number of each."""
    answers = (rewards.final_answer(c["text"]) if c["finish_reason"] == "stop" else None for c in completions) \
        if tagged else (c["text"] for c in completions)
    votes = collections.Counter(v for v in (rewards.lenient_answer(a) for a in answers if a) if v)
    return votes.most_common(1)[0][0] if votes else ""


def evaluate(engine, tok, rows, max_new_tokens=512, maj_k=0, temperature=1.0, seed=0, batch=64,
             progress=False, prompt=DEFAULT_PROMPT) -> dict:
    """Greedy strict/lenient pass@1, format rate, cut share and repetition (rewards.repetition, a mean) over rows, and
    maj@k when maj_k > 0, with PROMPTS[prompt].

    Prompts go to the engine `batch` at a time (greedy first, then the k samples); progress=True shows a bar
    with the running accuracy. maj@k votes over the answers that end the samples which stopped (majority), or over
    last numbers for a prompt without tags.
    Returns {"n", "prompt", metric: value, metric + "_ci95": [low, high], ..., "samples"}.
    """
    from tqdm import tqdm
    golds = [rewards.parse_gold(r["answer"]) for r in rows]
    prompts, tagged = build_prompts(tok, [r["question"] for r in rows], prompt), PROMPTS[prompt].tagged
    hits = {"pass@1_strict": 0, "pass@1_lenient": 0, "format": 0, "cut": 0} | ({f"maj@{maj_k}": 0} if maj_k else {})
    samples = []
    bar = tqdm(total=len(rows) * (1 + maj_k), unit="completion", disable=not progress, dynamic_ncols=True)
    for i in range(0, len(rows), batch):
        greedy = engine.generate(prompts[i:i + batch], n=1, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
        for gold, (c,) in zip(golds[i:i + batch], greedy):
            lenient, graded = rewards.lenient_answer(c["text"]), rewards.reward_components(c, gold)
            hits["pass@1_strict"] += graded["format"] == 1.0 and graded["accuracy"] == 1.0
            hits["pass@1_lenient"] += lenient is not None and rewards.answers_equal(lenient, gold)
            hits["format"] += graded["format"] == 1.0
            hits["cut"] += c["finish_reason"] == "length"
            samples.append({"gold": gold, "completion": c["text"], "finish_reason": c["finish_reason"]})
        bar.update(len(greedy))
        bar.set_postfix(strict=f"{hits['pass@1_strict'] / len(samples):.1%}",
                        lenient=f"{hits['pass@1_lenient'] / len(samples):.1%}")
    for i in range(0, len(rows) if maj_k else 0, batch):
        groups = engine.generate(prompts[i:i + batch], n=maj_k, max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=seed + 1 + i)
        for j, (gold, group) in enumerate(zip(golds[i:i + batch], groups)):
            top = majority(group, tagged)
            hits[f"maj@{maj_k}"] += rewards.accuracy_reward(f"{ANSWER}{top}{ANSWER_END}", gold)
            samples[i + j]["majority"] = top
        bar.update(len(groups) * maj_k)
        bar.set_postfix(strict=f"{hits['pass@1_strict'] / len(rows):.1%}",
                        **{f"maj@{maj_k}": f"{hits[f'maj@{maj_k}'] / min(i + batch, len(rows)):.1%}"})
    bar.close()
    out = {"n": len(rows), "prompt": prompt}
    for k, v in hits.items():
        out[k] = v / max(len(rows), 1)
        out[k + "_ci95"] = list(wilson(v, len(rows)))
    out["repeated"] = sum(rewards.repetition(s["completion"]) for s in samples) / max(len(samples), 1)
    return out | {"samples": samples}


TRAINED_WITH = "simple_r1.json"  # in a checkpoint's model folder (run.save_checkpoint): what it was trained with


def trained_prompt(model: str) -> str:
    """The prompt a checkpoint's model folder was trained with (TRAINED_WITH), else the default: a checkpoint is
    evaluated as it was trained unless --prompt says otherwise."""
    path = os.path.join(model, TRAINED_WITH)
    return json.load(open(path))["prompt"] if os.path.isfile(path) else DEFAULT_PROMPT


if __name__ == "__main__":
    import sys
    import time
    from infer_workers import make_engine
    from system.models import load_tokenizer
    ap = argparse.ArgumentParser(description="Evaluate a model on the GSM8K test set.")
    ap.add_argument("--model", required=True, help="hub name, local HF folder, smollm2 or qwen-coder")
    ap.add_argument("--prompt", default=None, choices=list(PROMPTS),
                    help=f"default: the prompt a checkpoint was trained with (its {TRAINED_WITH}), else "
                         f"{DEFAULT_PROMPT}; cot: the model's own chain of thought, no tags (read its lenient score)")
    ap.add_argument("--data", default="openai/gsm8k", help="hub dataset or local folder with test.jsonl")
    ap.add_argument("--limit", type=int, default=0, help="first N test problems only (0 = all 1319)")
    ap.add_argument("--maj-k", type=int, default=8, help="samples per problem for maj@k (0 = greedy only)")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=1.0, help="of the maj@k samples")
    ap.add_argument("--engine", default="auto", choices=["auto", "vllm", "torch"], help="auto: vLLM if installed")
    ap.add_argument("--batch", type=int, default=0, help="problems per engine call and progress update (0: 256 on a "
                                                           "GPU, 16 on the CPU)")
    ap.add_argument("--out", default="", help="JSON path (default: eval_gsm8k.json beside the model)")
    ap.add_argument("--record", default="", help="also put the metrics (no samples) into this JSON file ...")
    ap.add_argument("--as", dest="tag", default="", help="... under this key (e.g. before / after)")
    ap.add_argument("--verbose", action="store_true", help="show the engine's start-up logs (vLLM's config dump and "
                                                           "INFO lines), kept out of the progress bar otherwise")
    a = ap.parse_args()
    if not a.verbose:  # read by vLLM when it is imported, below
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from system.models import check_source
    try:
        check_source(a.model)
        check_source(a.data, "dataset")
    except ValueError as e:  # a name or path the user gave: argparse's one-line error, exit status 2
        ap.error(str(e))
    a.prompt = a.prompt or trained_prompt(a.model)
    print(f"prompt {a.prompt}", file=sys.stderr)
    rows = load_split(a.data, "test")[:a.limit or None]
    engine = make_engine(a.model, a.engine)
    t0 = time.perf_counter()
    import torch
    batch = a.batch or (256 if torch.cuda.is_available() else 16)
    res = evaluate(engine, load_tokenizer(a.model), rows, a.max_new_tokens, a.maj_k, a.temperature, batch=batch,
                   progress=True, prompt=a.prompt)
    res = {"model": a.model, "engine": type(engine).__name__, "max_new_tokens": a.max_new_tokens,
           "eval_s": round(time.perf_counter() - t0, 1)} | res
    out = a.out or os.path.join(a.model if os.path.isdir(a.model) else ".", "eval_gsm8k.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    metrics = {k: v for k, v in res.items() if k != "samples"}
    print(json.dumps(metrics), "->", out)
    if a.record:  # e.g. res/<run>_eval.json: {"before": {...}, "after": {...}}
        record = json.load(open(a.record)) if os.path.exists(a.record) else {}
        record[a.tag or a.model] = metrics
        with open(a.record + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(a.record + ".tmp", a.record)
