"""Do two versions of the code train the same? The recipe's first steps at two commits, on this CPU in fp32, compared
number by number.

    python exps/same_steps.py 6cf6f11 HEAD                   # 20 steps, torch.compile off
    python exps/same_steps.py 6cf6f11 HEAD --steps 8 --compile
    python exps/same_steps.py HEAD .                         # a folder of code: "." is the working tree as it is

A change meant to keep the math (a speed change: packing, chunking, compiling, copying) should give the same
rewards, losses, grad norms and KLs, step after step. On a CPU in fp32 each run is deterministic, so "the same" can
be exact: any difference is a change in what is computed, and the first step that shows it is where to look. A GPU
run in bf16 cannot say this (kernels round by their shapes and are not bitwise deterministic, so two runs part after
a few dozen steps); this can, for the code paths a CPU runs (not the CUDA kernels, bf16 autocast or the engine's CUDA
graphs).
Both versions run the recipe's config (--config) with the same small overrides: a tiny random model built here (its
completions stop at random lengths, so the overlong penalty gives groups unequal rewards and every step updates),
2 prompts x 4 completions, 96 new tokens, micro-batches of 3, the KL logged every step. --set key=value adds more.
Each version reads its own commit's config file: where the recipe's config changed between them, --set the older
values for both to compare the code alone.
Prints the differing keys per step, then one JSON line; exit status 0 when every compared value is equal (or within
--rtol), 1 otherwise.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import check_recipe  # exps/: a metrics.jsonl's training rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["reward", "loss", "grad_norm", "kl", "entropy", "completion_len", "truncated", "clip_frac"]
SMALL = ["--prompts_per_step=2", "--group_size=4", "--max_new_tokens=96", "--overlong_buffer=64",
         "--micro_batch_size=3", "--logprob_chunk=64", "--log_kl=true", "--log_kl_every=1", "--lr=1e-3",
         "--warmup_steps=0", "--engine_rows=8", "--eval_every=0", "--ckpt_every=0", "--inference=local", "--seed=0"]


def checkout(rev: str, into: str) -> str:
    """The code at `rev` as a folder: rev itself if it is one (".": the working tree as it is), else git's archive of
    that commit."""
    if os.path.isdir(rev):
        return os.path.abspath(rev)
    os.makedirs(into)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"git archive {rev}: {archive.stderr.decode().strip()} (name a commit of this repository)")
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def train(code: str, run_dir: str, model: str, args) -> list[dict]:
    """train.py of `code` on the recipe with the small overrides -> its training rows."""
    cmd = [sys.executable, "train.py", args.config, f"--model={model}", f"--data={args.data}", f"--run_dir={run_dir}",
           f"--max_steps={args.steps}", f"--compile={args.compile}", f"--compile_engine={args.compile}", *SMALL,
           *[f"--{kv}" for kv in args.set]]
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": os.path.join(run_dir, "compile_cache"), "CUDA_VISIBLE_DEVICES": ""}
    try:
        out = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"train.py at {code} ran past --timeout {args.timeout:.0f} s: fewer --steps, or a longer one")
    if out.returncode:
        raise SystemExit(f"train.py at {code} failed:\n{out.stderr[-2000:]}")
    return check_recipe.load(os.path.join(run_dir, "metrics.jsonl"), args.steps)[1]


def compare(a: list[dict], b: list[dict], rtol: float = 0.0) -> list[dict]:
    """Step by step, the KEYS whose values differ by more than rtol (relative): [{"step", key: [a, b], ...}]."""
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return [{"step": None, "steps": [[r["step"] for r in a], [r["step"] for r in b]]}]
    out = []
    for x, y in zip(a, b):
        diff = {k: [x.get(k), y.get(k)] for k in KEYS if (k in x or k in y) and not close(x.get(k), y.get(k), rtol)}
        if diff:
            out.append({"step": x["step"]} | diff)
    return out


def close(x, y, rtol: float) -> bool:
    """Equal, or within rtol of the larger; a value one side lacks equals only a value the other lacks too."""
    if x is None or y is None:
        return x is y
    return x == y or abs(x - y) <= rtol * max(abs(x), abs(y))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="a commit, or a folder of code (.: the working tree)")
    ap.add_argument("b", help="a commit, or a folder of code")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="torch.compile the policy and engine, as the recipe does")
    ap.add_argument("--config", default="exps/qwen_coder_r1zero/config.yaml", help="the recipe, relative to the code")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "gsm8k"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides, for both")
    ap.add_argument("--rtol", type=float, default=0.0, help="relative difference still counted as equal")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import make_tiny_model  # the tests' model: a 512-token vocabulary, so an eos comes by chance
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(os.path.join(tmp, "model"), hidden=128, layers=4, heads=4, kv_heads=2)
        runs = [train(checkout(rev, os.path.join(tmp, f"code{i}")), os.path.join(tmp, f"run{i}"), model, args)
                for i, rev in enumerate([args.a, args.b])]
    diffs = compare(*runs, rtol=args.rtol)
    for d in diffs:
        print(json.dumps(d))
    updated = sum(r.get("grad_norm", 0) > 0 for r in runs[0])
    print(json.dumps({"a": args.a, "b": args.b, "steps": len(runs[0]), "steps_that_updated": updated,
                      "compile": args.compile, "same": not diffs, "steps_differing": len(diffs),
                      "first_differing": diffs[0]["step"] if diffs else None}))
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
