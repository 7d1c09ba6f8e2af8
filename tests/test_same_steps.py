"""exps/same_steps.py: two versions of the code, the recipe's first steps on the CPU, compared number by number."""
import json
import os
import shutil
import sys

from conftest import GSM8K, ROOT

sys.path.insert(0, os.path.join(ROOT, "exps"))
import same_steps  # noqa: E402


def test_compare_names_the_step_and_the_numbers_that_differ():
    a = [{"step": s, "reward": 0.5, "loss": 0.1 * s, "kl": 0.01} for s in (1, 2, 3)]
    b = [dict(r) for r in a]
    assert same_steps.compare(a, b) == []
    b[1]["loss"] += 1e-9
    assert same_steps.compare(a, b) == [{"step": 2, "loss": [a[1]["loss"], b[1]["loss"]]}]
    assert same_steps.compare(a, b, rtol=1e-6) == []
    del b[2]["kl"]
    assert same_steps.compare(a, b, rtol=1e-6) == [{"step": 3, "kl": [0.01, None]}]
    assert same_steps.compare(a, b[:2])[0]["step"] is None  # a run that stopped early: the step lists differ


def test_the_same_code_trains_the_same_and_a_changed_line_shows(tmp_path, capsys):
    """The working tree against itself: the same numbers at every step, and the steps updated the model. Then a copy
    whose logged KL is doubled: that key differs from the first step that logs a KL above 0, and nothing else does."""
    args = ["--steps", "3", "--data", GSM8K]
    assert same_steps.main([ROOT, ROOT, *args]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["same"] and line["steps"] == 3 and line["steps_that_updated"] >= 1, line
    changed = tmp_path / "code"
    shutil.copytree(ROOT, changed, ignore=shutil.ignore_patterns(".git", ".carry", ".gpubundle", ".whl", "runs", "res",
                                                                  "__pycache__", "models"))
    src = (changed / "train.py").read_text()
    kl = 'stats["kl"] = ((torch.exp(d) - d - 1) * mask).sum() / n'
    assert kl in src
    (changed / "train.py").write_text(src.replace(kl, kl + " * 2"))
    assert same_steps.main([ROOT, str(changed), *args]) == 1
    out = capsys.readouterr().out.splitlines()
    line = json.loads(out[-1])
    assert not line["same"] and line["first_differing"] >= 2, line
    assert all(set(json.loads(d)) == {"step", "kl"} for d in out[:-1]), out
