"""How fast each weight-sync transport moves a model, as a ratio to one plain in-process copy.

    .venv/bin/python bench/bench_weight_sync.py [--sizes-mb 4 64 256 1024] [--receivers 1 2]
        [--bucket-mb 64] [--repeats 3] [--transports shm gloo nccl objectstore]

For each size, float32 tensors shaped like transformer weights (8 MB matrices, each followed by
a 4 KB norm vector) add up to the size, and are synced from this process (rank 0, the sender)
into 1 or 2 receivers, each a separate spawned OS process holding its own preallocated copy of
the tensors and loading every sync into it with ``load_into``. Every process, this one included,
runs torch with one thread. Timed, per sync, end to end: from the moment the sender starts
packing the first bucket (once every receiver has said it is ready) until the last receiver has
loaded the last bucket (all processes read the same monotonic clock); the median of
``--repeats`` syncs after one warm-up sync. One more, untimed, sync after a change to the
weights checks that every receiver's ``Digest`` equals the sender's.

``shm`` / ``gloo`` / ``nccl``  ``rollout.weight_sync``'s ``WeightSender`` / ``WeightReceiver`` over
    ``open_channel`` (``nccl`` needs CUDA, vLLM and one GPU per rank; it is skipped otherwise).
``objectstore``  the old approach, kept here as the baseline: every bucket packed into a fresh
    numpy array and ``ray.put``, then one Ray actor per receiver ``ray.get``s each bucket and
    copies it into its tensors (a local Ray on 127.0.0.1, started and shut down here; its store
    is touched once at start). ``ray.put`` copies with Ray's own memcpy threads, so this
    sender is not held to one thread.
``copy``  ``dst.copy_(src)`` per tensor in this process: ratio = copy seconds / sync seconds,
    so 1.0 is a sync as fast as one in-process copy of the model. GB/s is model bytes per
    second (not multiplied by the number of receivers).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rollout.weight_sync import (  # noqa: E402
    BucketPlan,
    ChannelSpec,
    Digest,
    WeightReceiver,
    WeightSender,
    fill_bucket,
    iter_named,
    load_into,
    open_channel,
)
from umerl.data.dtypes import torch_dtype  # noqa: E402

MATRIX_BYTES, COLS = 8 << 20, 1024
TIMEOUT_S = 120.0
SHM_PREFIX = f"/dev/shm/umerl-bench-{os.getpid()}"


def now() -> float:
    """A clock every process on the node shares (so one sync's ends can be compared)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def make_tensors(total_bytes: int, device: str = "cpu", fill: bool = True
                 ) -> dict[str, torch.Tensor]:
    """Float32 (name -> tensor): 8 MB matrices, each followed by a norm vector."""
    out, left, i = {}, total_bytes, 0
    while left > 0:
        rows = max(1, min(MATRIX_BYTES, left) // (4 * COLS))
        for name, shape in ((f"layers.{i}.proj.weight", (rows, COLS)),
                            (f"layers.{i}.norm.weight", (COLS,))):
            out[name] = (torch.randn(shape, device=device) if fill
                         else torch.zeros(shape, device=device))
        left -= 4 * COLS * (rows + 1)
        i += 1
    return out


def perturb(tensors: dict[str, torch.Tensor]) -> None:
    """Change every tensor, so the verification sync carries bytes no earlier sync did."""
    for t in tensors.values():
        t.view(-1)[0] += 1.0


def copy_seconds(tensors: dict[str, torch.Tensor], repeats: int) -> float:
    dst = {n: torch.empty_like(t) for n, t in tensors.items()}
    times = []
    for k in range(repeats + 1):
        start = time.perf_counter()
        for name, t in tensors.items():
            dst[name].copy_(t)
        if k:  # the first is the warm-up (it also faults dst's pages in)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# shm / gloo / nccl: receivers are spawned processes, driven through queues


def receiver_main(rank: int, commands: mp.Queue, results: mp.Queue) -> None:
    """One receiver process: per command, join the channel, receive ``rounds`` syncs into its
    own tensors (kept while the layout stays the same), report end times and its digest."""
    torch.set_num_threads(1)
    key, tensors = None, {}
    while (command := commands.get()) is not None:
        spec, specs, bucket_bytes, rounds, device = command
        try:
            plan = BucketPlan.build(specs, bucket_bytes)
            if key != (specs, device):
                tensors = {}  # free the previous size first
                tensors = {name: torch.zeros(shape, dtype=torch_dtype(dt), device=device)
                           for name, shape, dt in specs}
                key = (specs, device)
            plan.check_targets(tensors, f"receiver {rank}")
            receiver = WeightReceiver(open_channel(spec, rank, device), plan, load_into(tensors))
            ends = []
            try:
                for k in range(rounds):
                    results.put(("ready", rank, k))
                    receiver.receive()
                    ends.append(now())
            finally:
                receiver.close()
            results.put(("done", rank, ends, Digest.of(plan, tensors)))
        except BaseException:
            results.put(("error", rank, traceback.format_exc()))


class Receivers:
    """A pool of receiver processes (rank i+1 is process i), started once for the whole run."""

    def __init__(self, n: int):
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=receiver_main, args=(i + 1, q, self.results),
                                  daemon=True) for i, q in enumerate(self.commands)]
        for p in self.procs:
            p.start()

    def expect(self, kind: str, n: int) -> list[tuple]:
        """The next ``n`` messages, all of ``kind``; a receiver's error is raised here."""
        out = []
        for _ in range(n):
            try:
                msg = self.results.get(timeout=TIMEOUT_S)
            except queue.Empty:
                dead = [i + 1 for i, p in enumerate(self.procs) if not p.is_alive()]
                raise RuntimeError(f"no {kind!r} from the receivers in {TIMEOUT_S:.0f} s "
                                   f"(dead ranks: {dead})") from None
            if msg[0] == "error":
                raise RuntimeError(f"receiver {msg[1]} failed:\n{msg[2]}")
            if msg[0] != kind:
                raise RuntimeError(f"expected {kind!r} from the receivers, got {msg!r}")
            out.append(msg)
        return out

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


