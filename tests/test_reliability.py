"""Faults a run must survive or refuse clearly (docs/reliability.md): bad settings and data fail before anything
loads, with the fix in the message; a trainer SIGKILLed mid-step or mid-checkpoint resumes exactly. The Serve app's
faults (frozen or killed replicas, bad HTTP requests, strangers on the sync port) are in test_serve.py."""
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from system import config
from conftest import GSM8K, ROOT
from test_train import cfg_for, digit_reward


@pytest.mark.parametrize("arg, says", [
    ("--temperature=0", "temperature=0.0 is outside (0.0, inf): sampling divides the logits by it"),
    ("--group_size=1", "group_size=1 is outside [2, inf): GRPO compares completions within a group"),
    ("--max_new_tokens=0", "max_new_tokens=0 is outside [1, inf)"),
    ("--keep_ckpts=0", "keep_ckpts=0 is outside [1, inf)"),
    ("--prompts_per_step=0", "prompts_per_step=0 is outside [1, inf)"),
    ("--micro_batch_size=0", "micro_batch_size=0 is outside [1, inf)"),
    ("--lr=-1", "lr=-1.0 is outside (0.0, inf)"),
    ("--top_p=1.5", "top_p=1.5 is outside (0.0, 1.0]"),
    ("--sync_port=70000", "sync_port=70000 is outside"),
    ("--loss_type=ppo", "loss_type='ppo': use one of grpo, dr_grpo, dapo"),
    ("--inference=remote", "inference='remote': use one of local, serve"),
    ("--prompt=r2", "prompt='r2': use one of r1, r1_example, r1_turn, cot"),
    ("--sync_ipc=nccl", "sync_ipc='nccl': use one of auto, always, never"),
    ("--format_weight=1", "format_weight=1.0 is outside [0.0, 1.0): a right answer must beat perfect form"),
    ("--format_weight=-0.1", "format_weight=-0.1 is outside [0.0, 1.0)"),
])
def test_bad_setting_is_one_clear_error(arg, says):
    """Each bad value found by trying the CLI (NaN training, kept checkpoints, IndexErrors after a step) is now a
    ValueError naming the field, its range and why, raised when the config is read (not an assert: python -O)."""
    with pytest.raises(ValueError, match=re.escape(says)):
        train.load_config([arg])


@pytest.mark.parametrize("field, value, says", [
    ("model", "/no/such/model", "no such folder here, and not a hub id"),
    ("model", "smolm2", "is not a folder here and the hub could not be reached|no such repository on the hub"),
    ("data", "../shared/data/gsm8kk", "no such folder here, and not a hub id"),
])
def test_wrong_model_or_data_fails_before_anything_loads(tiny_model, tmp_path, field, value, says):
    """A missing local path or a typo in a name is an error that says so, before the run folder or a model exists
    (regression: it was tried as a hub name, with a misleading error or a minute of retries)."""
    cfg = config.replace(cfg_for(tiny_model, tmp_path / "run"), **{field: value})
    with pytest.raises(ValueError, match=says):
        train.main(cfg, reward_fn=digit_reward)
    assert not (tmp_path / "run").exists()


