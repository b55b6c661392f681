"""Without ``ray.address`` a job starts its own local Ray, whatever other Ray runs on the
machine (a `ray start` cluster, another job's local Ray, a stale ray_current_cluster file)."""

from __future__ import annotations

import ray
import ray._private.services as services

from umerl.config.recipe import load_recipe
from umerl.runtime.ray_start import init_ray

ELSEWHERE = "127.0.0.1:1"  # where Ray's discovery "finds" another cluster; nothing listens


def test_a_job_without_an_address_starts_its_own_ray_beside_another(monkeypatch, tmp_path):
    # What Ray's discovery returns when another Ray runs on this machine, or a stale
    # ray_current_cluster file names one.
    monkeypatch.setattr(services, "get_ray_address_from_environment",
                        lambda addr, temp_dir: ELSEWHERE)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(load_recipe(None, [f"output_dir={tmp_path}", "ray.num_cpus=1",
                                "ray.object_store_memory=268435456"]))
    try:
        gcs = ray.get_runtime_context().gcs_address
        assert gcs != ELSEWHERE and gcs.startswith("127.0.0.1:")
        # Nothing advertised on another interface: the GCS, the raylet, the object manager.
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]

        @ray.remote(num_cpus=0)
        def worker_ip() -> str:
            return ray.util.get_node_ip_address()

        assert ray.get(worker_ip.remote(), timeout=120) == "127.0.0.1"
        assert ray.cluster_resources()["CPU"] == 1
    finally:
        ray.shutdown()


LOOPBACK_PROBE = """
import json, sys
import ray  # imported before init_ray, as any module of the job may
from umerl.config.recipe import load_recipe
from umerl.runtime.ray_start import init_ray
init_ray(load_recipe(None, [f"output_dir={sys.argv[1]}", "ray.num_cpus=1",
                            "ray.object_store_memory=268435456"]))
print(json.dumps([ray.get_runtime_context().gcs_address.rsplit(":", 1)[0],
                  *[n["NodeManagerAddress"] for n in ray.nodes()]]))
ray.shutdown()
"""


def test_a_local_ray_advertises_only_loopback(tmp_path):
    """In a process without the tests' environment (conftest sets Ray's flag for the test
    process itself), a job's local Ray puts its GCS and node on 127.0.0.1, not on the
    machine's outward interface."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", LOOPBACK_PROBE, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["127.0.0.1", "127.0.0.1"]
