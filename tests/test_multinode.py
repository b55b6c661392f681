"""Multi-node runs on a local 3-node Ray cluster (tests/multinode.py): a head holding the
learners (``learner_node``) and two rollout nodes (``rollout_node``, one actor each), all on
127.0.0.1. Placement on chosen nodes, the weight sync across nodes (gloo: the nodes share an
address but not /dev/shm's role), the shared-output_dir check passing and failing with the
node named, a rollout node removed mid-run (the pool shrinks, rewards unchanged) and a node
joining (the pool grows at the next step boundary, the newcomer synced and digest-checked
before it generates), a learner node lost (the stage restarts on the remaining capacity, or
fails naming what is missing), and `ray job submit` against the cluster, its driver killed
after a checkpoint and the job submitted again (it resumes on the same cluster).

Every run here is 1 learner, 1-2 rollout actors, 2 pairs x G=2, 8 new tokens: the cluster's
CPUs are few (1 per node) and the raylets share the machine's cores."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from multinode import LOOPBACK, LocalCluster, addresses, connected
from test_rl import DETERMINED, determined, rl_config

from umerl.runtime.tracking import MemoryTracker

REPO = Path(__file__).resolve().parent.parent
ON_NODES = ("rollout.resources={rollout_node: 1}", "learner.resources={learner_node: 1}",
            "learner.num_workers=1", "rl.max_steps=4", "rl.save_every=2",
            "rollout.replace_timeout_s=20")


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(head_cpus=1, head_resources={"learner_node": 1}, dashboard=True)
    c.add("rollout1", cpus=1, resources={"rollout_node": 1})
    c.add("rollout2", cpus=1, resources={"rollout_node": 1})
    with connected(c) as ray:
        yield c, ray
    c.shutdown()


class Hooked(MemoryTracker):
    """A tracker that does something to the cluster once a step is logged (after its sync):
    the next step starts on the changed cluster."""

    def __init__(self, actions: dict[int, Callable[[], None]]):
        super().__init__()
        self.actions = actions

    def log(self, metrics, step: int) -> None:
        super().log(metrics, step)
        action = self.actions.pop(step, None)
        if action is not None:
            action()


def run(cfg, policy: Path, actions: dict[int, Callable[[], None]] | None = None):
    from umerl.rl import run_rl

    tracker = Hooked(actions or {})
    final = run_rl(cfg, str(policy), str(policy), tracker)
    return tracker, final


def test_the_cluster_is_on_loopback_only(cluster) -> None:
    c, ray = cluster
    seen = addresses(ray)
    assert seen["gcs"].startswith(f"{LOOPBACK}:"), seen
    assert seen["nodes"] == [LOOPBACK] and seen["object_managers"] == [LOOPBACK], seen
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 3
    assert sum(n["Resources"].get("rollout_node", 0) for n in alive) == 2


def test_pools_on_their_nodes_and_the_sync_across_nodes(cluster, tiny_model_dir,
                                                       benchmark_manifest, tmp_path) -> None:
    """The rollout actors on the two rollout nodes, the learner on the head: the weight sync
    picks gloo (rank 0 and the receivers are on different nodes, though all on 127.0.0.1: a
    choice by address would take shm) and every actor then holds the learner's weights."""
    from rollout.pool import RolloutPool
    from umerl.rl import WeightSync
    from umerl.train.learner import LearnerPool

    c, ray = cluster
    cfg = rl_config(tmp_path, benchmark_manifest.parent, *ON_NODES, "rollout.num_workers=2")
    learners = LearnerPool(cfg, str(tiny_model_dir), str(tiny_model_dir))
    rollout = RolloutPool(cfg.rollout, str(tiny_model_dir))
    try:
        assert learners.info[0]["node_id"] == c.node_id("head")
        assert sorted(rollout.nodes) == sorted([c.node_id("rollout1"), c.node_id("rollout2")])
        link = WeightSync.connect(cfg, learners, rollout)
        assert link.transport == "gloo"
        link.sync(digest=True)
        assert link.digest and not rollout.stale
    finally:
        rollout.shutdown()
        learners.shutdown()


