"""Trainer -> inference replicas: one broadcast per bucket over a dedicated process group.

Group: world = 1 (the trainer, rank 0) + every replica worker (a vLLM replica with TP=k brings k).
The trainer hosts a TCPStore; each worker takes its rank from the store's counter (ranks are never
derived from Serve replica ranks, which are not dense) and builds a gloo (CPU) or NCCL (GPU) group
through a PrefixStore named by the group's generation. This group lives beside any torch.distributed
default group the trainer has (DDP/FSDP), and never touches it.

One push:
  1. plan: parameters in a fixed order, cast to the engine dtype, cut into buckets of ~bucket_mb;
     a tensor that shares storage with an earlier one (tied embeddings) travels once, as an alias.
  2. every replica is told the plan (an RPC through the Serve handle), pauses new requests, and
     receives; the trainer broadcasts bucket by bucket. Each worker loads each bucket into its engine.
  3. the RPC answers with the replica's new weight version; all must agree.
Every wait has a timeout; errors name the replica (Serve id) and the group generation.

A replica on the trainer's own GPU cannot be an NCCL rank beside it (NCCL refuses two ranks on one device): it
reads the trainer's packed buffer through CUDA IPC instead (`ipc`: auto), in the same push as the broadcast to the
others. On a CPU the same path runs over shared memory (a file in /dev/shm mapped by both; `ipc`: always), which is
how the tests exercise it. The trainer keeps that buffer, and rewrites it only in its next push, after every replica
has answered this one: a replica copies out of it while loading and keeps no reference.

Left out: sharded (per-TP-rank) transfer: every worker receives full tensors and the engine's own
loader shards them, as vLLM's RLHF example does. vLLM's native NCCL weight-transfer engine
(vllm/distributed/weight_transfer) is GPU-only; see docs/perf.md for which path each engine takes.
"""
import concurrent.futures
import datetime
import gc
import os
import secrets
import time
import weakref

import torch
import torch.distributed as dist

from system.models import DTYPES


def make_plan(named_tensors, dtype: str, bucket_mb: float):
    """[(name, tensor)] -> (buckets, aliases, tensors in plan order).

    buckets: [[(name, shape, numel), ...], ...], each holding at most bucket_mb of `dtype` (a larger
    single tensor gets a bucket of its own); aliases: {name: earlier name with the same storage}.
    >>> make_plan([("a", t2x2), ("b", t3), ("a_tied", t2x2)], "float32", 16 / 2**20)   # 16-byte buckets
    ([[("a", (2, 2), 4)], [("b", (3,), 3)]], {"a_tied": "a"}, [t2x2, t3])
    """
    limit = max(1, int(bucket_mb * 2**20) // torch.empty((), dtype=DTYPES[dtype]).element_size())
    buckets, aliases, tensors, seen, cur, used = [], {}, [], {}, [], 0
    for name, t in named_tensors:
        key = (t.data_ptr(), t.shape, t.dtype, t.device)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        if cur and used + t.numel() > limit:
            buckets.append(cur)
            cur, used = [], 0
        cur.append((name, tuple(t.shape), t.numel()))
        tensors.append(t)
        used += t.numel()
    if cur:
        buckets.append(cur)
    return buckets, aliases, tensors


def open_group(host, port, rank, world, key, backend, timeout_s, is_master=False):
    """A process group of its own (never the default one) under the store's prefix `key` (the trainer's secret +
    the generation: a stranger who reaches the store cannot guess its keys, so cannot take a rank or feed the
    rendezvous). rank None: take the next free one. Returns (store, group, this member's rank)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size=None, is_master=is_master, timeout=timeout, wait_for_workers=False)
    if rank is None:  # a worker: take the next free rank, 1..world-1
        rank = store.add(f"{key}/next_rank", 1)
        if rank >= world:
            raise RuntimeError(f"weight sync group {key.rpartition('/')[2]}: rank {rank} >= world {world}: more "
                               f"workers joined than the trainer planned")
    prefix = dist.PrefixStore(key, store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        group = dist.ProcessGroupNCCL(prefix, rank, world, opts)
    else:
        group = dist.ProcessGroupGloo(prefix, rank, world, timeout)
    return store, group, rank


def close_group(group, abort=False) -> None:
    """Let a group go now (an NCCL one stops its watchdog, which would otherwise poll a store that is gone).
    abort: a broken group. NCCL aborts its communicators; a gloo group closes its sockets when the object dies, which
    the caller lets happen by dropping every reference (members still receiving from us then fail at once)."""
    if group is None:
        return
    try:
        if not abort:
            group.shutdown()
        elif group.name() == "nccl":
            group.abort()
    except Exception:  # already broken: nothing left to release
        pass


def broadcast(group, tensor, timeout_s, wait=True):
    """Rank 0's tensor to every member. wait=False: the pending work (its .wait(): gloo blocks the host until done,
    NCCL makes the current CUDA stream wait)."""
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, datetime.timedelta(seconds=timeout_s)
    work = group.broadcast([tensor], opts)
    return work.wait() if wait else work


def device_id(device) -> str:
    """What a replica and the trainer compare to know they share a device: "cpu", or the GPU's UUID (CUDA indices
    differ between processes that see different CUDA_VISIBLE_DEVICES)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return str(torch.cuda.get_device_properties(device.index if device.index is not None else
                                                torch.cuda.current_device()).uuid)


