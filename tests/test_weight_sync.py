"""The weight sync's wire format without Ray: a trainer's WeightSync and one Receiver in a thread, over gloo."""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from system.models import DTYPES
from conftest import ROOT
import weight_sync
from weight_sync import Receiver, WeightSync, make_plan, open_group, open_shared


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
@pytest.mark.parametrize("bucket_mb", [0.0001, 0.003, 1.0])
def test_every_bucket_layout_arrives_intact(wire, bucket_mb):
    """A big tensor (a bucket of its own, sent as it is when already in the wire's dtype), small ones packed into the
    two reused buffers, a tied alias; two pushes (the second reuses the buffers); the receiver posts bucket k + 1
    before handing out k. Regression: a single-tensor first bucket made the next bucket index a buffer not yet made
    (an IndexError that the push's one retry hid on gloo, and that hung NCCL pushes)."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(64, 40, generator=g)  # 2560 floats: alone in a bucket of 0.003 MB (786 floats)
    named = [("emb", big), ("a", torch.randn(7, generator=g)), ("b", torch.randn(3, 5, generator=g)),
             ("c", torch.randn(300, generator=g)), ("d", torch.randn(2, 2, generator=g)), ("head", big)]
    ws = WeightSync(handle=None, bucket_mb=bucket_mb, timeout_s=30)
    buckets, aliases, tensors = make_plan(named, wire, bucket_mb)
    plan, rx, got = {"buckets": buckets, "aliases": aliases, "dtype": wire}, Receiver("cpu"), []

    def receive():
        rx.join("127.0.0.1", ws.port, 2, "k", "gloo", 30)
        for _ in range(2):
            got.append({n: t.clone() for n, t in rx.receive(plan, 30)})
    th = threading.Thread(target=receive)
    th.start()
    _, ws.group, _ = open_group("127.0.0.1", ws.port, 0, 2, "k", "gloo", 30)
    for _ in range(2):
        ws._send(buckets, tensors, DTYPES[wire])
    th.join(30)
    assert len(got) == 2 and aliases == {"head": "emb"}
    for push in got:
        assert {n: t.tolist() for n, t in push.items()} == {n: t.to(DTYPES[wire]).tolist() for n, t in named}
    rx.leave()


READ_SHARED = """
import json, sys
from weight_sync import read_shared
plan = json.loads(sys.argv[1])
print(json.dumps({n: t.float().tolist() for n, t in read_shared(plan, "cpu")}))
"""


def test_shared_buffer_is_read_in_place_by_another_process():
    """The IPC path on a CPU: the trainer packs every bucket into one /dev/shm buffer, another process maps it and
    reads the tensors (aliases included); the next push rewrites the same buffer; close() removes it, and a reader
    is told so clearly."""
    g = torch.Generator().manual_seed(0)
    named = [("emb", torch.randn(8, 4, generator=g)), ("a", torch.randn(5, generator=g)), ("head", None)]
    named[2] = ("head", named[0][1])
    ws = WeightSync(handle=None, bucket_mb=64 / 2**20, timeout_s=30, ipc="always")
    buckets, aliases, tensors = make_plan(named, "bfloat16", 64 / 2**20)
    ws._pack_shared(buckets, tensors, torch.bfloat16)
    plan = {"buckets": buckets, "aliases": aliases, "ipc": ws.shared.handle}
    out = subprocess.run([sys.executable, "-c", READ_SHARED, json.dumps(plan)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=os.environ | {"PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(buckets) > 1 and json.loads(out.stdout) == {n: t.to(torch.bfloat16).float().tolist() for n, t in named}
    buf = ws.shared.buf
    ws._pack_shared(buckets, [t * 2 for t in tensors], torch.bfloat16)  # the next push: the same buffer, rewritten
    assert ws.shared.buf is buf and ws.shared.handle["path"] == plan["ipc"]["path"]
    seen = {n: t.float() for n, t in weight_sync.read_shared(plan, "cpu")}  # a second mapping of the file
    assert all(torch.equal(seen[n], (t * 2).to(torch.bfloat16).float()) for n, t in named)
    path = ws.shared.path
    ws.close()
    assert not os.path.exists(path)
    with pytest.raises(RuntimeError, match="shared buffer .* is gone"):
        open_shared(plan["ipc"], "cpu")


def test_param_copy_fills_fused_parameters_at_their_offsets():
    """ParamCopy as a vLLM replica uses it: q/k/v and gate/up go to their rows of the fused parameters (in the
    packed order, whatever order they arrive in), a tied weight's alias is left out, and a name, shape or part that
    does not fit is a ValueError before anything is copied (the replica then keeps vLLM's own loader)."""
    g = torch.Generator().manual_seed(0)
    emb = torch.zeros(10, 4, dtype=torch.bfloat16)
    params = {"l.qkv_proj.weight": torch.zeros(8, 4, dtype=torch.bfloat16), "l.qkv_proj.bias": torch.zeros(8),
              "l.gate_up_proj.weight": torch.zeros(6, 4, dtype=torch.bfloat16), "emb.weight": emb}
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    named = [("emb.weight", torch.randn(10, 4, generator=g)), ("l.v_proj.weight", torch.randn(2, 4, generator=g)),
             ("l.q_proj.weight", torch.randn(4, 4, generator=g)), ("l.k_proj.weight", torch.randn(2, 4, generator=g)),
             ("l.q_proj.bias", torch.randn(4, generator=g)), ("l.k_proj.bias", torch.randn(2, generator=g)),
             ("l.v_proj.bias", torch.randn(2, generator=g)), ("l.up_proj.weight", torch.randn(3, 4, generator=g)),
             ("l.gate_proj.weight", torch.randn(3, 4, generator=g))]
    named.append(("lm_head.weight", named[0][1]))
    buckets, aliases, tensors = make_plan(named, "bfloat16", 1.0)
    shapes, alias_names = weight_sync.plan_shapes({"buckets": buckets, "aliases": aliases})
    assert alias_names == {"lm_head.weight"} and list(shapes)[-1] == "lm_head.weight"
    copy = weight_sync.ParamCopy(params, packed)
    src = dict(named)
    copy.load(named, shapes, alias_names)
    bf = lambda *names: torch.cat([src[n] for n in names]).to(torch.bfloat16)  # noqa: E731
    assert torch.equal(params["l.qkv_proj.weight"], bf("l.q_proj.weight", "l.k_proj.weight", "l.v_proj.weight"))
    assert torch.equal(params["l.qkv_proj.bias"], torch.cat([src[f"l.{x}_proj.bias"] for x in "qkv"]))
    assert torch.equal(params["l.gate_up_proj.weight"], bf("l.gate_proj.weight", "l.up_proj.weight"))
    assert torch.equal(emb, bf("emb.weight"))
    assert len(copy.maps) == 1  # the map is made once per list of names
    copy.load(named, shapes, alias_names)
    assert len(copy.maps) == 1

    def error(named, aliases=alias_names):
        fresh = {n: torch.zeros_like(p) for n, p in params.items()}
        with pytest.raises(ValueError) as e:
            weight_sync.ParamCopy(fresh, packed).load(named, {n: tuple(t.shape) for n, t in named}, aliases)
        assert all(not p.any() for p in fresh.values())  # nothing copied
        return str(e.value)
    assert "cover 6 of its 8 rows" in error([x for x in named if x[0] != "l.k_proj.weight"])
    assert "no parameter 'lm_head.weight'" in error(named, frozenset())  # an alias not declared as one
    assert "does not fit" in error([(n, t[:, :3] if n == "l.up_proj.weight" else t) for n, t in named])
    assert "would not be written" in error([x for x in named if not x[0].startswith("l.")])
