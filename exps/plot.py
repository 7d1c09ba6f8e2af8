"""Plot a run's metrics.jsonl: reward, format rate, accuracy, validation accuracy, length, KL, entropy, clip
fraction and the step time split, against the step.

    python exps/plot.py runs/cpu_smollm2                                   # -> runs/cpu_smollm2/curves.png
    python exps/plot.py runs/smollm2_r1zero --res res/smollm2_r1zero.png   # and a copy under res/ (tracked results)

Per-step training metrics are drawn faint, with a moving average over `--smooth` steps on top; validation
rows (written by train.py's in-loop eval, `val/...` keys) are drawn as points.
"""
import argparse
import json
import os
import shutil

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt

PANELS = [  # (title, [(metrics key, label)])
    ("reward (format_weight x format + accuracy)", [("reward", "train")]),
    ("format rate", [("format_rate", "train samples"), ("val/format", "validation, greedy")]),
    ("accuracy", [("accuracy", "train samples"), ("val/pass@1_strict", "validation strict"),
                  ("val/pass@1_lenient", "validation lenient")]),
    ("completion length (tokens)", [("completion_len", "mean"), ("truncated", "share cut at max_new_tokens x 100"),
                                    ("val/cut", "validation: share cut x 100"),
                                    ("repeated", "share of words repeated x 100")]),
    ("KL to the initial model (k3, per token)", [("kl", "train")]),
    ("entropy (nats / token)", [("entropy", "train")]),
    ("clip fraction", [("clip_frac", "train"), ("clip_low", "ratio below 1 - eps_low (the sampler overrated)")]),
    ("step time (s)", [("gen_s", "generate"), ("train_s", "train"), ("sync_s", "sync"), ("reward_s", "reward")]),
]
SCALE = {"truncated": 100, "val/cut": 100, "repeated": 100}  # drawn on the same axis as the length
# why a panel can be empty, said in it (a blank panel reads as a bug)
EMPTY = {"kl": "not logged: this run has no reference model\n(kl_coef 0 and log_kl off)"}


def smooth(ys, k):
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def figure(rows: list[dict], k: int = 10):
    """metrics.jsonl rows -> the figure of PANELS (a panel with nothing to draw says why)."""
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    for ax, (title, series) in zip(axes.flat, PANELS):
        if not any(r.get(key) is not None for key, _ in series for r in rows):
            reason = next((EMPTY[key] for key, _ in series if key in EMPTY), "not in this run's metrics")
            ax.text(0.5, 0.5, reason, ha="center", va="center", transform=ax.transAxes, color="gray")
        for (key, label), color in zip(series, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            pts = [(r["step"], r[key] * SCALE.get(key, 1)) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if key.startswith("val/"):
                ax.plot(xs, ys, "o-", color=color, label=label, ms=4)
            elif len(pts) > 2 * k:
                ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
                ax.plot(xs, smooth(list(ys), k), color=color, label=f"{label} ({k}-step mean)")
            else:
                ax.plot(xs, ys, ".-", color=color, label=label)
        if title.startswith("step time"):
            ax.set_yscale("log")  # a compiled run's first step is many times the others
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def plot(run_dir: str, res: str = "", k: int = 10) -> str:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl is empty: nothing to plot")
    fig = figure(rows, k)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=80)
    if res:
        os.makedirs(os.path.dirname(res) or ".", exist_ok=True)
        shutil.copy(out, res)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Plot a run's metrics.jsonl")
    ap.add_argument("run_dir")
    ap.add_argument("--res", default="", help="also copy the PNG here (e.g. res/<run>.png)")
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window, steps")
    a = ap.parse_args()
    print("wrote", plot(a.run_dir, a.res, a.smooth))
