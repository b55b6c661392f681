"""How long a weight sync through the Ray object store takes, next to a plain in-process copy.

    .venv/bin/python bench/bench_weight_sync.py [--sizes-mb 64 256] [--bucket-mb 64]
                                                [--repeats 5] [--threads 1]

For each total size, builds float32 named tensors shaped like transformer weights (8 MB
matrices, each followed by a small norm vector) and times, in the same run and interleaved:

(a) object store: ``ObjectStoreSender.publish`` in this process (pack into buckets + ``ray.put``)
    and then a Ray actor's ``receive`` (``ray.get`` per bucket, zero-copy, + ``load_weights``
    into its own copy of the tensors), end to end as the driver sees it;
(b) plain copy: ``dst.copy_(src)`` per tensor in this process, the floor any sync must pay.

Prints the median seconds and GB/s of each, the publish / receive split of (a) and the ratio
(a) / (b). A local Ray on 127.0.0.1 is started and shut down by the script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rollout.weight_sync import ObjectStoreSender, receive  # noqa: E402

MATRIX_BYTES = 8 << 20


def layout(total_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of float32 tensors adding up to ``total_bytes``."""
    shapes, left, i = [], total_bytes, 0
    while left > 0:
        cols = 1024
        rows = max(1, min(MATRIX_BYTES, left) // (4 * cols))
        shapes.append((f"layers.{i}.proj.weight", (rows, cols)))
        shapes.append((f"layers.{i}.norm.weight", (cols,)))
        left -= 4 * cols * (rows + 1)
        i += 1
    return shapes


class Receiver:
    """The rollout side: its own tensors of the same layout, loaded in place."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], threads: int):
        torch.set_num_threads(threads)
        self.model = torch.nn.Module()
        for name, shape in shapes:
            self.model.register_buffer(name.replace(".", "_"), torch.zeros(shape))

    def receive(self, payload) -> tuple[int, float]:
        stats = receive(payload, self.model)
        return stats.bytes, stats.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()

    import ray

    torch.set_num_threads(args.threads)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=max(3 * max(args.sizes_mb), 256) << 20, log_to_driver=False)
    sender = ObjectStoreSender(bucket_bytes=args.bucket_mb << 20)
    print(f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} CPUs, "
          f"{args.threads} torch thread(s) per process, buckets of {args.bucket_mb} MB, "
          f"median of {args.repeats} runs after 1 warm-up")
    try:
        for size_mb in args.sizes_mb:
            shapes = layout(size_mb << 20)
            # Buffers named without dots stand in for parameters; the sender uses those names.
            src = [(name.replace(".", "_"), torch.randn(shape)) for name, shape in shapes]
            dst = [torch.zeros(shape) for _, shape in shapes]
            nbytes = sum(t.numel() * t.element_size() for _, t in src)
            actor = ray.remote(Receiver).options(num_cpus=1).remote(shapes, args.threads)
            ray.get(actor.receive.remote(sender.publish(src[:1])))  # actor up and warm

            split: list[tuple[float, float, int]] = []

            def object_store(src=src, actor=actor, nbytes=nbytes, split=split) -> None:
                payload = sender.publish(src)
                loaded, seconds = ray.get(actor.receive.remote(payload))
                assert loaded == nbytes, (loaded, nbytes)
                split.append((payload.publish_seconds, seconds, len(payload.refs)))

            def plain_copy(src=src, dst=dst) -> None:
                for (_, s), d in zip(src, dst, strict=True):
                    d.copy_(s)

            store_t: list[float] = []
            copy_t: list[float] = []
            for rep in range(args.repeats + 1):
                for fn, out in ((object_store, store_t), (plain_copy, copy_t)):
                    start = time.perf_counter()
                    fn()
                    if rep:  # the first round is the warm-up
                        out.append(time.perf_counter() - start)
            del split[0]
            store, copy = statistics.median(store_t), statistics.median(copy_t)
            pub = statistics.median(s[0] for s in split)
            rec = statistics.median(s[1] for s in split)
            print(f"\n{nbytes / 2**20:.0f} MB in {len(src)} float32 tensors, "
                  f"{split[-1][2]} bucket(s)")
            print(f"  (a) object store publish+receive  {store:8.4f} s  "
                  f"{nbytes / store / 1e9:6.2f} GB/s   (publish {pub:.4f} s, "
                  f"actor receive+load {rec:.4f} s)")
            print(f"  (b) plain torch copy_             {copy:8.4f} s  "
                  f"{nbytes / copy / 1e9:6.2f} GB/s")
            print(f"  ratio (a)/(b)                     {store / copy:8.1f} x")
            ray.kill(actor)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