_channels = itertools.count()


def channel_seconds(transport: str, plan: BucketPlan, tensors: dict[str, torch.Tensor],
                    pool: Receivers, receivers: int, repeats: int) -> float:
    device = "cuda:0" if transport == "nccl" else "cpu"
    prefix = f"{SHM_PREFIX}-{next(_channels)}"
    spec = ChannelSpec(transport, "127.0.0.1", free_port(), 1 + receivers, timeout_s=TIMEOUT_S,
                       largest_bucket=plan.largest, shm_prefix=prefix)
    rounds = repeats + 2  # warm-up, timed ..., verification
    for rank in range(1, receivers + 1):
        pool.commands[rank - 1].put((spec, plan.specs(), plan.bucket_bytes, rounds,
                                     f"cuda:{rank}" if transport == "nccl" else "cpu"))
    sender = WeightSender(open_channel(spec, 0, device), plan)  # all ranks join together
    if glob.glob(f"{prefix}*"):
        raise RuntimeError(f"{transport}: slot files {prefix}* left in /dev/shm after open")
    starts, ends = [], []
    try:
        for k in range(rounds):
            verify = k == rounds - 1
            if verify:
                perturb(tensors)
            pool.expect("ready", receivers)
            starts.append(now())
            stats = sender.send(iter_named(tensors, plan), digest=verify)
            ends.append(now())
    finally:
        sender.close()
    done = pool.expect("done", receivers)
    for _, rank, _, digest in done:
        if digest != stats.digest:
            raise RuntimeError(f"{transport}: receiver {rank}'s digest {digest} != the sender's "
                               f"{stats.digest}")
    return statistics.median([max(ends[k], *(msg[2][k] for msg in done)) - starts[k]
                              for k in range(1, rounds - 1)])


def nccl_unavailable(receivers: int) -> str | None:
    if not torch.cuda.is_available():
        return "torch has no CUDA"
    if torch.cuda.device_count() < 1 + receivers:
        return f"{1 + receivers} GPUs needed, {torch.cuda.device_count()} visible"
    try:
        import vllm.distributed.weight_transfer.nccl_common  # noqa: F401
    except ImportError:
        return "vLLM is not installed"
    return None


# ---------------------------------------------------------------------------------------------
# objectstore: the old approach (ray.put per bucket, receiver actors ray.get and copy)


class StoreReceiver:
    """A Ray actor with its own copy of the tensors (rollout is imported after the path fix)."""

    def __init__(self, repo: str):
        sys.path.insert(0, repo)
        torch.set_num_threads(1)

    def alloc(self, specs: list, bucket_bytes: int) -> None:
        from rollout.weight_sync import BucketPlan

        self.plan = BucketPlan.build(specs, bucket_bytes)
        self.tensors = {n: torch.zeros(shape) for n, shape, _ in specs}
        self.raw = {n: t.view(-1).view(torch.uint8).numpy() for n, t in self.tensors.items()}

    def receive(self, refs: list) -> float:
        import ray

        for metas, ref in zip(self.plan.buckets, refs):
            flat = ray.get(ref)  # zero-copy, read-only view of the object store
            for m in metas:
                np.copyto(self.raw[m.name], flat[m.offset:m.offset + m.nbytes])
        return now()

    def digest(self) -> str:
        from rollout.weight_sync import Digest

        return Digest.of(self.plan, self.tensors)