def test_sft_workers_on_two_nodes(cluster, tiny_model_dir, benchmark_manifest,
                                  tmp_path) -> None:
    """sft.resources={sft_node: 1} and two nodes offering one each: Ray Train's two workers
    run one on each node (a node has room for one bundle), their gradients all-reduced over
    gloo across the nodes, and the stage writes its checkpoint."""
    from ray.util.state import list_actors

    from umerl.config.recipe import load_recipe
    from umerl.driver import absolute_paths, run_sft_stage

    c, ray = cluster
    bench = benchmark_manifest.parent
    cfg = absolute_paths(load_recipe(None, [
        f"output_dir={tmp_path}", f"data.benchmark_dir={bench}",
        f'sft.data=["{bench / "digits_cls" / "sft.jsonl"}"]', "sft.num_workers=2",
        "sft.resources={sft_node: 1}", "sft.max_steps=2", "sft.micro_batch_size=2",
        "sft.save_every=2", "wandb.mode=disabled"]))
    nodes = {c.add(name, cpus=1, resources={"sft_node": 1}) for name in ("sft1", "sft2")}
    try:
        final = run_sft_stage(cfg, str(tiny_model_dir))
        workers = list_actors(address=c.address, detail=True,
                              filters=[("class_name", "=", "RayTrainWorker")])
    finally:
        for name in ("sft1", "sft2"):
            c.remove(name)
    assert final.name == "step_00000002"
    assert len(workers) == 2 and {w.node_id for w in workers} == nodes, workers


def test_shared_output_dir_on_three_live_nodes(cluster, tmp_path) -> None:
    from umerl.config.cluster import MARKER_PREFIX, check_shared_output_dir

    check_shared_output_dir(tmp_path, timeout_s=60, settle_s=2)
    assert not list(tmp_path.glob(f"{MARKER_PREFIX}*"))


def created_groups(ray) -> set[str]:
    return {k for k, g in ray.util.placement_group_table().items() if g["state"] == "CREATED"}


def removed_in_time(ray, before: set[str], timeout_s: float = 10) -> set[str]:
    """The groups created since ``before`` still not removed after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (left := created_groups(ray) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_a_failed_stage_leaves_no_placement_group(cluster, tiny_model_dir, benchmark_manifest,
                                                  tmp_path) -> None:
    """The stage fails after both pools are placed (rl.weight_sync_transport=shm, but the
    rollout actor is on another node than the learner), and a learner pool fails in its setup
    (no checkpoint there): neither leaves a placement group behind. A left group whose node is
    lost is re-placed by Ray on the capacity the stage's restart needs."""
    from umerl.rl import run_rl
    from umerl.runtime.remote import WorkerError
    from umerl.train.learner import LearnerPool

    c, ray = cluster
    before = created_groups(ray)
    cfg = rl_config(tmp_path, benchmark_manifest.parent, *ON_NODES, "rollout.num_workers=1",
                    "rl.weight_sync_transport=shm")
    with pytest.raises(ValueError, match="rl.weight_sync_transport=shm needs every rollout"):
        run_rl(cfg, str(tiny_model_dir), str(tiny_model_dir))
    assert not removed_in_time(ray, before)
    with pytest.raises(WorkerError, match="learner rank 0"):
        LearnerPool(cfg, str(tmp_path / "none"), str(tmp_path / "none"))
    assert not removed_in_time(ray, before)


@pytest.fixture(scope="module")
def fixed(cluster, tiny_model_dir, benchmark_manifest, tmp_path_factory):
    """The reference: one rollout actor on rollout1, never resized."""
    cfg = rl_config(tmp_path_factory.mktemp("fixed"), benchmark_manifest.parent, *ON_NODES,
                    "rollout.num_workers=1")
    tracker, _ = run(cfg, tiny_model_dir)
    assert [m["rollout/pool_size"] for _, m in tracker.logged] == [1, 1, 1, 1]
    return determined(tracker)


