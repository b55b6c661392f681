"""Load benchmark of the embedding service: a bounded run against a local Serve application.

    .venv/bin/python bench/bench_serve.py CHECKPOINT [--router R] [--requests 300]
        [--gen-requests 64] [--auto-requests 128] [--concurrency 8]
        [--encodings float,base64] [--via direct,proxy,local]

Starts Ray and the service on 127.0.0.1 (one replica, ``--cpus`` CPUs), sends requests of
``--inputs-per-request`` inputs (default 1) built from the bundled benchmark's test queries
(text, image and video inputs as data URLs) at a fixed concurrency, disc first, then gen, then
auto (with ``--router``), each once per response encoding (``encoding_format`` float and
base64) and per way in (``direct``: the replica's own HTTP server, ``serve.direct_port``;
``proxy``: through Serve's HTTP proxy; ``local``: the replica's code behind uvicorn in a child
process, no Ray, which needs no Ray lock), and prints per row the throughput, p50 and p99
latency, the error count, and the throughput (inputs/s) as a ratio to the same inputs embedded
in this process in batches (``umerl.model.embed``, the replica's largest batch size and the same
number of torch threads as the replica; after a warm-up batch, the better of two timings, so
the baseline is not understated).
Batch sizes default to concurrency x inputs per request.

``--hostile``: instead, per way in, disc load alone and disc load beside a hostile mix, in
``--repeats`` pairs whose order alternates (alone first, then beside first): bad
requests (10% of all requests sent: lone surrogates, control tokens, an EPS file sent as PNG,
JSON 10^5 deep, malformed JSON, a wrong content type) spread over the run, ``--slow-bodies``
connections that trickle a body until their 408, and one client that sends a request and
disconnects before the answer, every 0.25 s, from a process started (and imported) before
the timed run. Prints per pair the two throughputs, their ratio, the CPU milliseconds the
replica and the proxy spent per clean input (the hostile requests' cost included) and the
mix's own CPU seconds, then the medians, the clean requests' errors and what the hostile
requests got.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import multiprocessing
import os
import socket
import sys
import threading
import time
from collections import Counter
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
    from umerl.runtime.ray_start import keep_on_loopback, worker_env
    from umerl.serve.service import start_service

    port, direct_port = free_port(), free_port(span=DIRECT_PORT_SPAN)
    keep_on_loopback()  # else Ray advertises the outward address, not 127.0.0.1
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=max(2, int(args.cpus) + 1),
             include_dashboard=False, object_store_memory=256 << 20,
             runtime_env={"env_vars": worker_env()}, logging_level="ERROR")
    options = service_options(args, port=port, direct_port=direct_port)
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
                        "proxy (Serve's HTTP proxy), local (the replica's code behind uvicorn, "
                        "no Ray)")
    parser.add_argument("--serve-local", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--benchmark-dir", default=None)
    parser.add_argument("--hostile", action="store_true", help="disc load alone vs beside a "
                        "hostile mix (see above), per way in")
    parser.add_argument("--repeats", type=int, default=4, help="--hostile: pairs of runs (alone, "
                        "beside the mix)")
    parser.add_argument("--slow-bodies", type=int, default=3, help="--hostile: connections "
                        "trickling a body")
    parser.add_argument("--body-timeout-s", type=float, default=5.0,
                        help="serve.body_timeout_s (the slow bodies' 408 comes after it)")
    args = parser.parse_args()
    from umerl.preflight import check_checkpoint

    # Before Ray starts: a run's checkpoint root resolves to its latest checkpoint, a wrong
    # path is one line here instead of a replica failing to start again and again.
    args.checkpoint = str(check_checkpoint(args.checkpoint, "CHECKPOINT"))
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
    if args.serve_local:
        serve_local(args)
        return 0
    via = args.via.split(",")
    urls, local = {}, None
    if set(via) - {"local"}:
        urls = start(args)
    if "local" in via:
        local, urls["local"] = start_local(args)
    ways = {way: urls[way] for way in via}
    rows = []
    try:
        if args.hostile:
            rows = [run_hostile(way, url, args) for way, url in ways.items()]
        else:
            for mode, count in plan:
                rows += run_mode(ways, args, mode, count, encodings)
    finally:
        if local is not None:
            local.terminate()
            local.wait(timeout=30)
        if set(via) - {"local"}:
            serve.shutdown()
    return 1 if any(r["errors"] for r in rows) else 0


def service_options(args: argparse.Namespace, **ports: Any) -> Any:
    from umerl.serve.service import ServeOptions

    return ServeOptions(cpus_per_replica=args.cpus, disc_batch_size=args.disc_batch_size,
                        gen_batch_size=args.gen_batch_size, max_new_tokens=args.max_new_tokens,
                        body_timeout_s=args.body_timeout_s, **ports)


def start_local(args: argparse.Namespace) -> tuple[Any, str]:
    """``--via local``: this script, ``--serve-local PORT``, in a child process; its URL once
    it answers."""
    import subprocess

    port = free_port()
    command = [sys.executable, __file__, args.checkpoint, "--serve-local", str(port),
               "--cpus", str(args.cpus), "--disc-batch-size", str(args.disc_batch_size),
               "--gen-batch-size", str(args.gen_batch_size),
               "--max-new-tokens", str(args.max_new_tokens),
               "--body-timeout-s", str(args.body_timeout_s)]
    if args.router:
        command += ["--router", args.router]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            EmbeddingClient(url, api_key="", timeout_s=5).health()
            return process, url
        except (OSError, ServiceError):
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the local replica did not answer within 300 s")


def serve_local(args: argparse.Namespace) -> None:
    """The replica's own code (``EmbeddingService``) behind uvicorn, with no Ray: what the
    service's code costs without Ray Serve's HTTP layers (and without its cancelling a request
    whose client disconnects, so such a request is embedded here)."""
    import uvicorn
    from starlette.requests import Request

    from umerl.eval.router import Router
    from umerl.serve.service import EmbeddingService

    service = EmbeddingService(args.checkpoint, service_options(args),
                               Router.load(args.router) if args.router else None)

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        response = await service(Request(scope, receive))
        await response(scope, receive, send)

    uvicorn.run(app, host="127.0.0.1", port=args.serve_local, log_level="error")


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


def bad_bodies() -> list[tuple[bytes, str]]:
    """Requests a careless or hostile client sends: (body, content type)."""
    eps = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(eps, format="EPS")
    eps_url = "data:image/png;base64," + base64.b64encode(eps.getvalue()).decode()

    def body(inputs: list) -> bytes:
        return json.dumps({"input": inputs}).encode()

    return [(body(["a \ud800 b"]), "application/json"),
            (body(["a <|image_pad|> b"]), "application/json"),
            (body([{"image": eps_url}]), "application/json"),
            (b"[" * 100_000 + b"]" * 100_000, "application/json"),
            (b'{"input": [', "application/json"),
            (body(["fine text"]), "text/plain")]


def _raw_post(url: str, body: bytes, content_type: str, timeout_s: float = 60.0) -> int:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class HostileMix:
    """Bad requests paced over ``duration_s``, slow bodies and a disconnecting client, in
    threads, until ``stop``; ``outcomes`` counts what each kind got."""

    def __init__(self, url: str, bad_count: int, duration_s: float, slow_bodies: int):
        self.url, self.bad_count, self.duration_s = url, bad_count, duration_s
        self.slow_bodies = slow_bodies
        self.stop_event = threading.Event()
        self.outcomes: Counter = Counter()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def _count(self, kind: str, status: Any) -> None:
        with self.lock:
            self.outcomes[f"{kind}:{status}"] += 1

    def start(self) -> None:
        targets = [self._bad] + [self._slow] * self.slow_bodies + [self._disconnect]
        self.threads = [threading.Thread(target=t, daemon=True) for t in targets]
        for thread in self.threads:
            thread.start()

    def stop(self) -> Counter:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=30)
        return self.outcomes

    def _bad(self) -> None:
        bodies = bad_bodies()
        gap = self.duration_s / max(1, self.bad_count)
        for i in range(self.bad_count):
            if self.stop_event.wait(gap if i else 0):
                break
            body, content_type = bodies[i % len(bodies)]
            try:
                self._count("bad", _raw_post(self.url, body, content_type))
            except OSError as err:
                self._count("bad", type(err).__name__)

    def _slow(self) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        while not self.stop_event.is_set():
            try:
                with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
                    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: 1000"
                                 b"\r\n\r\n" + b'{"input": ')
                    answer = sock.recv(64)
                self._count("slow", answer.split(b" ")[1].decode() if answer else "closed")
            except OSError as err:
                self._count("slow", type(err).__name__)
                self.stop_event.wait(0.5)  # no spinning on a refused connection

    def _disconnect(self) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        body = json.dumps({"input": ["a request whose client leaves"]}).encode()
        while not self.stop_event.wait(0.25):
            try:
                with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
                    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                self._count("disconnect", "sent")
            except OSError as err:
                self._count("disconnect", type(err).__name__)


def _hostile_process(url: str, bad_count: int, duration_s: float, slow_bodies: int,
                     ready: Any, go: Any, stop: Any, results: Any) -> None:
    """The mix in its own process. It signals ``ready`` once imported and its bodies built,
    and starts only on ``go``: a spawned interpreter's start-up (imports, building the EPS
    file) is a second or two of CPU, which inside the timed run took it from the clean load on
    a 2-core machine."""
    mix = HostileMix(url, bad_count, duration_s, slow_bodies)
    bad_bodies()  # Pillow's EPS writer imported before the run, not during it
    ready.set()
    go.wait()
    cpu_start = time.process_time()
    mix.start()
    stop.wait()
    outcomes = dict(mix.stop())
    results.put((outcomes, time.process_time() - cpu_start))


def beside_the_mix(url: str, requests: list[list[dict]], bad_count: int, duration_s: float,
                   args: argparse.Namespace) -> tuple[dict[str, float], Counter, float]:
    """The clean load with the hostile mix running (from its first request to its last); what
    the hostile requests got and the CPU seconds the mix's own process used."""
    context = multiprocessing.get_context("spawn")
    ready, go, stop, results = (context.Event(), context.Event(), context.Event(),
                                context.Queue())
    # Its own process: the mix's threads would otherwise share the clean clients' GIL.
    mix = context.Process(target=_hostile_process, args=(url, bad_count, duration_s,
                                                         args.slow_bodies, ready, go, stop,
                                                         results))
    mix.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("the hostile mix process did not start")
        go.set()
        row = metered_load(url, requests, args.concurrency)
    finally:
        stop.set()
        outcomes, mix_cpu = results.get(timeout=120)
        mix.join(timeout=30)
    return row, Counter(outcomes), mix_cpu