def objectstore_seconds(plan: BucketPlan, tensors: dict[str, torch.Tensor], actors: list,
                        repeats: int) -> float:
    import ray

    ray.get([a.alloc.remote(plan.specs(), plan.bucket_bytes) for a in actors])
    times = []
    for k in range(repeats + 2):  # warm-up, timed ..., verification
        if k == repeats + 1:
            perturb(tensors)
        start, refs = now(), []
        for size, metas, bucket in zip(plan.sizes, plan.buckets, iter_named(tensors, plan)):
            flat = np.empty(size, dtype=np.uint8)
            fill_bucket(torch.from_numpy(flat), metas, bucket)
            refs.append(ray.put(flat))
        loaded = ray.get([a.receive.remote(refs) for a in actors])
        if 0 < k <= repeats:
            times.append(max(loaded) - start)
        del refs, flat
    want = Digest.of(plan, tensors)
    for i, got in enumerate(ray.get([a.digest.remote() for a in actors])):
        if got != want:
            raise RuntimeError(f"objectstore: receiver {i + 1}'s digest {got} != {want}")
    return statistics.median(times)


def start_ray(max_mb: int, receivers: int) -> list:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from umerl.runtime.ray_start import keep_on_loopback

    store_mb = min(max(3 * max_mb, 256), 8192)
    keep_on_loopback()  # else Ray advertises the outward address, not 127.0.0.1
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=store_mb << 20, log_to_driver=False)
    # Touch the store's memory once (a long run's store is warm): the first puts into fresh
    # shared memory pay page faults that would otherwise land in the first sizes' syncs.
    chunk = 64 << 20
    refs = [ray.put(np.ones(chunk, dtype=np.uint8)) for _ in range((store_mb << 20) * 2 // 3
                                                                     // chunk)]
    del refs
    actor = ray.remote(num_cpus=0.5)(StoreReceiver)
    actors = [actor.remote(str(REPO)) for _ in range(receivers)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    return actors


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[4, 64, 256, 1024])
    parser.add_argument("--receivers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transports", nargs="+", default=["shm", "gloo", "nccl", "objectstore"],
                        choices=["shm", "gloo", "nccl", "objectstore"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    max_r = max(args.receivers)

    transports = list(args.transports)
    skipped = {}
    if "nccl" in transports and (why := nccl_unavailable(max_r)):
        skipped["nccl"] = why
        transports.remove("nccl")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 torch thread per process, "
          f"buckets of {args.bucket_mb} MB, median of {args.repeats} syncs after 1 warm-up",
          flush=True)
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})", flush=True)

    pool = Receivers(max_r) if set(transports) & {"shm", "gloo", "nccl"} else None
    actors = start_ray(max(args.sizes_mb), max_r) if "objectstore" in transports else []
    print(f"\n{'MB':>6} {'recv':>4}  {'transport':<11} {'seconds':>9} {'GB/s':>7} {'x copy':>7}",
          flush=True)
    start = time.perf_counter()
    try:
        for size_mb in args.sizes_mb:
            tensors = make_tensors(size_mb << 20)
            plan = BucketPlan.of(tensors.items(), args.bucket_mb << 20)
            copy = copy_seconds(tensors, args.repeats)

            def row(recv: str, name: str, seconds: float, size_mb=size_mb, plan=plan,
                    copy=copy) -> None:
                print(f"{size_mb:>6} {recv:>4}  {name:<11} {seconds:9.4f} "
                      f"{plan.bytes / seconds / 1e9:7.2f} {copy / seconds:7.3f}", flush=True)

            row("-", "copy", copy)
            gpu = ({n: t.to("cuda:0") for n, t in tensors.items()} if "nccl" in transports
                   else None)
            for name in transports:
                for receivers in args.receivers:
                    if name == "objectstore":
                        seconds = objectstore_seconds(plan, tensors, actors[:receivers],
                                                      args.repeats)
                    else:
                        seconds = channel_seconds(name, plan, gpu if name == "nccl" else tensors,
                                                  pool, receivers, args.repeats)
                    row(str(receivers), name, seconds)
            del tensors, gpu
    finally:
        if pool is not None:
            pool.close()
        if actors:
            import ray

            ray.shutdown()
        left = glob.glob(f"{SHM_PREFIX}*")
        if left:
            print(f"shared-memory files left behind: {left}", flush=True)
    if left:
        raise SystemExit(1)
    print(f"\n({time.perf_counter() - start:.0f} s; every receiver's digest matched the sender's; "
          "no shared-memory file left behind)", flush=True)


if __name__ == "__main__":
    main()