class SharedBuffer:
    """The trainer's packed weights, readable in place by replicas on its own device: on CUDA through an IPC handle
    (torch.multiprocessing.reductions.reduce_tensor, rebuilt by open_shared), on a CPU through a /dev/shm file both
    sides map (torch.from_file(shared=True)). One flat buffer holds every bucket back to back."""
    def __init__(self, numel, dtype, device, tag):
        self.numel, self.dtype, self.device = numel, dtype, torch.device(device)
        if self.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor
            self.buf, self.path = torch.empty(numel, dtype=dtype, device=self.device), None
            _, args = reduce_tensor(self.buf)
            self.handle = {"kind": "cuda", "args": args, "uuid": device_id(self.device)}
        else:
            self.path = f"/dev/shm/simple-r1-{tag}-{numel}-{str(dtype)[6:]}"
            self.buf = torch.from_file(self.path, shared=True, size=numel, dtype=dtype)
            self.handle = {"kind": "shm", "path": self.path}
        self.handle |= {"numel": numel, "dtype": str(dtype)[6:]}
        # the file goes with this object, or at exit (a SIGKILLed trainer leaves it in /dev/shm)
        self._unlink = weakref.finalize(self, _unlink, self.path) if self.path else None

    def close(self):
        self.buf = None
        if self._unlink:
            self._unlink()


def _unlink(path):
    if os.path.exists(path):
        os.unlink(path)


def open_shared(handle, device):
    """A replica's view of the trainer's SharedBuffer (no copy): CUDA IPC or the /dev/shm file."""
    if handle["kind"] == "shm":
        if not os.path.exists(handle["path"]):
            raise RuntimeError(f"weight sync: shared buffer {handle['path']} is gone (the trainer closed it, or this "
                               f"replica is not on the trainer's machine)")
        return torch.from_file(handle["path"], shared=True, size=handle["numel"], dtype=DTYPES[handle["dtype"]])
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    if device_id(device) != handle["uuid"]:
        raise RuntimeError(f"weight sync: CUDA IPC buffer on GPU {handle['uuid']}, this replica is on "
                           f"{device_id(device)}: only a replica on the trainer's GPU can read it")
    args = list(handle["args"])
    args[6] = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    return rebuild_cuda_tensor(*args)  # args[6]: the trainer's device index, here this process's index of that GPU


def plan_views(buf, plan):
    """(name, tensor) for every planned tensor and alias (last), as views of one flat buffer holding the plan's
    buckets back to back."""
    by_name, off = {}, 0
    for bucket in plan["buckets"]:
        for name, shape, n in bucket:
            by_name[name] = buf[off:off + n].view(shape)
            yield name, by_name[name]
            off += n
    for name, src in plan["aliases"].items():
        yield name, by_name[src]


def read_shared(plan, device):
    """(name, tensor) for every planned tensor and alias, as views of the trainer's shared buffer (plan["ipc"])."""
    return plan_views(open_shared(plan["ipc"], device), plan)


def plan_shapes(plan) -> tuple[dict, frozenset]:
    """(name -> shape of every tensor a push of `plan` yields, in order; the names that are aliases, tied weights)."""
    shapes = {name: tuple(shape) for bucket in plan["buckets"] for name, shape, _ in bucket}
    return shapes | {name: shapes[src] for name, src in plan["aliases"].items()}, frozenset(plan["aliases"])