def test_sync_port_in_use_fails_before_anything_loads(tiny_model, tmp_path):
    """--sync_port taken by another process: one clear error before the models load, not deep in the first push."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = cfg_for(tiny_model, tmp_path / "run", inference="serve", sync_port=s.getsockname()[1])
        with pytest.raises(ValueError, match=rf"sync_port={s.getsockname()[1]} is in use .* 0 for any free port"):
            train.main(cfg, reward_fn=digit_reward)


def write_jsonl(folder, lines):
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_bytes(b"".join(line.encode("latin-1" if "\xff" in line else "utf-8") + b"\n"
                                                  for line in lines))
    (folder / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    return str(folder)


GOOD = json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"})


@pytest.mark.parametrize("bad, says", [
    ('{"question": "q", "answer": "#### 1"', "train.jsonl:3: not valid JSON"),
    (json.dumps({"question": "q"}), "train.jsonl:3: 'answer' is missing or empty"),
    (json.dumps({"question": " ", "answer": "#### 1"}), "train.jsonl:3: 'question' is missing or empty"),
    (json.dumps({"question": "q", "answer": "no final number"}), "train.jsonl:3: the answer has no final number"),
    (json.dumps(["q", "#### 1"]), "train.jsonl:3: a row must be a JSON object"),
    ('{"question": "\xff", "answer": "#### 1"}', "train.jsonl:3: not UTF-8"),
])
def test_bad_data_row_is_named_by_file_and_line(tmp_path, bad, says):
    """A malformed row fails the load with its file and line (regression: a KeyError at the step that first
    sampled it, hours in; a JSONDecodeError with neither file nor line)."""
    import gsm8k
    data = write_jsonl(tmp_path / "data", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ValueError, match=says):
        gsm8k.load_split(data, "train")


def run_train(args, timeout=300):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_args(tiny_model, run_dir, **kw):
    base = dict(model=tiny_model, data=GSM8K, run_dir=run_dir, prompts_per_step=2, group_size=4, max_new_tokens=12,
                micro_batch_size=3, lr=1e-3, seed=0, max_steps=4, ckpt_every=1, val_size=20, eval_every=2, eval_size=2)
    return [f"--{k}={v}" for k, v in (base | kw).items()]


def kill_when(p, ready, timeout=300):
    """SIGKILL the whole process group of p the moment ready() holds; True if it did (False: p ended first)."""
    deadline = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline:
        if ready():
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.001)
    return False


def finish(p, timeout=300):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    """The same 4 steps, never killed: what every interrupted run must end equal to."""
    run = tmp_path_factory.mktemp("whole")
    finish(run_train(train_args(tiny_model, run)))
    return run


def assert_same_run(a, b):
    wa = load_file(os.path.join(a, "ckpt", "latest", "model", "model.safetensors"))
    wb = load_file(os.path.join(b, "ckpt", "latest", "model", "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)
    rows = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    steps = [r["step"] for r in rows if "reward" in r]
    evals = [r["step"] for r in rows if "val/n" in r]
    assert steps == [1, 2, 3, 4] and evals == [0, 2, 4], (steps, evals)  # each once: no duplicated rows
    assert [r["version"] for r in rows if "reward" in r] == [1, 2, 3, 4], "weight versions run on across the resume"
    want = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    assert [r["reward"] for r in rows if "reward" in r] == [r["reward"] for r in want if "reward" in r], \
        "same prompts, same samples: the data order and the RNG continue exactly"


@pytest.mark.slow
def test_trainer_killed_between_log_and_checkpoint_resumes_exactly(tiny_model, tmp_path, uninterrupted):
    """SIGKILL right after step 3's metrics row is written, before its checkpoint: --resume redoes step 3 from
    step 2's checkpoint, drops the orphan row (regression: a duplicated step in the curves) and ends equal."""
    run = tmp_path / "killed"
    metrics = run / "metrics.jsonl"
    p = run_train(train_args(tiny_model, run))

    def step3_logged():
        return metrics.exists() and '"step": 3, "lr"' in metrics.read_text()
    assert kill_when(p, step3_logged), "the run ended before step 3 was logged"
    assert os.readlink(run / "ckpt" / "latest") in ("step_000002", "step_000003")
    finish(run_train(train_args(tiny_model, run) + ["--resume"]))
    assert_same_run(uninterrupted, run)


@pytest.mark.slow
def test_trainer_killed_mid_checkpoint_never_loads_half_of_it(tiny_model, tmp_path, uninterrupted):
    """SIGKILL while step 3's checkpoint is being written (its .tmp folder exists): ckpt/latest still points at a
    complete checkpoint, --resume continues from it, and the run ends equal to the uninterrupted one."""
    run = tmp_path / "killed"
    ckpt = run / "ckpt"
    p = run_train(train_args(tiny_model, run))

    def writing_step3():
        return (ckpt / ".tmp_step_000003").exists()
    assert kill_when(p, writing_step3), "the run ended before step 3's checkpoint was written"
    latest = os.readlink(ckpt / "latest")
    assert latest in ("step_000002", "step_000003") and (ckpt / latest / "state.pt").exists()
    finish(run_train(train_args(tiny_model, run) + ["--resume"]))
    assert_same_run(uninterrupted, run)