def test_a_rollout_node_lost_then_one_joining(cluster, tiny_model_dir, benchmark_manifest,
                                              tmp_path, capsys, fixed) -> None:
    """2 rollout actors (rollout1, rollout2; rollout.min_workers=1, max_workers=2). After step
    1, rollout2 is SIGKILLed with its raylet: step 2 dispatches to its dead actor, the share
    goes to the survivor, the pool shrinks to 1 and the sync group is re-formed without it.
    After step 2 a fresh node (rollout3) joins: at the boundary after step 3 the pool adds an
    actor there, syncs it (digest-checked) and step 4 runs on 2 actors. Every step's rewards
    equal the fixed one-actor run's."""
    c, ray = cluster
    joined: list[str] = []
    lost = c.node_id("rollout2")
    cfg = rl_config(tmp_path, benchmark_manifest.parent, *ON_NODES, "rollout.num_workers=2",
                    "rollout.min_workers=1", "rollout.max_workers=2")
    start = time.monotonic()
    tracker, final = run(cfg, tiny_model_dir, {
        1: lambda: c.remove("rollout2"),
        2: lambda: joined.append(c.add("rollout3", cpus=1, resources={"rollout_node": 1})),
    })
    took = time.monotonic() - start
    out = capsys.readouterr().out
    assert [m["rollout/pool_size"] for _, m in tracker.logged] == [2, 1, 1, 2]
    assert [m["rollout/actors_lost"] for _, m in tracker.logged] == [0, 1, 1, 1]
    assert [m["rollout/actors_added"] for _, m in tracker.logged] == [0, 0, 1, 1]
    assert re.search(rf"rollout actor [01] lost with its node {lost[:12]} during generate at "
                     "step 2", out), out
    assert f"rollout actor 2 added on node {joined[0][:12]} after step 3" in out
    assert re.search(r"\[rl\] step 2/4 .* pool 1 ", out) and re.search(r"step 4/4 .* pool 2 ", out)
    assert determined(tracker) == fixed  # same rewards, KL, clip... whatever the pool size
    assert final.name == "step_00000004"
    recovery = [m["fault/recovery_s"] for _, m in tracker.logged]
    print(f"elastic run: 4 steps in {took:.1f} s; recovery seconds per step {recovery}")


def test_below_min_workers_waits_then_names_the_keys(cluster, tiny_model_dir,
                                                    benchmark_manifest, tmp_path) -> None:
    """min_workers=2 and the second rollout node gone for good: the pool waits
    rollout.replace_timeout_s for room, then the stage fails naming the keys."""
    from umerl.runtime.remote import WorkerError

    c, ray = cluster
    cfg = rl_config(tmp_path, benchmark_manifest.parent, *ON_NODES, "rollout.num_workers=2",
                    "rollout.min_workers=2", "rollout.replace_timeout_s=5")
    start = time.monotonic()
    with pytest.raises(WorkerError) as err:
        run(cfg, tiny_model_dir, {1: lambda: c.remove("rollout3")})
    message = str(err.value)
    assert message.startswith("rollout pool") and "rollout.min_workers=2" in message
    assert "rollout.replace_timeout_s=5 s" in message and "rollout.resources" in message
    assert time.monotonic() - start < 300


