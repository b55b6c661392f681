"""`serve deploy` of `umerl serve CHECKPOINT --print-config`, through Ray's own CLI, on a local
Ray with its dashboard, all on 127.0.0.1; checks the deployed service answers the in-process
embeddings (which tests/test_serve.py shows `umerl serve` answers).

    python scripts/serve_deploy_check.py CHECKPOINT

Too slow for the default test suite (a `ray start` with the dashboard, and a deployment):
run it under the Ray lock (`flock /tmp/umerl-ray.lock ...`). Steps: print the config; `ray
start --head --block` with the dashboard on 127.0.0.1 (its own process, stopped by its pid at
the end, with what it started); `serve deploy serve.yaml -a http://127.0.0.1:PORT`;
disc and gen embeddings over HTTP against ``umerl.model.embed`` in this process; every TCP
port the Ray processes listen on is on loopback; `serve shutdown`; the Ray stopped and its
/tmp/ray/ray_current_cluster record removed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umerl.serve.client import EmbeddingClient, ServiceError  # noqa: E402

MAX_NEW_TOKENS = 8
TEXTS = ["a red square", "two blue circles", "what comes after seven?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], env: dict[str, str], timeout_s: float = 300) -> str:
    print("$ " + " ".join(command), flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode:
        raise RuntimeError(f"{command[0]} exited {done.returncode}:\n{done.stdout}\n"
                           f"{done.stderr}")
    return done.stdout


def wait_for(what: str, check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except (OSError, ServiceError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.5)


# 127.0.0.1 as an IPv6 socket shows it (IPv4-mapped): loopback too.
LOOPBACK_IPS = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def non_loopback_listeners(root_pid: int) -> tuple[list[str], list[str]]:
    """Listening TCP sockets of ``root_pid`` and its descendants not bound to loopback, as
    (unexpected, Ray Serve's own): each Serve replica's inter-deployment gRPC server binds
    ``[::]:0`` (hard-coded in Ray 2.60's ``serve/_private/replica.py``, no setting moves it),
    so a replica's one wildcard listener is reported apart (docs/serving-production.md)."""
    import psutil

    root = psutil.Process(root_pid)
    found: list[str] = []
    serve_grpc: list[str] = []
    for process in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(process.cmdline()) or process.name()
            listening = [c for c in process.net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN and c.laddr.ip not in LOOPBACK_IPS]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        wildcard = [c for c in listening if c.laddr.ip == "::"]
        for c in listening:
            where = f"{name[:60]} ({process.pid}) on {c.laddr.ip}:{c.laddr.port}"
            replica_grpc = "ServeReplica" in name and wildcard == [c]
            (serve_grpc if replica_grpc else found).append(where)
    return found, serve_grpc


def stop(head: subprocess.Popen) -> None:
    """Stop `ray start --block` and every process it started (by pid: this Ray's only)."""
    import psutil

    tree = psutil.Process(head.pid).children(recursive=True)
    head.send_signal(signal.SIGINT)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    alive = [p for p in tree if p.is_running()]
    for process in alive:
        process.terminate()
    _, left = psutil.wait_procs(alive, timeout=20)
    for process in left:
        process.kill()


def forget_cluster(address: str) -> None:
    """`ray start` records its cluster in /tmp/ray/ray_current_cluster, where a later
    ``ray.init()`` without an address would try to join it: remove that record if it is
    this (stopped) cluster's."""
    record = Path("/tmp/ray/ray_current_cluster")
    try:
        if record.read_text().strip() == address:
            record.unlink()
    except OSError:  # no record, or another's
        pass


def expected_embeddings(checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
    from rollout.transformers_engine import TransformersEngine
    from umerl.data.formats import Side
    from umerl.model.embed import disc_embeddings, gen_embeddings
    from umerl.model.loading import load_policy
    from umerl.model.sampling import SamplingParams

    bundle = load_policy(checkpoint)
    sides = [Side(text=t) for t in TEXTS]
    greedy = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    gen = gen_embeddings(bundle, TransformersEngine(bundle), sides, 1, greedy)
    return disc_embeddings(bundle, sides).numpy(), gen.embeddings[:, 0].numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    checkpoint = str(Path(args.checkpoint).resolve())
    # The CLIs and Ray's processes: loopback kept (umerl.runtime.ray_start.keep_on_loopback),
    # this checkout importable, no API key (the builder would read one on the cluster).
    env = {k: v for k, v in os.environ.items() if k != "UMERL_API_KEY"}
    root = str(Path(__file__).resolve().parents[1])
    env |= {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)}
    port, dashboard = free_port(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="umerl-deploy-"))
    config = folder / "serve.yaml"
    config.write_text(run([sys.executable, "-m", "umerl.cli", "serve", checkpoint,
                           "--print-config", f"serve.port={port}", "serve.direct_port=null",
                           "serve.model_name=tiny", f"serve.max_new_tokens={MAX_NEW_TOKENS}"],
                          env))
    print(config.read_text(), flush=True)
    ray_bin = str(Path(sys.executable).parent)
    gcs = free_port()
    head = subprocess.Popen(
        [f"{ray_bin}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--num-cpus=3", f"--object-store-memory={256 << 20}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for("Ray's dashboard", lambda: urllib.request.urlopen(
            f"{address}/api/version", timeout=5).status == 200, 180)
        started = time.monotonic()
        print(run([f"{ray_bin}/serve", "deploy", str(config), "-a", address], env), flush=True)
        url = f"http://127.0.0.1:{port}"
        wait_for("the deployed service", lambda: EmbeddingClient(
            url, api_key="", timeout_s=10).health()["status"] == "ok", 300)
        print(f"deployed and healthy {time.monotonic() - started:.0f} s after serve deploy",
              flush=True)
        client = EmbeddingClient(url, api_key="")
        disc = client.embed(TEXTS, mode="disc").vectors
        gen = client.embed(TEXTS, mode="gen").vectors
        want_disc, want_gen = expected_embeddings(checkpoint)
        gaps = (float(np.abs(disc - want_disc).max()), float(np.abs(gen - want_gen).max()))
        print(f"max |served - in-process|: disc {gaps[0]:.2e}, gen {gaps[1]:.2e}", flush=True)
        print(run([f"{ray_bin}/serve", "status", "-a", address], env), flush=True)
        outside, serve_grpc = non_loopback_listeners(head.pid)
        print("listening off loopback: " + (", ".join(outside) or "nothing"), flush=True)
        print("Ray Serve's inter-deployment gRPC on every interface (not configurable): "
              + (", ".join(serve_grpc) or "none"), flush=True)
        ok = max(gaps) < 1e-5 and not outside
        run([f"{ray_bin}/serve", "shutdown", "-a", address, "-y"], env)
    finally:
        stop(head)
        forget_cluster(f"127.0.0.1:{gcs}")
    print("OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