def test_resume_with_more_steps_keeps_the_schedule(tiny_model, tmp_path):
    """Resuming with a larger max_steps extends the run at the schedule's end value; the schedule itself (warmup,
    cosine to max_steps) stays the one the run started with (regression: step 7 took the old schedule's last value,
    step 8 the new one's)."""
    cfg = cfg_for(tiny_model, tmp_path / "run", max_steps=4, lr=1e-3, min_lr_ratio=0.1, warmup_steps=1)
    train.main(cfg, reward_fn=digit_reward)
    train.main(config.replace(cfg, max_steps=6, resume=True), reward_fn=digit_reward)
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    want = [1e-3 * train.lr_at(s, cfg) for s in range(4)] + [1e-3 * 0.1] * 2
    assert lrs == pytest.approx(want), (lrs, want)


@pytest.mark.slow
def test_batch_not_divisible_by_ranks_is_one_clear_error(tiny_model, tmp_path):
    """prompts_per_step=3 on 2 ranks: every rank stops with one message saying how to fix it, before models load."""
    from conftest import run_group
    from test_train import LAUNCH
    p = run_group(LAUNCH + ["--multi_gpu", os.path.join(ROOT, "train.py")] +
                  train_args(tiny_model, tmp_path / "run", prompts_per_step=3), 300, cwd=ROOT)
    assert p.returncode != 0
    assert "prompts_per_step=3 is not divisible by the 2 ranks: make it a multiple of 2" in p.stdout + p.stderr


@pytest.mark.parametrize("argv, says", [
    (["--group_size=1"], r"config group_size=1 is outside \[2, inf\): GRPO compares completions within a group"),
    (["exps/cpu_smollm2/config.yaml", "--lr=abc"], r"config lr='abc' is str, expected float"),
    (["--max_steps=-5"], r"config max_steps=-5 is outside \[1, inf\)"),
    (["--lrr=1"], r"unknown config key 'lrr': did you mean 'lr'\? \(--help lists every key\)"),
    (["--modle=x"], r"unknown config key 'modle': did you mean 'model'\?"),
    (["nope.yaml"], r"config file 'nope.yaml': \[Errno 2\]"),
    (["--model=/no/such/model"], r"model '/no/such/model': no such folder here"),
    (["exps/qwen_coder_r1zero/config.yaml", "--max_new_tokens=64"],
     r"overlong_buffer=100 is longer than max_new_tokens=64: .*; set --overlong_buffer to at most 64 "
     r"\(e\.g\. a third of the cap, 21; 0 turns it off\)"),
])
def test_bad_setting_on_the_command_line_is_one_line_and_exit_2(argv, says, capsys, monkeypatch, tmp_path):
    """train.py's command line (config.cli, then run.main_cli): a bad value, key, config file or model name is one
    line on stderr that names it, and exit status 2, before anything loads (regression: a 10-16 line traceback)."""
    from system import run
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit:
        run.main_cli(train.main, config.cli(train.Config, argv + [f"--run_dir={tmp_path}/run"], "usage"))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1 and re.match(f"error: {says}", err), err
    assert not (tmp_path / "run").exists()


