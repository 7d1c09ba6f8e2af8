"""Does a run still follow the reference runs of its recipe? Compares metrics.jsonl files over their first steps.

    python exps/check_recipe.py runs/check_recipe/metrics.jsonl res/qwen_coder_r1zero.jsonl --steps 100
    python exps/check_recipe.py RUN/metrics.jsonl REF1.jsonl REF2.jsonl   # the band: their envelope
    bash exps/check_recipe.sh                      # runs the recipe for 100 steps on this GPU, then this comparison

Compared, over the steps the run and a reference have (up to --steps):
- validation (greedy, the same held-out problems): strict, format and the share cut at the cap at every eval step.
  Within the band when the two proportions differ by less than their 95% interval (two-proportion z-test).
- training, in windows of --window steps: completion length, the share cut at the cap, the format rate, and the KL
  to the initial model where both log it. Within the band when the window means differ by less than --z standard
  errors of that difference (each window's step-to-step spread), capped at --max-rel of the reference mean, and
  never narrower than a small floor per metric (a cut share of 0.01 against 0.002 is in noise; 1.0 against 0.02 is
  not).
Several reference runs (repeats of the recipe on the same training code) widen the band to their spread: a comparison
is within when the run lies inside the envelope of the references' bands, from the lowest reference minus its band to
the highest plus its own. Repeats drift at different times (GPU kernels are not bitwise deterministic, so runs from one
seed part after a few dozen steps), and one reference run alone gives no such spread: then the band is a judgement,
not an interval.
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


def envelope(what: str, steps: str, run: float, refs: list[tuple[float, float]]) -> dict:
    """One comparison against the references' (value, band) pairs: within when lo <= run <= hi."""
    lo, hi = min(v - b for v, b in refs), max(v + b for v, b in refs)
    return {"what": what, "steps": steps, "run": run, "refs": [v for v, _ in refs], "lo": lo, "hi": hi,
            "within": lo - 1e-12 <= run <= hi + 1e-12}


def compare(run: str, refs: str | list[str], steps: int, window: int = 20, z: float = 3.0,
            max_rel: float = 0.25) -> list[dict]:
    """Every comparison: {"what", "steps", "run", "refs" (each reference's value), "lo", "hi", "within"}. A
    comparison is made over the references that have its eval step or training window."""
    refs = [refs] if isinstance(refs, str) else refs
    run_val, run_train = load(run, steps)
    loaded = [load(r, steps) for r in refs]
    out = []
    for step in sorted(run_val):
        a = run_val[step]
        for key, name in VAL:
            bs = [v[step] for v, _ in loaded if key in v.get(step, {})]
            if key in a and bs:
                out.append(envelope(name, str(step), a[key], [
                    (b[key], proportions_differ(a[key], a["val/n"], b[key], b["val/n"])[1]) for b in bs]))
    last = run_train[-1]["step"] if run_train else 0
    for lo in range(1, last + 1, window):
        hi = min(lo + window - 1, last)
        for key, name, floor in TRAIN:
            xs = [r[key] for r in run_train if lo <= r["step"] <= hi and key in r]
            if len(xs) < 2:
                continue
            mx, sx = mean_sd(xs)
            bands = []
            for _, ref_train in loaded:
                ys = [r[key] for r in ref_train if lo <= r["step"] <= hi and key in r]
                if len(ys) >= 2 and ref_train[-1]["step"] >= hi:  # a reference's window counts only when complete
                    my, sy = mean_sd(ys)
                    bands.append((my, max(min(z * math.sqrt(sx ** 2 / len(xs) + sy ** 2 / len(ys)),
                                              max_rel * abs(my)), floor)))
            if bands:
                out.append(envelope(name, f"{lo}-{hi}", mx, bands))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the run's metrics.jsonl")
    ap.add_argument("refs", nargs="+", help="the reference runs' metrics.jsonl (res/<recipe>.jsonl, its repeats)")
    ap.add_argument("--steps", type=int, default=100, help="compare the first this many steps")
    ap.add_argument("--window", type=int, default=20, help="training steps per window")
    ap.add_argument("--z", type=float, default=3.0, help="training windows: band in standard errors of the difference")
    ap.add_argument("--max-rel", type=float, default=0.25, help="training windows: widest band, share of the reference")
    a = ap.parse_args(argv)
    rows = compare(a.run, a.refs, a.steps, a.window, a.z, a.max_rel)
    if not rows:
        print(f"nothing to compare: {a.run} and {', '.join(a.refs)} share no eval step or training window up to "
              f"step {a.steps}")
        return 1
    print(f"{'':8} {'':24} {'steps':>8} {'this run':>9}  {'references':<20} {'band':>15}")
    for r in rows:
        refs = " ".join(f"{v:.3f}" for v in r["refs"])
        print(f"{'within' if r['within'] else 'OUTSIDE':8} {r['what']:24} {r['steps']:>8} {r['run']:9.3f}  "
              f"{refs:<20} [{r['lo']:6.3f}, {r['hi']:6.3f}]")
    outside = [r for r in rows if not r["within"]]
    verdict = "holds" if not outside else "outside"
    print(f"recipe check: {len(rows) - len(outside)} of {len(rows)} within the references' band" +
          ("" if not outside else f"; OUTSIDE: {', '.join(sorted({r['what'] for r in outside}))}"))
    if len(a.refs) == 1:  # said where the verdict is read: a miss may be a low or high reference, not the run
        print("one reference run: its band holds no run-to-run spread, so it is a judgement, not an interval; repeats "
              "of the recipe on the reference's training code (res/<recipe>_repeat*.jsonl) widen it to their spread")
    print(json.dumps({"check": "recipe", "verdict": verdict, "compared": len(rows), "outside": len(outside),
                      "steps": a.steps, "run": a.run, "refs": a.refs, "references": len(a.refs)}))
    return 0 if not outside else 1


if __name__ == "__main__":
    sys.exit(main())