def service_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by the service's processes (this process's descendants: the
    replica, Ray's or ``--via local``'s, and the HTTP proxy), by kind."""
    import psutil

    kinds = {"ServeReplica": "replica", "--serve-local": "replica", "ProxyActor": "proxy"}
    used = dict.fromkeys(kinds.values(), 0.0)
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline())
            times = process.cpu_times()
        except psutil.Error:  # gone meanwhile
            continue
        for marker, kind in kinds.items():
            if marker in title:
                used[kind] += times.user + times.system
    return used


def metered_load(url: str, requests: list[list[dict]],
                 concurrency: int) -> dict[str, Any]:
    """``load`` of disc requests, with the service's CPU milliseconds per clean input."""
    before = service_cpu_s()
    row: dict[str, Any] = load(url, requests, "disc", concurrency)
    after = service_cpu_s()
    inputs = sum(len(r) for r in requests)
    row["cpu_ms_per_input"] = {k: (after[k] - before[k]) / inputs * 1e3 for k in after}
    return row


def run_hostile(way: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Clean disc load alone and beside the hostile mix, in ``--repeats`` pairs whose order
    alternates (alone first, then beside first), so that a drift in the machine's load
    (other people's jobs) falls on both sides; each pair's ratio and their median."""
    sides = benchmark_inputs(args.requests * args.inputs_per_request, args.benchmark_dir)
    items = [as_request_item(s) for s in sides]
    k = args.inputs_per_request
    requests = [items[i:i + k] for i in range(0, len(items), k)]
    load(url, requests[:args.concurrency * 2], "disc", args.concurrency)  # warm-up
    bad_count = max(1, len(requests) // 9)  # 10% of everything sent
    duration = len(requests) / load(url, requests[:args.concurrency * 8], "disc",
                                    args.concurrency)["request_rate"]
    pairs: list[dict[str, Any]] = []
    outcomes: Counter = Counter()
    for i in range(args.repeats):
        pair: dict[str, Any] = {}
        for kind in (("alone", "beside") if i % 2 == 0 else ("beside", "alone")):
            if kind == "alone":
                pair["alone"] = metered_load(url, requests, args.concurrency)
                duration = requests_wall(pair["alone"])  # the mix's pacing follows the load
                continue
            pair["beside"], got, pair["mix_cpu_s"] = beside_the_mix(url, requests, bad_count,
                                                                    duration, args)
            outcomes += got
        pair["ratio"] = pair["beside"]["throughput"] / pair["alone"]["throughput"]
        pairs.append(pair)
        print(f"hostile {way:>6} pair {i + 1} ({'alone first' if i % 2 == 0 else 'beside first'}):"
              f" alone {pair['alone']['throughput']:.1f} inputs/s, beside the mix "
              f"{pair['beside']['throughput']:.1f} inputs/s, ratio {pair['ratio']:.2f}; service "
              f"CPU ms per clean input alone {_cpu(pair['alone'])}, beside "
              f"{_cpu(pair['beside'])}; the mix's process used {pair['mix_cpu_s']:.1f} CPU s "
              f"in {requests_wall(pair['beside']):.1f} s", flush=True)
    ratios = [p["ratio"] for p in pairs]
    cpu = {side: {kind: float(np.median([p[side]["cpu_ms_per_input"][kind] for p in pairs]))
                  for kind in pairs[0][side]["cpu_ms_per_input"]} for side in ("alone", "beside")}
    row = {"way": way, "errors": sum(p[k]["errors"] for p in pairs for k in ("alone", "beside")),
           "cpu_ms_per_input": cpu,
           "pairs": pairs, "ratios": ratios, "median_ratio": float(np.median(ratios)),
           "alone_median": float(np.median([p["alone"]["throughput"] for p in pairs])),
           "beside_median": float(np.median([p["beside"]["throughput"] for p in pairs])),
           "outcomes": dict(sorted(outcomes.items()))}
    print(f"hostile {way:>6}: {len(requests)} clean disc requests, {args.repeats} pairs; median "
          f"alone {row['alone_median']:.1f} inputs/s, median beside the mix "
          f"{row['beside_median']:.1f} inputs/s; median service CPU ms per clean input alone "
          f"{_cpu({'cpu_ms_per_input': cpu['alone']})}, beside "
          f"{_cpu({'cpu_ms_per_input': cpu['beside']})}; pair ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)}, median {row['median_ratio']:.2f}; clean "
          f"errors {row['errors']}; hostile outcomes {row['outcomes']}", flush=True)
    return row


def _cpu(row: dict[str, Any]) -> str:
    return ", ".join(f"{kind} {ms:.2f}" for kind, ms in row["cpu_ms_per_input"].items())


def requests_wall(row: dict[str, float]) -> float:
    """A load's wall time, in seconds."""
    return row["requests"] / row["request_rate"]


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
