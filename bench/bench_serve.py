"""Load benchmark of the embedding service: a bounded run against a local Serve application.

    .venv/bin/python bench/bench_serve.py CHECKPOINT [--router R] [--requests 300]
        [--gen-requests 64] [--auto-requests 128] [--concurrency 8]
        [--encodings float,base64] [--via direct,proxy]

Starts Ray and the service on 127.0.0.1 (one replica, ``--cpus`` CPUs), sends requests of
``--inputs-per-request`` inputs (default 1) built from the bundled benchmark's test queries
(text, image and video inputs as data URLs) at a fixed concurrency, disc first, then gen, then
auto (with ``--router``), each once per response encoding (``encoding_format`` float and
base64) and per way in (``direct``: the replica's own HTTP server, ``serve.direct_port``;
``proxy``: through Serve's HTTP proxy), and prints per row the throughput, p50 and p99
latency, the error count, and the throughput (inputs/s) as a ratio to the same inputs embedded
in this process in batches (``umerl.model.embed``, the replica's largest batch size and the same
number of torch threads as the replica; after a warm-up batch, the better of two timings, so
the baseline is not understated).
Batch sizes default to concurrency x inputs per request.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umerl.config.schema import DIRECT_PORT_SPAN  # noqa: E402
from umerl.data.formats import Side, read_eval_queries  # noqa: E402
from umerl.serve.client import EmbeddingClient, ServiceError, data_url  # noqa: E402


def benchmark_inputs(count: int, benchmark_dir: str | None) -> list[Side]:
    """``count`` query sides, cycling over every bundled task's test split."""
    from umerl.data.tasks import resolve_tasks

    sides = []
    for spec in resolve_tasks(["umerl-mini"], "test", benchmark_dir):
        sides += [q.query for q in read_eval_queries(spec.path)[0]]
    return [sides[i % len(sides)] for i in range(count)]


def as_request_item(side: Side) -> dict[str, Any]:
    item: dict[str, Any] = {"text": side.text}
    if side.images:
        item["image"] = data_url(side.images[0])
    if side.video:
        item["video"] = [data_url(f) for f in side.video]
    return item


def load(url: str, requests: list[list[dict]], mode: str, concurrency: int,
         encoding_format: str = "base64") -> dict[str, float]:
    """Send every request (a list of input items), ``concurrency`` at a time."""
    clients = [EmbeddingClient(url) for _ in range(concurrency)]

    def send(index: int) -> tuple[float, bool]:
        start = time.perf_counter()
        try:
            clients[index % concurrency].embed(requests[index], mode=mode,
                                               encoding_format=encoding_format)
            return time.perf_counter() - start, True
        except (ServiceError, OSError):
            return time.perf_counter() - start, False

    start = time.perf_counter()
    # Chunked by client so that no two threads ever share one client's connection.
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(
            lambda c: [send(i) for i in range(c, len(requests), concurrency)],
            range(concurrency)))
    wall = time.perf_counter() - start
    latencies = np.array([t for chunk in results for t, _ in chunk])
    errors = sum(not ok for chunk in results for _, ok in chunk)
    inputs = sum(len(r) for r in requests)
    return {"requests": len(requests), "errors": errors, "request_rate": len(requests) / wall,
            "throughput": inputs / wall,
            "p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "p99_ms": float(np.percentile(latencies, 99) * 1e3)}


def in_process(checkpoint: str, sides: list[Side], mode: str, batch_size: int,
               max_new_tokens: int) -> float:
    """Inputs per second embedded in this process in batches, as the replica does: the better
    of two timings after a warm-up batch."""
    from rollout.transformers_engine import TransformersEngine
    from umerl.model.embed import disc_embeddings, gen_embeddings
    from umerl.model.loading import load_policy
    from umerl.model.sampling import SamplingParams

    bundle = load_policy(checkpoint)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False)
    engine = TransformersEngine(bundle, batch_size)

    def embed(chunk: list[Side]) -> None:
        if mode == "disc":
            disc_embeddings(bundle, chunk, batch_size)
        else:
            gen_embeddings(bundle, engine, chunk, 1, greedy, batch_size)

    embed(sides[:batch_size])
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        embed(sides)
        best = min(best, time.perf_counter() - start)
    return len(sides) / best