def test_help_lists_every_setting_and_scripts_answer_help(capsys, monkeypatch):
    """python train.py --help (and -h after a config file) lists every Config field, then the systems tier's under
    their own heading, each with its type, default and the comment that explains it, exit 0 (regression: a
    traceback, 'unknown config key help'); a bad value from the real process exits 2 before torch is imported (it
    took seconds); gsm8k.py and every bench answer --help (run here, as scripts: their imports are loaded already)."""
    import runpy
    from system.config import SystemConfig
    runs = {"help": ["train.py", "--help"], "h": ["train.py", "exps/cpu_smollm2/config.yaml", "-h"],
            "bad": ["-X", "importtime", "train.py", "--group_size=1"]}
    procs = {k: subprocess.Popen([sys.executable] + v, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, v in runs.items()}
    for script in ["gsm8k.py"] + [f"bench/{b}.py" for b in ("rollout", "trainer", "weight_sync", "logprob_gap", "multi_gpu")]:
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        monkeypatch.setattr(os, "environ", os.environ.copy())  # what a bench sets at import stays with it
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        assert e.value.code in (0, None) and capsys.readouterr().out.startswith("usage:"), script
    out = {k: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for k, p in procs.items()}
    rc, text, _ = out["help"]
    assert rc == 0 and out["h"][:2] == out["help"][:2], out["h"]
    fields = [f for f in dataclasses.fields(train.Config) if f.name != "system"] + list(dataclasses.fields(SystemConfig))
    for f in fields:
        line = next((x for x in text.splitlines() if x.startswith(f"  --{f.name}=")), None)
        assert line and f" {f.type.__name__} " in line and len(line.split(f.type.__name__, 1)[1].strip()) > 10, \
            (f.name, line)
    assert text.index("\n  --lr=") < text.index("=== systems") < text.index("\n  --compile="), text
    rc, _, err = out["bad"]
    imported = {line.split("|")[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: config group_size=1"), err[-2000:]
    assert "gsm8k" in imported and "torch" not in imported, sorted(imported)


def test_a_timed_out_launch_takes_its_ranks_with_it():
    """conftest.run_group kills what a timed-out command started in sessions of its own (torchrun's ranks), so its
    output pipes close and the test fails with the timeout instead of hanging (regression: a 2-rank run that hung at
    exit left its rank alive after the launcher was killed, and the suite waited on the rank's pipe)."""
    import psutil
    from conftest import run_group
    rank = "import subprocess, sys, time; print(subprocess.Popen([sys.executable, '-c', 'import time; " \
           "time.sleep(3600)'], start_new_session=True).pid, flush=True); time.sleep(3600)"
    with pytest.raises(TimeoutError, match="ran past 3 s") as e:
        run_group([sys.executable, "-c", rank], 3)
    pid = int(re.search(r"\n(\d+)\n", str(e.value)).group(1))
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_timed_out_launch_that_keeps_starting_processes_leaves_none():
    """run_group's kill does not race a command that starts processes in sessions of their own as it is killed
    (regression, a suite flake: a rank started just after the kill listed the tree outlived it, running; with the
    output pipes held open, run_group could hang on them). The command here starts one every few milliseconds."""
    import psutil
    import threading
    from conftest import run_group
    marker = f"time.sleep(3600)  # {os.getpid()}-spawned"
    spawner = ("import subprocess, sys, time\nwhile True:\n    print(subprocess.Popen([sys.executable, '-c', "
               f"{('import time; ' + marker)!r}], start_new_session=True).pid, flush=True)\n")
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", pytest.raises(TimeoutError, run_group,
                                                                             [sys.executable, "-c", spawner], 3)))
    t.start()
    t.join(120)
    left = []
    for q in psutil.process_iter(["cmdline", "status"]):
        if marker in " ".join(q.info["cmdline"] or []) and q.info["status"] != psutil.STATUS_ZOMBIE:
            left.append(q.pid)
            q.kill()
    assert not t.is_alive(), f"run_group hung: {len(left)} started processes outlived the kill, holding its pipes"
    assert not left and re.search(r"^\d+$", str(box["out"].value), re.M), left  # it did start some


@pytest.mark.parametrize("world, out", [("2", "done"), ("1", "done, finalized")])
def test_a_gloo_rank_exits_done_without_finalizing(world, out):
    """run.exit_gloo_rank ends a rank of a multi-process CPU job with status 0, its output flushed, and no
    interpreter finalization (regression, a CI flake: gloo's worker threads, late on a loaded machine, took the GIL
    as the interpreter finalized and aborted a rank whose run had succeeded); one process finalizes as ever."""
    script = ("import atexit; from system.run import exit_gloo_rank; atexit.register(print, ', finalized'); "
              "print('done', end=''); exit_gloo_rank()")
    env = os.environ | {"WORLD_SIZE": world, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == out, p
