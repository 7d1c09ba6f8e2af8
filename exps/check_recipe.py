"""Does a run still follow the reference run of its recipe? Compares two metrics.jsonl files over their first steps.

    python exps/check_recipe.py runs/check_recipe/metrics.jsonl res/qwen_coder_r1zero.jsonl --steps 100
    bash exps/check_recipe.sh                      # runs the recipe for 100 steps on this GPU, then this comparison

Compared, over the steps both runs have (up to --steps):
- validation (greedy, the same held-out problems): strict, format and the share cut at the cap at every eval step.
  Within the band when the two proportions differ by less than their 95% interval (two-proportion z-test).
- training, in windows of --window steps: completion length, the share cut at the cap, the format rate, and the KL
  to the initial model where both log it. Within the band when the window means differ by less than --z standard
  errors of that difference (each window's step-to-step spread), capped at --max-rel of the reference mean, and
  never narrower than a small floor per metric (a cut share of 0.01 against 0.002 is in noise; 1.0 against 0.02 is
  not). One reference run gives no seed-to-seed spread: the band is a judgement, not an interval.
Prints one line per comparison, then a verdict; the last line is one JSON object (the verdict and the counts) for
docs/perf.md. Exit status 0 when every comparison is within its band, 1 otherwise.
"""
import argparse
import json
import math
import sys

VAL = [("val/pass@1_strict", "validation strict"), ("val/format", "validation format"), ("val/cut", "validation cut")]
# (key, name, the narrowest band: a difference this small is never a failure)
TRAIN = [("completion_len", "completion length", 5.0), ("truncated", "cut share", 0.02),
         ("format_rate", "format", 0.02), ("kl", "KL to the initial model", 0.01)]


def load(path: str, steps: int) -> tuple[dict, list]:
    """metrics.jsonl -> ({eval step: validation row}, [training rows in step order]), both up to `steps`."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    val = {r["step"]: r for r in rows if "val/n" in r and r["step"] <= steps}
    train = sorted((r for r in rows if "reward" in r and r["step"] <= steps), key=lambda r: r["step"])
    return val, train


def proportions_differ(p1: float, n1: int, p2: float, n2: int, z: float = 1.96) -> tuple[bool, float]:
    """Two-proportion z-test at z: (differ, the band's half-width). The pooled p keeps 0% vs 0% at a band of 0."""
    p = (p1 * n1 + p2 * n2) / (n1 + n2)
    half = z * math.sqrt(max(p * (1 - p), 0.0) * (1 / n1 + 1 / n2))
    return abs(p1 - p2) > half + 1e-12, half


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))


def compare(run: str, ref: str, steps: int, window: int = 20, z: float = 3.0, max_rel: float = 0.25) -> list[dict]:
    """Every comparison: {"what", "steps", "run", "ref", "band", "within"}."""
    (run_val, run_train), (ref_val, ref_train) = load(run, steps), load(ref, steps)
    out = []
    for step in sorted(run_val.keys() & ref_val.keys()):
        a, b = run_val[step], ref_val[step]
        for key, name in VAL:
            if key in a and key in b:
                differ, half = proportions_differ(a[key], a["val/n"], b[key], b["val/n"])
                out.append({"what": name, "steps": str(step), "run": a[key], "ref": b[key], "band": half,
                            "within": not differ})
    last = min(run_train[-1]["step"] if run_train else 0, ref_train[-1]["step"] if ref_train else 0)
    for lo in range(1, last + 1, window):
        hi = min(lo + window - 1, last)
        for key, name, floor in TRAIN:
            xs = [r[key] for r in run_train if lo <= r["step"] <= hi and key in r]
            ys = [r[key] for r in ref_train if lo <= r["step"] <= hi and key in r]
            if len(xs) < 2 or len(ys) < 2:
                continue
            (mx, sx), (my, sy) = mean_sd(xs), mean_sd(ys)
            band = max(min(z * math.sqrt(sx ** 2 / len(xs) + sy ** 2 / len(ys)), max_rel * abs(my)), floor)
            out.append({"what": name, "steps": f"{lo}-{hi}", "run": mx, "ref": my, "band": band,
                        "within": abs(mx - my) <= band})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the run's metrics.jsonl")
    ap.add_argument("ref", help="the reference run's metrics.jsonl (res/<recipe>.jsonl)")
    ap.add_argument("--steps", type=int, default=100, help="compare the first this many steps")
    ap.add_argument("--window", type=int, default=20, help="training steps per window")
    ap.add_argument("--z", type=float, default=3.0, help="training windows: band in standard errors of the difference")
    ap.add_argument("--max-rel", type=float, default=0.25, help="training windows: widest band, share of the reference")
    a = ap.parse_args(argv)
    rows = compare(a.run, a.ref, a.steps, a.window, a.z, a.max_rel)
    if not rows:
        print(f"nothing to compare: {a.run} and {a.ref} share no eval step or training window up to step {a.steps}")
        return 1
    print(f"{'':8} {'':24} {'steps':>8} {'this run':>9} {'reference':>9} {'band':>8}")
    for r in rows:
        print(f"{'within' if r['within'] else 'OUTSIDE':8} {r['what']:24} {r['steps']:>8} {r['run']:9.3f} "
              f"{r['ref']:9.3f} {r['band']:8.3f}")
    outside = [r for r in rows if not r["within"]]
    verdict = "holds" if not outside else "outside"
    print(f"recipe check: {len(rows) - len(outside)} of {len(rows)} within the reference's band" +
          ("" if not outside else f"; OUTSIDE: {', '.join(sorted({r['what'] for r in outside}))}"))
    print(json.dumps({"check": "recipe", "verdict": verdict, "compared": len(rows), "outside": len(outside),
                      "steps": a.steps, "run": a.run, "ref": a.ref}))
    return 0 if not outside else 1


if __name__ == "__main__":
    sys.exit(main())
