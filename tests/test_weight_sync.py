"""The weight sync's wire format without Ray: a trainer's WeightSync and one Receiver in a thread, over gloo."""
import threading

import pytest
import torch

from models import DTYPES
from weight_sync import Receiver, WeightSync, make_plan, open_group


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