def test_check_shared_output_dir_names_a_node_with_its_own_disk(cluster, tmp_path) -> None:
    """A node started in a mount namespace of its own, where output_dir is a private tmpfs:
    its marker lands on a disk the driver does not see, and the check names that node."""
    from umerl.config.cluster import check_shared_output_dir
    from umerl.config.origins import ConfigError

    c, ray = cluster
    out = tmp_path / "run"
    out.mkdir()
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    # `ray start` refuses to join with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the node is
    # started the way Cluster.add_node starts one (tests/multinode.py's main).
    helper = Path(__file__).resolve().parent / "multinode.py"
    script = f"mount -t tmpfs tmpfs {out} && exec {sys.executable} {helper} {c.address}"
    log = (tmp_path / "node.log").open("w")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (new := {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before):
            assert time.monotonic() < deadline and proc.poll() is None, \
                "the node never came: " + (tmp_path / "node.log").read_text()[-3000:]
            time.sleep(0.5)
        (node,) = new
        with pytest.raises(ConfigError) as err:
            check_shared_output_dir(out, timeout_s=60, settle_s=1)
        message = str(err.value)
        assert f"node {node} ({LOOPBACK}) wrote" in message and "cannot see" in message
        others = before - {node}
        assert not any(f"node {other}" in message for other in others)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30  # dead to the GCS before the next test counts nodes
        while ({n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
               and time.monotonic() < deadline):
            time.sleep(0.5)


def node_holding(ray, resource: str) -> str:
    """The node of the one placement group whose bundles ask for ``resource``: a second one
    (a lost learner's group left in place, then re-placed by Ray) fails here."""
    table = ray.util.placement_group_table().values()
    groups = [g for g in table
              if g["state"] == "CREATED" and any(resource in b for b in g["bundles"].values())]
    assert len(groups) == 1, [(g["state"], g["bundles_to_node_id"]) for g in table]
    return next(iter(groups[0]["bundles_to_node_id"].values()))


def test_a_learner_node_lost(cluster, tiny_model_dir, benchmark_manifest, tmp_path, capsys,
                             fixed) -> None:
    """Two learner nodes (``learner_alt``), the one learner on one of them. That node is
    SIGKILLed after step 3 is logged (checkpoint at step 2): step 4's update finds the learner
    dead, the stage restarts from step 2's checkpoint on the other node, and steps 3 and 4
    repeat the fixed run's rewards. When the other node goes too (after the repeated step 3),
    the next restart cannot place the learner: it fails naming the keys and the nodes left."""
    from umerl.runtime.remote import WorkerError

    c, ray = cluster
    for name in ("learnerA", "learnerB"):
        c.add(name, cpus=1, resources={"learner_alt": 1})
    names = {c.node_id(n): n for n in ("learnerA", "learnerB")}
    removed: list[str] = []

    def remove_learner_node() -> None:
        removed.append(names[node_holding(ray, "learner_alt")])
        c.remove(removed[-1])

    # Not ON_NODES' learner.resources: a later {..} override merges into it, not replaces it.
    on_nodes = [o for o in ON_NODES if not o.startswith("learner.resources")]
    cfg = rl_config(tmp_path, benchmark_manifest.parent, *on_nodes, "rollout.num_workers=1",
                    "learner.resources={learner_alt: 1}", "rl.max_failures=2",
                    "learner.placement_timeout_s=20")
    tracker = Hooked({})
    seen = {"n": 0}

    def log(metrics, step, base=tracker.log):
        base(metrics, step)
        seen["n"] += 1
        if seen["n"] in (3, 4):  # step 3, then the repeated step 3
            remove_learner_node()

    tracker.log = log
    from umerl.rl import run_rl

    with pytest.raises(WorkerError) as err:
        run_rl(cfg, str(tiny_model_dir), str(tiny_model_dir), tracker)
    out = capsys.readouterr().out
    assert sorted(removed) == ["learnerA", "learnerB"], str(err.value)
    assert "restarting the RL stage from its last complete checkpoint (restart 1 of 2)" in out
    assert "step_00000002" in out
    logged = determined(tracker)
    assert [s for s, _ in logged] == [1, 2, 3, 3]
    assert logged[:3] == fixed[:3] and logged[3] == fixed[2]
    message = str(err.value)
    assert message.startswith("learner pool: learner.num_workers=1 bundles of")
    assert "learner_alt: 1" in message and "learner.placement_timeout_s=20 s" in message
    assert "learner.resources" in message


def job_actors(address: str, job_id: str) -> dict[str, list]:
    """The job's actors by class (every state: a finished job's actors are dead). The cluster
    by its address: without one, the state API takes the newest Ray on the machine."""
    from ray.util.state import list_actors

    found: dict[str, list] = {}
    for actor in list_actors(address=address, filters=[("job_id", "=", job_id)], detail=True,
                             limit=1000):
        found.setdefault(actor.class_name, []).append(actor)
    return found


def kill_driver_after(client, submission_id: str, out: Path, rl_step: int) -> str:
    """SIGKILL the job's driver once its RL stage has logged ``rl_step``, and wait until the job
    no longer reads as running; returns its Ray job id. The dashboard is asked about the job
    once a second at most (a loaded machine's dashboard falls behind on more)."""
    from test_job_submit import rl_lines

    deadline, driver, asked = time.monotonic() + 600, None, 0.0
    while not any(m["step"] >= rl_step for m in rl_lines(out)):
        assert time.monotonic() < deadline, f"RL step {rl_step} never came"
        if driver is None and time.monotonic() - asked > 1:  # found before the kill
            asked = time.monotonic()
            driver = client.get_job_info(submission_id).driver_info
        time.sleep(0.05)
    assert driver is not None, f"job {submission_id} has no driver"
    os.kill(int(driver.pid), signal.SIGKILL)
    while client.get_job_status(submission_id) == "RUNNING":
        assert time.monotonic() < deadline, "the killed job still reads as running"
        time.sleep(0.5)
    return driver.id


def alive_actors(address: str, job_id: str, timeout_s: float = 30) -> list:
    """The job's actors still alive after ``timeout_s`` (none, once Ray has cleaned up)."""
    deadline = time.monotonic() + timeout_s
    while (alive := [a for actors in job_actors(address, job_id).values() for a in actors
                     if a.state != "DEAD"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def test_ray_job_submit_to_the_cluster(cluster, tiny_model_dir, benchmark_manifest, tmp_path,
                                      fixed) -> None:
    """`ray job submit` of the fixed run's recipe (saved as a file): the job's driver on the
    head, its rollout actor on a rollout node, its learner on the head; the preflight's
    cluster checks run against the live nodes. Its driver is SIGKILLed once step 3 is logged
    (checkpoint at step 2), and the same command submitted again, as docs/multi-node.md tells
    a user whose driver died: the dead driver's actors and placement groups are gone, the new
    job resumes from step 2's checkpoint with its pools on the same kinds of node, and every
    logged step (the repeated ones too) equals the uninterrupted in-process run's."""
    from omegaconf import OmegaConf
    from ray.job_submission import JobSubmissionClient
    from test_job_submit import rl_lines

    c, ray = cluster
    c.add("rollout4", cpus=1, resources={"rollout_node": 1})
    out, recipe = tmp_path / "job", tmp_path / "recipe.yaml"
    OmegaConf.save(rl_config(out, benchmark_manifest.parent, *ON_NODES,
                             "rollout.num_workers=1"), recipe)  # the `fixed` run's recipe
    head = f"http://{LOOPBACK}:8287"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)

    def submit(*flags: str) -> subprocess.CompletedProcess:
        command = [
            str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head,
            "--working-dir", str(REPO), *flags, "--", "python", "-m", "umerl.cli", "rl",
            str(recipe), "--checkpoint", str(tiny_model_dir),
            # This cluster by name: Ray would otherwise resolve the job driver's address
            # itself (a `ray start` cluster's record in /tmp/ray once sent it to another Ray).
            "--address", c.address, f"output_dir={out}", "eval.enabled=false"]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        return proc

    before, client, first = created_groups(ray), JobSubmissionClient(head), uuid.uuid4().hex
    start = time.monotonic()
    submit("--no-wait", "--submission-id", first)
    job_id = kill_driver_after(client, first, out, rl_step=3)
    killed = time.monotonic()
    assert not removed_in_time(ray, before, timeout_s=30), "the dead driver's groups stayed"
    assert not alive_actors(c.address, job_id), "the dead driver's actors stayed"
    cleaned = time.monotonic()
    steps = [m["step"] for m in rl_lines(out)]
    assert steps[:3] == [1, 2, 3] and len(steps) <= 4, steps

    proc = submit("--submission-id", f"{first}-again")
    print(f"job submit: to the kill after step 3 {killed - start:.1f} s, the dead driver's "
          f"pools gone {cleaned - killed:.1f} s later, the resubmitted job "
          f"{time.monotonic() - cleaned:.1f} s")
    output = proc.stdout + proc.stderr
    assert "[driver] joined the Ray cluster" in output and "weight sync gloo" in output
    assert re.search(r"\[rl\] resumed from \S*step_00000002: steps 3\.\.4", output), output
    logged = rl_lines(out)
    assert [m["step"] for m in logged] == [*steps, 3, 4]
    assert [m["rollout/pool_size"] for m in logged] == [1] * len(logged)
    reference = dict(fixed)
    assert [(m["step"], {k: m[k] for k in DETERMINED}) for m in logged] == \
        [(m["step"], reference[m["step"]]) for m in logged]
    again = client.get_job_info(f"{first}-again")
    pools = job_actors(c.address, again.driver_info.id)
    rollout_nodes = {n["NodeID"] for n in ray.nodes()
                     if n["Alive"] and n["Resources"].get("rollout_node")}
    assert [a.node_id for a in pools["LearnerActor"]] == [c.node_id("head")], pools
    assert len(pools["RolloutActor"]) == 1 and pools["RolloutActor"][0].node_id in rollout_nodes
    assert not removed_in_time(ray, before, timeout_s=30)


def test_determined_keys_include_the_rewards() -> None:
    assert {"reward/total", "reward/embedding", "actor/kl"} <= set(DETERMINED)