def start(args: argparse.Namespace) -> dict[str, str]:
    """Ray and the service; the URL of each way in."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from umerl.eval.router import Router
    from umerl.runtime.ray_start import worker_env
    from umerl.serve.service import ServeOptions, start_service

    port, direct_port = free_port(), free_port(span=DIRECT_PORT_SPAN)
    ray.init(_node_ip_address="127.0.0.1", num_cpus=max(2, int(args.cpus) + 1),
             include_dashboard=False, object_store_memory=256 << 20,
             runtime_env={"env_vars": worker_env()}, logging_level="ERROR")
    options = ServeOptions(port=port, direct_port=direct_port, cpus_per_replica=args.cpus,
                           disc_batch_size=args.disc_batch_size,
                           gen_batch_size=args.gen_batch_size,
                           max_new_tokens=args.max_new_tokens)
    router = Router.load(args.router) if args.router else None
    urls = start_service(args.checkpoint, options, router)
    return {"direct": urls.direct[0], "proxy": urls.proxy}


def free_port(span: int = 1) -> int:
    """The first of ``span`` consecutive ports free on 127.0.0.1 right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + span <= 65536 and all(_free(p) for p in range(first, first + span)):
            return first
    raise RuntimeError(f"no {span} consecutive free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--router", default=None, help="router file: also run mode auto")
    parser.add_argument("--requests", type=int, default=300, help="disc requests")
    parser.add_argument("--gen-requests", type=int, default=64)
    parser.add_argument("--auto-requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--inputs-per-request", type=int, default=1)
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs (torch threads) of the "
                        "replica and of the in-process baseline")
    parser.add_argument("--disc-batch-size", type=int, default=None,
                        help="serve.disc_batch_size (default: inputs in flight)")
    parser.add_argument("--gen-batch-size", type=int, default=None,
                        help="serve.gen_batch_size (default: inputs in flight)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--encodings", default="float,base64",
                        help="response encoding_format(s) to load with, comma-separated")
    parser.add_argument("--via", default="direct,proxy",
                        help="ways in, comma-separated: direct (the replica's own server), "
                        "proxy (Serve's HTTP proxy)")
    parser.add_argument("--benchmark-dir", default=None)
    args = parser.parse_args()
    encodings = args.encodings.split(",")
    # One-input requests at a fixed concurrency never fill a larger batch: each would wait
    # out batch_wait_s.
    in_flight = args.concurrency * args.inputs_per_request
    args.disc_batch_size = args.disc_batch_size or in_flight
    args.gen_batch_size = args.gen_batch_size or in_flight
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from ray import serve

    torch.set_num_threads(max(1, int(args.cpus)))
    plan = [("disc", args.requests), ("gen", args.gen_requests)]
    if args.router:
        plan.append(("auto", args.auto_requests))
    urls = start(args)
    ways = {way: urls[way] for way in args.via.split(",")}
    rows = []
    try:
        for mode, count in plan:
            rows += run_mode(ways, args, mode, count, encodings)
    finally:
        serve.shutdown()
    return 1 if any(r["errors"] for r in rows) else 0


def run_mode(ways: dict[str, str], args: argparse.Namespace, mode: str, count: int,
             encodings: list[str]) -> list[dict[str, Any]]:
    """One row per way in and encoding: the load, then (not for auto, whose in-process cost
    depends on its routing) the in-process throughput on the same inputs, measured once for all
    rows."""
    sides = benchmark_inputs(count * args.inputs_per_request, args.benchmark_dir)
    items = [as_request_item(s) for s in sides]
    k = args.inputs_per_request
    requests = [items[i:i + k] for i in range(0, len(items), k)]
    rows = []
    for (way, url), encoding in itertools.product(ways.items(), encodings):
        load(url, requests[:args.concurrency], mode, args.concurrency, encoding)  # warm-up
        gen_before = EmbeddingClient(url).health()["stats"]["gen_inputs"]
        row = {"mode": mode, "way": way, "encoding": encoding,
               **load(url, requests, mode, args.concurrency, encoding)}
        if mode == "auto":
            routed = EmbeddingClient(url).health()["stats"]["gen_inputs"] - gen_before
            row["note"] = f"{routed} of {len(sides)} inputs routed to gen"
        rows.append(row)
    if mode != "auto":
        batch = args.disc_batch_size if mode == "disc" else args.gen_batch_size
        baseline = in_process(args.checkpoint, sides, mode, batch, args.max_new_tokens)
        for row in rows:
            row["in_process"], row["ratio"] = baseline, row["throughput"] / baseline
    for row in rows:
        print(_line(row), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    text = (f"{row['mode']:>4} {row['way']:>6} {row['encoding']:>6}: {row['requests']} requests, "
            f"{row['errors']} errors, "
            f"{row['request_rate']:.1f} req/s = {row['throughput']:.1f} inputs/s, "
            f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms")
    if "ratio" in row:
        text += (f"; in-process batched {row['in_process']:.1f} inputs/s, "
                 f"HTTP/in-process {row['ratio']:.2f}")
    return text + (f" ({row['note']})" if "note" in row else "")


if __name__ == "__main__":
    sys.exit(main())
