"""Every recipe against the cluster it is written for (and a smaller one), without starting a
job; the GRPO recipes' paper settings; the shared-output_dir check on a live local Ray and with
a simulated node whose marker the driver cannot see."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest

from umerl.config.cluster import (
    MARKER_PREFIX,
    check_cluster,
    check_shared_output_dir,
    nodes_from_ray,
    required_resources,
    write_markers,
)
from umerl.config.recipe import (
    RECIPES_DIR,
    ConfigError,
    load_recipe,
    load_recipe_with_sources,
    to_container,
)


def describe_cluster(spec: str) -> list[dict[str, float]]:
    """Node resources from ``NODESxGPUS[:CPUS]`` groups joined by ``+``: ``"2x8"`` is two
    nodes of 8 GPUs and 64 CPUs each, ``"2x8:96"`` with 96 CPUs, ``"1x8+2x4"`` mixed nodes."""
    nodes: list[dict[str, float]] = []
    for group in str(spec).replace(" ", "").split("+"):
        match = re.fullmatch(r"(\d+)x(\d+)(?::(\d+(?:\.\d+)?))?", group)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"cluster '{spec}': expected NODESxGPUS or NODESxGPUS:CPUS groups "
                             f"joined by '+', got '{group}'")
        count, gpus = int(match.group(1)), float(match.group(2))
        cpus = float(match.group(3) or 64)
        nodes.extend({"CPU": cpus, "GPU": gpus} for _ in range(count))
    return nodes


# recipe: (the cluster it is written for, a smaller one it must not fit)
CLUSTERS = {
    "cpu_tiny.yaml": ("1x0:2", "1x0:1"),
    "qwen2vl_2b_sft.yaml": ("1x8", "1x4"),
    "qwen2vl_7b_sft.yaml": ("2x8", "1x8"),
    "qwen2vl_2b_grpo.yaml": ("1x8", "1x4"),
    "qwen2vl_7b_grpo.yaml": ("1x8", "1x4"),
    "qwen2vl_7b_grpo_2node.yaml": ("2x8", "1x8"),
    "qwen2vl_2b_train.yaml": ("1x8", "1x4"),
    "qwen2vl_7b_train.yaml": ("2x8", "1x8"),
}
GRPO = ["qwen2vl_2b_grpo.yaml", "qwen2vl_7b_grpo.yaml", "qwen2vl_7b_grpo_2node.yaml"]
TRAIN = {"qwen2vl_2b_train.yaml": ("qwen2vl_2b_sft.yaml", "qwen2vl_2b_grpo.yaml"),
         "qwen2vl_7b_train.yaml": ("qwen2vl_7b_sft.yaml", "qwen2vl_7b_grpo_2node.yaml")}
# (section, num_workers, gpus_per_worker) of every pool, per stage
LAYOUTS = {
    "qwen2vl_2b_grpo.yaml": {"rl": [("rollout", 4, 1), ("learner", 4, 1)]},
    "qwen2vl_7b_grpo.yaml": {"rl": [("rollout", 2, 2), ("learner", 4, 1)]},
    "qwen2vl_7b_grpo_2node.yaml": {"rl": [("rollout", 4, 2), ("learner", 8, 1)]},
    "qwen2vl_2b_train.yaml": {"sft": [("sft", 8, 1)],
                              "rl": [("rollout", 4, 1), ("learner", 4, 1)]},
    "qwen2vl_7b_train.yaml": {"sft": [("sft", 16, 1)],
                              "rl": [("rollout", 4, 2), ("learner", 8, 1)]},
}


def recipe(name: str, *overrides: str):
    return load_recipe_with_sources(RECIPES_DIR / name, list(overrides))


def test_every_recipe_has_its_cluster_here() -> None:
    assert sorted(p.name for p in RECIPES_DIR.glob("*.yaml")) == sorted(CLUSTERS)


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_recipe_fits_the_cluster_it_is_written_for(name: str) -> None:
    cfg, sources = recipe(name)
    check_cluster(cfg, describe_cluster(CLUSTERS[name][0]), sources)


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_recipe_fails_on_a_smaller_cluster_naming_its_keys(name: str) -> None:
    cfg, sources = recipe(name)
    first = required_resources(cfg)[0]
    resource, unit = ("GPU", "GPUs") if first.gpus else ("CPU", "CPUs")
    with pytest.raises(ConfigError) as err:
        check_cluster(cfg, describe_cluster(CLUSTERS[name][1]), sources)
    message = str(err.value)
    for pool in first.pools:
        for key in (pool.key("count"), pool.key(resource)):
            assert f"'{key}' (from recipes/{name}:" in message or \
                f"'{key}' (from {RECIPES_DIR / name}:" in message, message
    assert f"= {first.total(resource):g} {unit}, but the cluster has" in message


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_gpu_recipes_pool_layouts(name: str) -> None:
    cfg, _ = recipe(name)
    stages = {s.name: [(p.section, p.count, p.gpus) for p in s.pools]
              for s in required_resources(cfg)}
    assert stages == LAYOUTS[name]
    if cfg.rl.enabled:
        assert int(cfg.rollout.tensor_parallel_size) == int(cfg.rollout.gpus_per_worker)


def test_stages_are_checked_one_at_a_time() -> None:
    # 8 SFT GPUs, then 4 + 4 RL GPUs: one 8-GPU node, not 16 GPUs.
    cfg, sources = recipe("qwen2vl_2b_train.yaml")
    assert [s.gpus for s in required_resources(cfg)] == [8, 8]
    check_cluster(cfg, describe_cluster("1x8"), sources)


def test_disabled_stage_asks_for_nothing() -> None:
    cfg, sources = recipe("qwen2vl_2b_train.yaml", "rl.enabled=false", "rollout.num_workers=64")
    assert [s.name for s in required_resources(cfg)] == ["sft"]
    check_cluster(cfg, describe_cluster("1x8"), sources)
    cfg, sources = recipe("qwen2vl_2b_train.yaml", "rollout.num_workers=64")
    with pytest.raises(ConfigError, match=r"command line 'rollout.num_workers=64'"):
        check_cluster(cfg, describe_cluster("1x8"), sources)


def test_the_total_message_spells_out_the_sum() -> None:
    cfg, _ = recipe("qwen2vl_2b_grpo.yaml", "learner.num_workers=8", "learner.micro_batch_size=4")
    with pytest.raises(ConfigError) as err:
        check_cluster(cfg, describe_cluster("1x8"))  # no sources: plain key names
    assert str(err.value) == (
        "the RL stage needs 'rollout.num_workers' x 'rollout.gpus_per_worker' + "
        "'learner.num_workers' x 'learner.gpus_per_worker' = 4 x 1 + 8 x 1 = 12 GPUs, but the "
        "cluster has 8 (1 node: 8 GPUs, 64 CPUs)")


def test_cpu_totals() -> None:
    cfg, sources = recipe("cpu_tiny.yaml", "rollout.cpus_per_worker=1")
    check_cluster(cfg, describe_cluster("1x0:3"), sources)
    with pytest.raises(ConfigError, match=r"'rollout.cpus_per_worker' \(from command line.*"
                       r"= 2 x 1 \+ 2 x 0.5 = 3 CPUs, but the cluster has 2"):
        check_cluster(cfg, describe_cluster("1x0:2"), sources)


def test_gpu_recipe_on_a_cpu_only_cluster() -> None:
    cfg, sources = recipe("qwen2vl_2b_grpo.yaml")
    with pytest.raises(ConfigError, match=r"= 8 GPUs, but the cluster has 0"):
        check_cluster(cfg, describe_cluster("4x0"), sources)
    with pytest.raises(ConfigError, match=r"but the cluster has 0 \(no nodes\)"):
        check_cluster(cfg, [], sources)


def test_a_tensor_parallel_actor_larger_than_any_node() -> None:
    # 4 + 4 GPUs fit 4 nodes x 2 GPUs in total, but one vLLM actor's 4 ranks need one node.
    overrides = ("rollout.num_workers=1", "rollout.gpus_per_worker=4",
                 "rollout.tensor_parallel_size=4")
    cfg, sources = recipe("qwen2vl_2b_grpo.yaml", *overrides)
    with pytest.raises(ConfigError) as err:
        check_cluster(cfg, describe_cluster("4x2"), sources)
    message = str(err.value)
    assert message.startswith("'rollout.gpus_per_worker' (from command line "
                              "'rollout.gpus_per_worker=4') = 4 GPUs per rollout actor")
    assert "tensor-parallel ranks" in message and "the most any node has: 2 GPUs" in message
    check_cluster(cfg, describe_cluster("1x4+2x2"), sources)  # one node holds the actor


def test_a_learner_bundle_larger_than_any_node() -> None:
    cfg, sources = recipe("qwen2vl_2b_grpo.yaml", "learner.num_workers=1",
                          "learner.cpus_per_worker=70")
    with pytest.raises(ConfigError, match=r"^'learner.cpus_per_worker' \(from command line "
                       r"'learner.cpus_per_worker=70'\) = 70 CPUs per learner rank.*most any "
                       r"node has: 64 CPUs"):
        check_cluster(cfg, describe_cluster("2x8"), sources)
    check_cluster(cfg, describe_cluster("2x8:72"), sources)


def test_a_bundle_whose_parts_fit_different_nodes_only() -> None:
    cfg, sources = recipe("qwen2vl_2b_grpo.yaml", "rollout.num_workers=1",
                          "learner.num_workers=1")
    nodes = [{"CPU": 4.0, "GPU": 8.0}, {"CPU": 64.0}]  # GPUs here, CPUs there
    with pytest.raises(ConfigError, match=r"'rollout.cpus_per_worker' .* = 8 CPUs and "
                       r"'rollout.gpus_per_worker' .* = 1 GPUs per rollout actor"):
        check_cluster(cfg, nodes, sources)


def test_bundles_that_fit_the_totals_but_not_the_nodes() -> None:
    tp5 = ("rollout.num_workers=3", "rollout.gpus_per_worker=5", "rollout.tensor_parallel_size=5",
           "learner.num_workers=1")
    cfg, sources = recipe("qwen2vl_2b_grpo.yaml", *tp5)
    with pytest.raises(ConfigError, match=r"cannot be packed onto its nodes \(2 nodes: 8 GPUs"):
        check_cluster(cfg, describe_cluster("2x8"), sources)  # 15 + 1 GPUs, but 5 + 5 > 8
    tp4 = ("rollout.num_workers=3", "rollout.gpus_per_worker=4", "rollout.tensor_parallel_size=4",
           "learner.num_workers=4")
    cfg, sources = recipe("qwen2vl_2b_grpo.yaml", *tp4)
    check_cluster(cfg, describe_cluster("2x8"), sources)  # 4 + 4 | 4 + 1 + 1 + 1 + 1


def test_describe_cluster() -> None:
    assert describe_cluster("2x8") == [{"CPU": 64.0, "GPU": 8.0}] * 2
    assert describe_cluster("1x8:96") == [{"CPU": 96.0, "GPU": 8.0}]
    assert describe_cluster("1x8 + 2x4:32") == [{"CPU": 64.0, "GPU": 8.0}] + \
        [{"CPU": 32.0, "GPU": 4.0}] * 2
    assert describe_cluster("1x0:2") == [{"CPU": 2.0, "GPU": 0.0}]
    for bad in ("", "8", "0x8", "2x", "2x8:", "ax8", "2x8+"):
        with pytest.raises(ValueError, match=r"expected NODESxGPUS"):
            describe_cluster(bad)


@pytest.mark.parametrize("name", GRPO + sorted(TRAIN))
def test_grpo_recipes_carry_the_paper_settings(name: str) -> None:
    cfg = load_recipe(RECIPES_DIR / name)
    r, learner = cfg.rl, cfg.learner
    assert (r.enabled, cfg.sft.enabled) == (True, name in TRAIN)
    assert (r.group_size, r.pairs_per_step, r.max_new_tokens) == (8, 32, 2048)
    assert (r.lr, r.kl_beta, r.clip_eps_low, r.clip_eps_high) == (1e-6, 0.04, 0.2, 0.28)
    assert (r.temperature, r.top_k, r.top_p) == (1.0, 50, 1.0)
    assert r.max_completion_length in (None, 2048)
    assert (learner.zero_stage, learner.bf16, learner.gradient_checkpointing) == (3, True, True)
    assert cfg.model.dtype == "bfloat16" and cfg.rollout.engine == "vllm"
    assert dict(learner.train) == {"llm": True, "projector": True, "vision": False}
    # every learner's share of rollouts splits into whole micro-batches of a sensible size
    rows = r.pairs_per_step // learner.num_workers * r.group_size
    assert 1 <= learner.micro_batch_size <= 8 and rows % learner.micro_batch_size == 0


@pytest.mark.parametrize("name", sorted(TRAIN))
def test_train_recipes_chain_the_paper_sft_and_grpo(name: str) -> None:
    sft_name, grpo_name = TRAIN[name]
    cfg, sft, grpo = (load_recipe(RECIPES_DIR / n) for n in (name, sft_name, grpo_name))
    assert to_container(cfg.model) == to_container(sft.model)
    assert to_container(cfg.sft) == to_container(sft.sft)
    for section in ("rl", "rollout", "learner"):
        assert to_container(cfg[section]) == to_container(grpo[section]), section
    assert to_container(cfg.eval) == to_container(sft.eval)


def recipe_commands(path: Path) -> list[list[str]]:
    """Each command of the header as argv: continuation lines (ending in ``\\``) joined."""
    commands, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if current:
            current += " " + text
        elif text.startswith(("umerl ", "ray job submit ")):
            current = text
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        commands.append(shlex.split(current))
        current = ""
    return commands


def run_as_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch):
    """What the real ``umerl`` command hands the driver for this argv: (config, sources)."""
    import umerl.driver
    from umerl.cli import main

    seen = []
    monkeypatch.setattr(umerl.driver, "train", lambda cfg, sources=None: seen.append(
        (cfg, sources)))
    monkeypatch.chdir(RECIPES_DIR.parent)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(argv) == 0 and len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("name", sorted(set(CLUSTERS) - {"cpu_tiny.yaml"}))
def test_header_names_the_commands_that_run_it(name: str, monkeypatch) -> None:
    commands = recipe_commands(RECIPES_DIR / name)
    subcommand = "rl" if name in GRPO else "train"
    direct = [c[1:] for c in commands if c[0] == "umerl"]
    jobs = [c for c in commands if c[:3] == ["ray", "job", "submit"]]
    assert direct and direct[0][:2] == [subcommand, f"recipes/{name}"], commands
    for argv in direct:
        cfg, sources = run_as_cli(argv, monkeypatch)
        assert cfg.ray.address == "auto"
        check_cluster(cfg, describe_cluster(CLUSTERS[name][0]), sources)
    if name.startswith(("qwen2vl_2b_sft", "qwen2vl_7b_sft")):
        return  # the SFT recipes name no job form
    assert len(jobs) == 1, commands
    job, cut = jobs[0], jobs[0].index("--")
    assert job[:cut] == ["ray", "job", "submit", "--address", "http://HEAD:8265",
                         "--working-dir", "."]
    assert job[cut + 1:cut + 6] == ["python", "-m", "umerl.cli", subcommand, f"recipes/{name}"]
    cfg, sources = run_as_cli(job[cut + 4:], monkeypatch)
    check_cluster(cfg, describe_cluster(CLUSTERS[name][0]), sources)
    # the job runs in an uploaded copy of this folder: its paths must be absolute; inside a
    # job RAY_ADDRESS names the cluster
    assert Path(cfg.output_dir).is_absolute() and Path(cfg.model.path).is_absolute()
    assert cfg.ray.address is None


# ---- the shared output_dir check ----------------------------------------------------------

NODE_A, NODE_B = "a" * 56, "b" * 56
TWO_NODES = [{"NodeID": NODE_A, "NodeManagerAddress": "10.0.0.1", "Alive": True},
             {"NodeID": NODE_B, "NodeManagerAddress": "10.0.0.2", "Alive": True}]


class FakeCluster:
    """A per-node writer for ``check_shared_output_dir``: nodes in ``local`` see ``output_dir``
    on a disk of their own (the same path, another file system); ``fail`` nodes cannot write."""

    def __init__(self, disks: Path, local: tuple[str, ...] = (), fail: dict | None = None,
                 silent: tuple[str, ...] = ()):
        self.disks, self.local, self.fail, self.silent = disks, local, fail or {}, silent
        self.calls: list[tuple[list[str], bool]] = []

    def folder(self, node_id: str, directory: str) -> Path:
        return self.disks / node_id / Path(directory).name if node_id in self.local \
            else Path(directory)

    def __call__(self, node_ids, directory, token, timeout_s, remove):
        self.calls.append((list(node_ids), remove))
        reports = {}
        for node_id in node_ids:
            if node_id in self.silent:
                continue
            if node_id in self.fail and not remove:
                reports[node_id] = self.fail[node_id]
                continue
            folder = self.folder(node_id, directory)
            folder.mkdir(parents=True, exist_ok=True)
            marker = folder / f"{MARKER_PREFIX}{node_id}"
            if remove:
                marker.unlink(missing_ok=True)
            else:
                marker.write_text(f"{node_id}\n{token}\n", encoding="utf-8")
            reports[node_id] = None
        return reports


def markers(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob(f"{MARKER_PREFIX}*")]


def test_shared_output_dir_seen_by_every_node(tmp_path: Path) -> None:
    out, cluster = tmp_path / "run", FakeCluster(tmp_path / "disks")
    check_shared_output_dir(out, nodes=TWO_NODES, writer=cluster, settle_s=0)
    assert cluster.calls == [([NODE_A, NODE_B], False)]
    assert out.is_dir() and markers(tmp_path) == []


def test_a_node_whose_marker_the_driver_cannot_see(tmp_path: Path) -> None:
    out, cluster = tmp_path / "run", FakeCluster(tmp_path / "disks", local=(NODE_B,))
    with pytest.raises(ConfigError) as err:
        check_shared_output_dir(out, nodes=TWO_NODES, writer=cluster, settle_s=0.3,
                                name="'output_dir' (from recipes/x.yaml:2)")
    message = str(err.value)
    assert message.startswith(f"'output_dir' (from recipes/x.yaml:2) = {out} must be on storage "
                              "every node can reach")
    assert f"node {NODE_B} (10.0.0.2) wrote {out / (MARKER_PREFIX + NODE_B)}" in message
    assert "cannot see" in message and NODE_A not in message
    # node b's marker on its own disk is removed there; nothing is left anywhere
    assert cluster.calls == [([NODE_A, NODE_B], False), ([NODE_B], True)]
    assert markers(tmp_path) == []


def test_a_node_that_cannot_write_or_does_not_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cluster = FakeCluster(tmp_path / "disks", fail={NODE_A: "/run: Permission denied"},
                          silent=(NODE_B,))
    with pytest.raises(ConfigError) as err:
        check_shared_output_dir(out, nodes=TWO_NODES, writer=cluster, settle_s=0)
    message = str(err.value)
    assert f"node {NODE_A} (10.0.0.1) could not write its marker: /run: Permission denied" \
        in message
    assert f"node {NODE_B} (10.0.0.2) could not write its marker: did not report" in message
    assert markers(tmp_path) == []


def test_a_stale_marker_does_not_count(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / f"{MARKER_PREFIX}{NODE_B}").write_text(f"{NODE_B}\nold-run\n", encoding="utf-8")
    cluster = FakeCluster(tmp_path / "disks", local=(NODE_B,))
    with pytest.raises(ConfigError, match=NODE_B):
        check_shared_output_dir(out, nodes=TWO_NODES, writer=cluster, settle_s=0)
    assert markers(tmp_path) == []


def test_one_node_needs_no_check(tmp_path: Path) -> None:
    cluster = FakeCluster(tmp_path / "disks", local=(NODE_A,))
    check_shared_output_dir(tmp_path / "run", nodes=TWO_NODES[:1], writer=cluster)
    assert cluster.calls == [] and not (tmp_path / "run").exists()


# ---- on a live local Ray ------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    old_tmp = os.environ.get("RAY_TMPDIR")
    ray_tmp = tempfile.mkdtemp(dir="/tmp", prefix="rc")  # Ray's socket paths are length-capped
    os.environ["RAY_TMPDIR"] = ray_tmp
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False,
             object_store_memory=128 << 20, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old_tmp is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = old_tmp
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_nodes_from_ray_against_the_recipe(local_ray) -> None:
    nodes = nodes_from_ray()
    assert len(nodes) == 1 and nodes[0]["CPU"] == 1.0 and nodes[0].get("GPU", 0.0) == 0.0
    cfg, sources = recipe("cpu_tiny.yaml")
    with pytest.raises(ConfigError, match=r"= 2 CPUs, but the cluster has 1 \(1 node"):
        check_cluster(cfg, nodes, sources)
    cfg, sources = recipe("cpu_tiny.yaml", "sft.num_workers=1", "rollout.num_workers=1",
                          "learner.num_workers=1")
    check_cluster(cfg, nodes, sources)


def test_shared_output_dir_on_one_live_node(local_ray, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    check_shared_output_dir(out, timeout_s=60)
    assert list(out.iterdir()) == []


def test_marker_tasks_on_the_live_node(local_ray, tmp_path: Path) -> None:
    here = local_ray.get_runtime_context().get_node_id()
    marker = tmp_path / f"{MARKER_PREFIX}{here}"
    assert write_markers([here], str(tmp_path), "tok", 60.0) == {here: None}
    assert marker.read_text(encoding="utf-8") == f"{here}\ntok\n"
    assert write_markers([here], str(tmp_path), "tok", 60.0, remove=True) == {here: None}
    assert not marker.exists()
    missing = tmp_path / "missing"
    report = write_markers([here], str(missing), "tok", 60.0)[here]
    assert report == f"{missing} does not exist on that node"


def test_a_node_that_is_gone(local_ray, tmp_path: Path) -> None:
    """The real writer, one live node and one that left the cluster: the live node's marker is
    seen and removed, the other node is named."""
    here = local_ray.get_runtime_context().get_node_id()
    gone = "ab" * (len(here) // 2)
    nodes = [{"NodeID": here, "NodeManagerAddress": "127.0.0.1"},
             {"NodeID": gone, "NodeManagerAddress": "10.9.9.9"}]
    with pytest.raises(ConfigError) as err:
        check_shared_output_dir(tmp_path, timeout_s=20, nodes=nodes, settle_s=0)
    message = str(err.value)
    assert f"node {gone} (10.9.9.9) could not write its marker: its marker task" in message
    assert f"node {here}" not in message
    assert markers(tmp_path) == []


def test_evaluation_task_must_fit_a_node() -> None:
    """eval.gpus_per_worker: the evaluation task is one more bundle, checked after training's."""
    from umerl.config.cluster import evaluation_resources

    cfg, sources = recipe("qwen2vl_2b_grpo.yaml")
    assert [(p.section, p.count, p.gpus) for s in evaluation_resources(cfg) for p in s.pools] \
        == [("eval", 1, 1.0)]
    check_cluster(cfg, describe_cluster("1x8"), sources)
    cfg, sources = recipe("qwen2vl_2b_grpo.yaml", "eval.gpus_per_worker=16")
    with pytest.raises(ConfigError, match=r"the EVAL stage needs 1 x 'eval\.gpus_per_worker' "
                                          r"\(from command line.*\) = 1 x 16 = 16 GPUs"):
        check_cluster(cfg, describe_cluster("1x8"), sources)
    with pytest.raises(ConfigError, match=r"'eval\.gpus_per_worker' .* = 8 GPUs per evaluation "
                                          r"task"):
        check_cluster(recipe("qwen2vl_2b_grpo.yaml", "eval.gpus_per_worker=8")[0],
                      describe_cluster("2x4"), sources)
