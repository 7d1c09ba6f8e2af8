"""Plot a run's metrics.jsonl: reward, accuracy, completion length, KL, entropy (and eval) vs step.

    python plot.py runs/cpu_smollm2            # -> runs/cpu_smollm2/curves.png and res/cpu_smollm2.png
"""
import json
import os
import shutil
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt

PANELS = [("reward", "reward"), ("accuracy", "train accuracy"), ("format", "format reward"),
          ("completion_len", "completion length (tok)"), ("kl", "KL to reference"), ("entropy", "entropy (nats/tok)"),
          ("eval/pass@1_strict", "eval pass@1 (strict)"), ("step_s", "step time (s)")]


def plot(run_dir: str, res_dir: str = "res") -> str:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert rows, f"{run_dir}/metrics.jsonl is empty: nothing to plot"
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for ax, (key, title) in zip(axes.flat, PANELS):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=80)
    os.makedirs(res_dir, exist_ok=True)
    shutil.copy(out, os.path.join(res_dir, os.path.basename(os.path.normpath(run_dir)) + ".png"))
    return out


if __name__ == "__main__":
    for d in sys.argv[1:] or ["runs/default"]:
        print("wrote", plot(d))
