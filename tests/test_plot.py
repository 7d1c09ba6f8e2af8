"""exps/plot.py: a run's curves (CPU, seconds)."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "exps"))
import plot  # noqa: E402


def kl_axis(fig):
    return next(ax for ax in fig.axes if ax.get_title().startswith("KL"))


def test_an_empty_panel_says_why_and_a_run_is_drawn(tmp_path):
    """A run without a reference model has no KL to draw: its panel says so instead of staying blank (a blank panel
    read as a bug); a run that logs the KL draws it, with no such note. plot() writes the PNG (and its copy)."""
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "res", "qwen_coder_r1zero_e214b04.jsonl"))]
    no_kl = [{k: v for k, v in r.items() if k != "kl"} for r in rows]
    assert "not logged" in " ".join(t.get_text() for t in kl_axis(plot.figure(no_kl)).texts)
    assert not kl_axis(plot.figure(rows)).texts and kl_axis(plot.figure(rows)).lines
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_kl))
    out = plot.plot(str(tmp_path / "run"), res=str(tmp_path / "copy.png"))
    assert os.path.getsize(out) > 10_000 and os.path.exists(tmp_path / "copy.png")