class ParamCopy:
    """Checkpoint-named tensors copied straight into a model's live parameters by one torch._foreach_copy_, in place of
    the model's own loader (vLLM's load_weights runs Python for every tensor; docs/perf.md times the two).

    params: the model's named parameters (a tied one may be there under both names). packed: fused parameters and the
    parts stacked in them along dim 0, in order
    (vLLM's packed_modules_mapping: {"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...}); a part goes to its rows.
    The name -> destination map is made once per list of names and shapes, and checked: every parameter written
    exactly once and whole, at its shape, or ValueError saying what does not fit (then use the model's loader).
    """
    def __init__(self, params: dict, packed: dict | None = None):
        self.params = params
        self.parts = {f".{part}.": (f".{fused}.", i) for fused, parts in (packed or {}).items()
                      for i, part in enumerate(parts)}
        self.maps = {}

    def destinations(self, shapes: dict, aliases=frozenset()) -> dict:
        """name -> the view it is copied into, for names and shapes in arrival order (None: left out, the second name
        of a tied weight; aliases: such names the model has no parameter of, e.g. vLLM's tied lm_head)."""
        key = (tuple(shapes.items()), aliases)
        if key not in self.maps:
            self.maps[key] = self._map(shapes, aliases)
        return self.maps[key]

    def _map(self, shapes, aliases):
        groups = {}  # parameter name -> [(part index, incoming name)]
        for name in shapes:
            part = next((p for p in self.parts if p in name), None)
            fused, i = self.parts[part] if part else (None, 0)
            groups.setdefault(name.replace(part, fused) if part else name, []).append((i, name))
        dst, written = {}, set()
        for target, parts in groups.items():
            p, names = self.params.get(target), [n for _, n in sorted(parts)]
            if names == [target] and (id(p) in written if p is not None else target in aliases):
                dst[target] = None  # a tied weight's second name: the model holds it once, written under the first
                continue
            if p is None or id(p) in written:
                raise ValueError(f"{names[0]!r}: the model has no parameter {target!r}" if p is None else
                                 f"{target!r} would be written twice")
            row = 0
            for name in names:
                shape = shapes[name]
                if tuple(shape[1:]) != tuple(p.shape[1:]) or (name == target and tuple(shape) != tuple(p.shape)):
                    raise ValueError(f"{name!r}: shape {tuple(shape)} does not fit {target!r} {tuple(p.shape)}")
                dst[name], row = p.data[row:row + shape[0]], row + shape[0]
            if row != p.shape[0]:
                raise ValueError(f"{target!r}: {names} cover {row} of its {p.shape[0]} rows")
            written.add(id(p))
        missing = [n for n, p in self.params.items() if id(p) not in written]
        if missing:
            raise ValueError(f"{len(missing)} parameters would not be written, e.g. {missing[:3]}")
        return dst

    @torch.no_grad()
    def load(self, named, shapes: dict, aliases=frozenset()) -> None:
        """Copy (name, tensor) pairs, named as in shapes (plan_shapes), into the parameters: one fused copy."""
        dst, dsts, srcs = self.destinations(shapes, aliases), [], []
        for name, t in named:
            if name not in dst:
                raise ValueError(f"{name!r} is not among the names this load was planned for")
            if dst[name] is not None:
                dsts.append(dst[name])
                srcs.append(t)
        torch._foreach_copy_(dsts, srcs)


class Receiver:
    """Replica side, one per worker: join a group, then turn broadcast buckets into (name, tensor)."""
    def __init__(self, device):
        self.device, self.group, self.store, self.rank = torch.device(device), None, None, None

    def join(self, host, port, world, key, backend, timeout_s):
        self.leave()
        self.store, self.group, self.rank = open_group(host, port, None, world, key, backend, timeout_s)
        return self.rank

    def leave(self):
        close_group(self.group, abort=True)  # never waits: the group may be broken (a failed push)
        self.group = self.store = None

    def receive(self, plan, timeout_s):
        """Yields (name, tensor) for every planned tensor and alias, bucket by bucket, as they arrive. Bucket k + 1 is
        posted before bucket k is handed out, so it travels while the caller loads k (on GPUs the loader's copies
        queue behind k's arrival, nothing waits on the host)."""
        buckets, aliases, dtype = plan["buckets"], plan["aliases"], DTYPES[plan["dtype"]]

        def post(bucket):  # a fresh buffer per bucket: loaders may keep views of it
            buf = torch.empty(sum(n for _, _, n in bucket), dtype=dtype, device=self.device)
            return buf, broadcast(self.group, buf, timeout_s, wait=False)

        by_name, nxt = {}, post(buckets[0]) if buckets else None
        for k, bucket in enumerate(buckets):
            buf, work = nxt
            work.wait()  # gloo: here when it has arrived; NCCL: our stream waits for it
            if k + 1 < len(buckets):
                nxt = post(buckets[k + 1])
            off = 0
            for name, shape, n in bucket:
                by_name[name] = buf[off:off + n].view(shape)
                yield name, by_name[name]
                off += n
        for name, src in aliases.items():
            yield name, by_name[src]


