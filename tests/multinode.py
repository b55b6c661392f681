"""A multi-node Ray cluster on one machine, for the multi-node tests: a head and extra raylets
(``ray.cluster_utils.Cluster``), every one bound to and advertised on 127.0.0.1, each node
marked with a custom resource so that a pool can be sent to it (``rollout.resources``,
``learner.resources``). Nodes fail fast: the GCS declares a node dead after 3 missed health
checks 0.5 s apart (Ray's default is 5 x 3 s; the recipe keys do not depend on it).

Loopback: Ray rewrites every 127.0.0.1 it is given (``ray.init(address=...)``,
``_node_ip_address``) to the machine's outward address (``services.resolve_ip_for_localhost``)
unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` was in the environment when Ray was imported
(``ray_constants.ENABLE_RAY_CLUSTER`` is read once, at import). So it is set here, before any
import of Ray (tests/conftest.py sets it too), and ``LocalCluster`` refuses to start if Ray was
imported without it."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray's import: see above

LOOPBACK = "127.0.0.1"
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                      "health_check_initial_delay_ms": 0}
NODE_ARGS = {"node_ip_address": LOOPBACK, "object_store_memory": 100 << 20,
             "include_dashboard": False}


def free_port() -> int:
    """A TCP port free on loopback now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class LocalCluster:
    """The head (CPUs for the driver's tasks and the learners: ``learner_node``) and nodes
    added with one custom resource each; ``node_id(name)`` is a node's Ray id."""

    def __init__(self, head_cpus: float = 1, head_resources: dict[str, float] | None = None,
                 dashboard: bool = False):
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was "
                               "set: its 127.0.0.1 addresses would become the outward one")
        # Every node runs with this venv first on PATH, as a cluster node with umerl installed
        # does: a job's entrypoint `python -m umerl.cli` is resolved in the head's environment,
        # which `make test` (the venv's python, no activated venv) would otherwise not give.
        venv_bin = os.path.dirname(sys.executable)
        if os.environ.get("PATH", "").split(os.pathsep)[0] != venv_bin:
            os.environ["PATH"] = os.pathsep.join([venv_bin, os.environ.get("PATH", "")])
        # Ray's socket paths are length-capped: a short temp dir.
        self.temp_dir = tempfile.mkdtemp(prefix="mn", dir="/tmp")
        # Each node its own dashboard agent port: every node on this machine would take Ray's
        # default (52365), and a head whose agent lost that race cannot accept job submissions.
        head = {**NODE_ARGS, "dashboard_agent_listen_port": free_port(), "num_cpus": head_cpus,
                "temp_dir": self.temp_dir,
                "resources": head_resources or {}, "_system_config": FAST_HEALTH_CHECKS}
        if dashboard:
            head |= {"include_dashboard": True, "dashboard_host": LOOPBACK,
                     "dashboard_port": 8287}
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.nodes: dict[str, Any] = {"head": self.cluster.head_node}

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, name: str, cpus: float = 1, resources: dict[str, float] | None = None
            ) -> str:
        """A node with ``cpus`` CPUs and ``resources``; returns its node id."""
        # Its own runtime-env folder: the nodes share one session folder on this machine, and
        # a node setting up a job's working_dir would delete and unpack it again under the
        # job driver's feet (the driver's cwd gone: wandb's os.getcwd() fails).
        node = self.cluster.add_node(**NODE_ARGS, dashboard_agent_listen_port=free_port(),
                                     runtime_env_dir_name=f"runtime_resources_{name}",
                                     num_cpus=cpus, resources=resources or {})
        self.nodes[name] = node
        return node.node_id

    def remove(self, name: str, timeout_s: float = 60) -> None:
        """The node lost as a host is lost: its workers (the raylet's children) and the raylet
        SIGKILLed at once, and this returns only once the GCS has declared the node dead.
        Killing the workers first matters: a worker whose raylet died only notices after a
        while, and on a loaded machine could still finish the next step's call."""
        import psutil
        from ray._private import ray_constants

        node = self.nodes.pop(name)
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        workers = psutil.Process(raylet).children(recursive=True)
        for worker in workers:
            worker.kill()
        self.cluster.remove_node(node, allow_graceful=False)
        psutil.wait_procs(workers, timeout=timeout_s)
        self.wait_dead(node.node_id, timeout_s)

    def wait_dead(self, node_id: str, timeout_s: float) -> None:
        import ray

        deadline = time.monotonic() + timeout_s
        while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node_id} still alive to the GCS after {timeout_s} s")
            time.sleep(0.2)

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def shutdown(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextmanager
def connected(cluster: LocalCluster) -> Iterator[Any]:
    """The test process as the cluster's driver, on loopback, with the workers' environment."""
    import ray

    from umerl.runtime.ray_start import worker_env

    ray.init(address=cluster.address, _node_ip_address=LOOPBACK, logging_level="WARNING",
             runtime_env={"env_vars": worker_env()})
    try:
        yield ray
    finally:
        ray.shutdown()


def addresses(ray: Any) -> dict[str, Any]:
    """Every address the cluster advertises: the GCS's and each alive node's."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return {"gcs": ray.get_runtime_context().gcs_address,
            "nodes": sorted({n["NodeManagerAddress"] for n in nodes}),
            "object_managers": sorted({n.get("ObjectManagerAddress", n["NodeManagerAddress"])
                                       for n in nodes})}


def join(gcs_address: str) -> None:
    """Run one more node of the cluster at ``gcs_address`` in this process, until killed (as
    ``Cluster.add_node`` starts one; used where the node must live in another mount namespace)."""
    import time

    import ray._private.node
    from ray._private.parameter import RayParams

    params = RayParams(node_ip_address=LOOPBACK, gcs_address=gcs_address, num_cpus=0,
                       object_store_memory=100 << 20, include_log_monitor=False,
                       node_manager_port=0, min_worker_port=0, max_worker_port=0)
    params.dashboard_agent_listen_port = None
    ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    import sys

    join(sys.argv[1])
