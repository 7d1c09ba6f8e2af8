"""exps/check_recipe.py: a run against its recipe's reference runs (CPU, seconds)."""
import json
import os
import re
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "exps"))
import check_recipe  # noqa: E402
import train  # noqa: E402

REF = os.path.join(ROOT, "res", "qwen_coder_r1zero_e214b04.jsonl")  # a fixed run: 150 steps, evals every 25


def degenerate(rows, from_step):
    """The rows with every completion cut at the cap and the format lost from from_step on (the failure to catch)."""
    out = []
    for r in rows:
        r = dict(r)
        if r["step"] >= from_step and "reward" in r:
            r |= {"truncated": 1.0, "format_rate": 0.0, "completion_len": 300.0}
        if r["step"] >= from_step and "val/n" in r:
            r |= {"val/format": 0.0, "val/cut": 1.0}
        out.append(r)
    return out


def test_the_reference_holds_against_itself_and_a_collapse_is_outside(tmp_path):
    rows = [json.loads(line) for line in open(REF)]
    same = check_recipe.compare(REF, REF, steps=100)
    assert same and all(r["within"] for r in same)
    assert {r["what"] for r in same} >= {"validation strict", "validation format", "completion length", "cut share"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in degenerate(rows, 41)))
    out = check_recipe.compare(str(bad), REF, steps=100)
    outside = {(r["what"], r["steps"]) for r in out if not r["within"]}
    assert ("cut share", "41-60") in outside and ("validation format", "50") in outside, outside
    assert all(int(steps.split("-")[0]) >= 41 for _, steps in outside), outside  # the steps before it still hold
    p = subprocess.run([sys.executable, os.path.join(ROOT, "exps", "check_recipe.py"), str(bad), REF, "--steps", "100"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and json.loads(p.stdout.splitlines()[-1])["verdict"] == "outside", p.stdout[-2000:]
    assert "one reference run: its band holds no run-to-run spread" in p.stdout  # the verdict's caveat, beside it


def test_repeats_of_the_recipe_widen_the_band_to_their_spread(tmp_path):
    """Two committed runs of the recipe before TIS, on the same training code and seed, part early (each drifts towards
    the cap once, at different steps): against the other alone, each is outside; against both, inside. A collapse is
    outside both, and past the shorter reference's last step the longer one is the band alone."""
    runs = [os.path.join(ROOT, "res", f"qwen_coder_r1zero_{c}.jsonl") for c in ("fe54c2b", "ea9cc3f")]
    assert not all(r["within"] for r in check_recipe.compare(runs[0], runs[1], steps=136))
    assert not all(r["within"] for r in check_recipe.compare(runs[1], runs[0], steps=136))
    for run in runs:
        both = check_recipe.compare(run, runs, steps=136)
        assert both and all(r["within"] for r in both), [r for r in both if not r["within"]]
        assert all(len(r["refs"]) == 2 for r in both)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in degenerate([json.loads(line) for line in open(runs[1])], 61)))
    outside = {(r["what"], r["steps"]) for r in check_recipe.compare(str(bad), runs, steps=136) if not r["within"]}
    assert ("cut share", "61-80") in outside and ("validation format", "75") in outside, outside
    long_run = check_recipe.compare(runs[0], runs, steps=300)  # windows past the shorter reference: the other alone
    assert {len(r["refs"]) for r in long_run if r["steps"] == "281-300"} == {1}


def test_the_verdict_says_when_one_reference_gives_no_spread(capsys):
    runs = [os.path.join(ROOT, "res", f"qwen_coder_r1zero_{c}.jsonl") for c in ("fe54c2b", "ea9cc3f")]
    for refs in (runs[1:], runs):
        check_recipe.main([runs[0], *refs, "--steps", "136"])
        out = capsys.readouterr().out
        assert json.loads(out.splitlines()[-1])["references"] == len(refs)
        assert ("one reference run" in out) == (len(refs) == 1), out[-600:]


def test_check_recipe_sh_names_a_missing_reference():
    p = subprocess.run(["bash", os.path.join(ROOT, "exps", "check_recipe.sh")], capture_output=True, text=True,
                       env=os.environ | {"NAME": "no_such_recipe"}, timeout=60)
    assert p.returncode == 2 and "no reference run at res/no_such_recipe.jsonl" in p.stdout, (p.stdout, p.stderr)


def test_proportions_band():
    """Two-proportion z-test: 40% vs 44% of 500 each is noise, 40% vs 50% is not; 0% vs 0% is equal."""
    assert not check_recipe.proportions_differ(0.40, 500, 0.44, 500)[0]
    assert check_recipe.proportions_differ(0.40, 500, 0.50, 500)[0]
    assert check_recipe.proportions_differ(0.0, 500, 0.0, 500) == (False, 0.0)


def test_reference_path_overrides_are_config_keys():
    """The overrides check_recipe.sh gives REFERENCE_PATH=1 are Config fields with the values they name."""
    script = open(os.path.join(ROOT, "exps", "check_recipe.sh")).read()
    flags = re.findall(r"--(\w+)=(false|true|\d+)", script)
    cfg = train.load_config([f"--{k}={v}" for k, v in flags])
    assert {k for k, _ in flags} >= {"share_prompts", "compile", "compile_engine", "fuse_engine", "log_kl_every"}
    assert not cfg.system.share_prompts and not cfg.system.fuse_engine and cfg.log_kl_every == 1