class WeightSync:
    """Trainer side. push(named_tensors) sends them to every replica of a Serve deployment handle.

    The group is formed on the first push and re-formed (a new generation) whenever the replicas
    report a different membership, e.g. after Serve restarted a dead replica.

    ipc: which replicas read the trainer's buffer in place instead of joining the broadcast: "auto" those on the
    trainer's own GPU (same Ray node, same GPU UUID, one worker; NCCL cannot serve them), "always" also CPU replicas on
    the trainer's node (shared memory), "never" none.
    """
    def __init__(self, handle, bucket_mb=1024.0, host="127.0.0.1", port=0, backend=None, device="cpu",
                 timeout_s=120.0, expected_workers=None, ipc="auto"):
        self.handle, self.bucket_mb, self.timeout_s = handle, bucket_mb, timeout_s
        self.backend = backend or ("nccl" if torch.device(device).type == "cuda" else "gloo")
        self.host, self.device = host, torch.device(device)
        self.store = dist.TCPStore(host, port, world_size=None, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        self.port = self.store.port
        self.expected_workers = expected_workers  # None: learn it from the first membership
        self.generation, self.group, self.members, self.version = 0, None, None, 0
        self.secret = secrets.token_hex(16)  # every key of our groups starts with it; it travels only over Ray
        self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="weight-sync-rpc")
        self._ring = []  # _send's two pack buffers, made on first use
        if ipc not in ("auto", "always", "never"):
            raise ValueError(f"ipc={ipc!r}: use auto, always or never")
        self.ipc, self.ipc_members, self.shared, self.device_id = ipc, set(), None, device_id(self.device)
        try:
            import ray
            self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except ImportError:
            self.node = None

    def _broadcast(self, method, *args):
        """Call `method` on every replica, starting now (a Serve broadcast is only sent once its results are
        awaited, and we must be inside the collective meanwhile). A future of per-replica results/errors."""
        resp = self.handle.broadcast(method, *args)
        return self.pool.submit(resp.results, timeout_s=self.timeout_s, return_exceptions=True)

    def _wait_for_replicas(self):
        """States of the live replicas once the expected number of workers is up. A replica that died
        answers with an error until Serve has replaced it; we poll until the timeout."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                res = self._broadcast("sync_state").result()
            except Exception as e:  # Serve has no live replica at all right now (DeploymentUnavailableError)
                res = [e]
            states = [r for r in res if not isinstance(r, BaseException)]
            n = sum(s["num_workers"] for s in states)
            if states and len(states) == len(res) and (self.expected_workers is None or n >= self.expected_workers):
                return states
            if time.monotonic() > deadline:
                silent = sorted({r for r, _ in self.members or ()} - {s["replica"] for s in states})
                errors = [repr(r)[:300] for r in res if isinstance(r, BaseException)]
                raise TimeoutError(f"weight sync: sync_state: expected {self.expected_workers} replica workers, {n} "
                                   f"answered within {self.timeout_s:.0f} s ({sorted(s['replica'] for s in states)}); "
                                   f"no answer from replicas {silent or '(not known yet)'}; errors: {errors}")
            time.sleep(0.5)

    def takes_ipc(self, state) -> bool:
        """Does this replica read our shared buffer (see the class docstring) rather than join the broadcast?"""
        here = self.node is not None and state.get("node") == self.node and state.get("device") == self.device_id
        return (self.ipc == "always" or self.ipc == "auto" and self.device.type == "cuda") and here and \
            state["num_workers"] == 1

    def connect(self, states):
        """Form a new group (generation + 1) with every replica worker in `states` that does not take IPC (none
        when all do); the IPC replicas are told so and join no group."""
        self.close_group(abort=True)  # the old one may have lost a member: never wait on it
        self.generation += 1
        ipc = sorted(s["replica"] for s in states if self.takes_ipc(s))
        n_workers = sum(s["num_workers"] for s in states)
        g, world, key = self.generation, 1 + n_workers - len(ipc), f"{self.secret}/g{self.generation}"
        if self.expected_workers is not None and n_workers != self.expected_workers:
            raise RuntimeError(f"weight sync: {n_workers} workers but {self.expected_workers} expected")
        replicas = sorted(s["replica"] for s in states)
        resp = self._broadcast("join_sync_group", self.host, self.port, world, g, key, self.backend, self.timeout_s, ipc)
        try:
            if world > 1:
                _, self.group, _ = open_group(self.host, self.port, 0, world, key, self.backend, self.timeout_s)
        except Exception as e:
            joined = int(self.store.add(f"{key}/next_rank", 0))
            answers = resp.result() if resp.done() else "still waiting"
            raise TimeoutError(
                f"weight sync group {g}: {joined} of {world - 1} replica workers took a rank within "
                f"{self.timeout_s:.0f} s (replicas: {replicas}); replies: {answers}. A replica that cannot reach "
                f"{self.host}:{self.port} never joins: check the trainer's sync host/port") from e
        res = resp.result()  # broadcast results come in no fixed order: name replicas by what they returned
        failed = [x for x in res if isinstance(x, BaseException)]
        if failed:
            missing = sorted(set(replicas) - {x for x in res if not isinstance(x, BaseException)})
            raise RuntimeError(f"weight sync group {g}: replicas {missing} failed to join: {failed}")
        self.members, self.ipc_members = {(s["replica"], g) for s in states}, set(ipc)
        self.expected_workers = n_workers

    @staticmethod
    def _who(res, members) -> str:
        """Which replicas answered a broadcast RPC, and which did not (replies name their replica; errors do not)."""
        ok = {r["replica"] for r in res if not isinstance(r, BaseException)}
        errors = [f"{type(r).__name__}: {str(r)[:300]}" for r in res if isinstance(r, BaseException)]
        return (f"replicas that did not load it: {sorted({m for m, _ in members or ()} - ok)}; "
                f"loaded: {sorted(ok)}; errors: {errors}")

    def close_group(self, abort=False):
        close_group(self.group, abort)
        self.group, self.members, self.ipc_members = None, None, set()

    def close(self):
        """Every replica leaves the group, then ours goes: nobody is left polling a store that is about to close."""
        errors = []
        if self.members is not None:
            res = self._broadcast("leave_sync_group").result()
            self.close_group()
            errors = [r for r in res if isinstance(r, BaseException)]
        if self.shared is not None:
            self.shared.close()
            self.shared = None
        return errors

    def _pack_shared(self, buckets, tensors, dtype):
        """Every bucket, cast, into the one SharedBuffer the IPC replicas read (kept across pushes; made again only
        when the size or dtype changes). Returns each bucket's slice of it, for the broadcast to the others."""
        sizes = [sum(n for _, _, n in b) for b in buckets]
        if self.shared is None or self.shared.numel != sum(sizes) or self.shared.dtype != dtype:
            if self.shared is not None:
                self.shared.close()
            self.shared = SharedBuffer(sum(sizes), dtype, self.device, self.secret[:12])
        it, slices = iter(tensors), list(self.shared.buf.split(sizes))
        for bucket, buf in zip(buckets, slices):
            src = [next(it).detach() for _ in bucket]
            torch._foreach_copy_(list(buf.split([n for _, _, n in bucket])), [t.reshape(-1) for t in src])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the replicas read it on their own streams once told to
        return slices

    def _send(self, buckets, tensors, dtype):
        """Broadcast the buckets. Each is packed (cast to the wire dtype, one copy) into one of two buffers kept
        across pushes, so bucket k + 1 is packed while bucket k is on the wire; a bucket that is one tensor already in
        the wire's dtype and layout goes as it is. Nothing here waits on the host for NCCL."""
        sizes, ring = [sum(n for _, _, n in b) for b in buckets], self._ring
        if ring and (ring[0].dtype != dtype or ring[0].numel() < max(sizes)):
            ring.clear()  # let the old pair go first
        it, works = iter(tensors), []
        for k, (bucket, size) in enumerate(zip(buckets, sizes)):
            src = [next(it).detach() for _ in bucket]
            if len(src) == 1 and src[0].dtype == dtype and src[0].device == self.device and src[0].is_contiguous():
                buf = src[0]
            else:
                if k >= 2:
                    works[k - 2].wait()  # this buffer's last bucket has left (NCCL: our stream waits for it)
                while len(ring) <= k % 2:  # made on first use, kept for the next pushes
                    ring.append(torch.empty(max(sizes), dtype=dtype, device=self.device))
                buf = ring[k % 2][:size]
                torch._foreach_copy_(list(buf.split([n for _, _, n in bucket])), [t.reshape(-1) for t in src])
            works.append(broadcast(self.group, buf, self.timeout_s, wait=False))
        for w in works:
            w.wait()

    @torch.no_grad()
    def push(self, named_tensors, version=None) -> int:
        """Broadcast every tensor to every replica worker; returns the replicas' new (common) version
        (version, or the last one + 1). self.timing holds the last push's split, s."""
        t0 = time.perf_counter()
        states = self._wait_for_replicas()
        if {(s["replica"], s["generation"]) for s in states} != self.members:
            self.connect(states)  # first push, or a replica was replaced
        dtypes = {s["dtype"] for s in states}
        assert len(dtypes) == 1, f"replicas run different dtypes {dtypes}: one push cannot serve them all"
        dtype = dtypes.pop()  # cast on the trainer: the wire carries what the engine holds (bf16 = half of fp32)
        buckets, aliases, tensors = make_plan(named_tensors, dtype, self.bucket_mb)
        version = self.version + 1 if version is None else version
        plan = {"buckets": buckets, "aliases": aliases, "dtype": dtype, "generation": self.generation,
                "version": version}
        slices, t_plan = None, time.perf_counter()
        if self.ipc_members:  # packed before anyone is told: the IPC replicas read it as soon as the RPC arrives
            slices = self._pack_shared(buckets, tensors, DTYPES[dtype])
            plan |= {"ipc": self.shared.handle, "ipc_replicas": sorted(self.ipc_members)}
        t1, sent = time.perf_counter(), time.time()
        resp = self._broadcast("receive_weights", plan, self.timeout_s)
        try:
            if slices is not None and self.group is not None:
                for w in [broadcast(self.group, buf, self.timeout_s, wait=False) for buf in slices]:
                    w.wait()
            elif slices is None:
                self._send(buckets, tensors, DTYPES[dtype])
            t2 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # our end is done when every member has the last bucket
            failure = None
        except Exception as e:
            failure = f"{type(e).__name__}: {str(e)[:300]}"  # not the exception: its frames hold the group
        if failure is not None:
            members = self.members
            self.close_group(abort=True)  # our end goes first, so replicas still receiving fail now, not at their
            gc.collect()                  # timeout (the gloo group's sockets close when the object dies)
            raise RuntimeError(f"weight sync group {self.generation}: broadcast of version {version} failed "
                               f"({failure}); {self._who(resp.result(), members)}")
        t3 = time.perf_counter()
        res = resp.result()
        t4, got = time.perf_counter(), time.time()
        if any(isinstance(x, BaseException) for x in res):
            members = self.members
            self.close_group()
            raise RuntimeError(f"weight sync group {self.generation}: receive_weights of version {version} failed; "
                               f"{self._who(res, members)}")
        # the split, from our clock and the replicas' (one host, or NTP-close ones): state RPC (and the plan); the IPC
        # buffer packed (0 without IPC replicas: the broadcast packs as it sends); RPC to the last
        # replica's start; our sends queued; the transfer done on our side; the last replica's load done; its reply
        arrive, done = max(r["t_arrive"] for r in res), max(r["t_done"] for r in res)
        self.timing = {"state_s": t_plan - t0, "pack_s": t1 - t_plan, "enqueue_s": t2 - t1, "broadcast_s": t3 - t1, "load_wait_s": t4 - t3,
                       "dispatch_s": arrive - sent, "reply_s": got - done, "replica_s": done - arrive,
                       "total_s": t4 - t0, "bytes": sum(n for b in buckets for _, _, n in b) * DTYPES[dtype].itemsize,
                       "buckets": len(buckets)}
        assert all(r["version"] == version for r in res), f"replicas' versions after push {version}: {res}"
        self.version = version
        return self.version
