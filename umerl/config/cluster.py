"""What a recipe asks of the Ray cluster, checked against what the cluster has.

Each enabled stage runs on its own: the SFT on ``sft.num_workers`` Ray Train workers, then
GRPO on its rollout pool and learner pool together (two placement groups, alive at once). A
stage's resources are placement-group bundles, one per worker: ``{CPU: *.cpus_per_worker,
GPU: *.gpus_per_worker}``. Ray waits forever (here: until a 600 s timeout) for bundles that no
node can hold, so ``check_cluster`` fails first, naming the recipe keys: a stage's total GPUs or
CPUs over the cluster's, a bundle no single node can hold (a vLLM actor's tensor-parallel ranks
share one node: ``rollout.gpus_per_worker`` GPUs on one machine), or bundles that fit the
totals but cannot be packed onto the nodes.

``required_resources`` and ``check_cluster`` are pure (no Ray): they take the nodes as
resource mappings, which ``nodes_from_ray()`` reads from the live cluster (tests write them).
``check_shared_output_dir`` proves that every node of a multi-node cluster sees ``output_dir``
(checkpoints are written by workers on every node and read back by the driver).
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from umerl.config.origins import ConfigError, Sources

MARKER_PREFIX = ".umerl-shared-"
_EPS = 1e-6
_PACK_BUDGET = 200_000  # placement attempts before the packing search gives up (no error then)
_ROLES = {"sft": "SFT worker", "rollout": "rollout actor", "learner": "learner rank",
          "eval": "evaluation task"}


@dataclass(frozen=True)
class Pool:
    """``count`` workers of one recipe section (``sft``, ``rollout`` or ``learner``), each in
    its own placement-group bundle of ``cpus`` CPUs and ``gpus`` GPUs."""

    section: str
    count: int
    cpus: float
    gpus: float

    @property
    def role(self) -> str:
        return _ROLES.get(self.section, f"{self.section} worker")

    @property
    def bundle(self) -> dict[str, float]:
        """As the pools build it: no ``GPU`` key when the workers use none."""
        return {"CPU": self.cpus} | ({"GPU": self.gpus} if self.gpus > 0 else {})

    def key(self, resource: str) -> str:
        """The recipe key of one bundle's ``CPU`` or ``GPU``, or of the count (``count``)."""
        field = {"count": "num_workers", "CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}
        return f"{self.section}.{field[resource]}"

    def count_text(self, name: Callable[[str], str]) -> str:
        """The count's key as ``name`` shows it; evaluation is always one worker."""
        return "1" if self.section == "eval" else name(self.key("count"))

    def amount(self, resource: str) -> float:
        return self.bundle.get(resource, 0.0)


@dataclass(frozen=True)
class Stage:
    """One stage (``sft`` or ``rl``) and the pools that are alive together while it runs."""

    name: str
    pools: tuple[Pool, ...]

    @property
    def label(self) -> str:
        return self.name.upper()

    @property
    def bundles(self) -> list[dict[str, float]]:
        return [pool.bundle for pool in self.pools for _ in range(pool.count)]

    def total(self, resource: str) -> float:
        return sum(pool.count * pool.amount(resource) for pool in self.pools)

    @property
    def gpus(self) -> float:
        return self.total("GPU")

    @property
    def cpus(self) -> float:
        return self.total("CPU")


def required_resources(cfg: DictConfig) -> list[Stage]:
    """The enabled stages in the order they run, each with its pools' bundles."""

    def pool(section: str) -> Pool:
        c = cfg[section]
        return Pool(section, int(c.num_workers), float(c.cpus_per_worker),
                    float(c.gpus_per_worker))

    stages = []
    if cfg.sft.enabled:
        stages.append(Stage("sft", (pool("sft"),)))
    if cfg.rl.enabled:
        stages.append(Stage("rl", (pool("rollout"), pool("learner"))))
    return stages


def evaluation_resources(cfg: DictConfig) -> list[Stage]:
    """The evaluation task (before and after training), when it runs on the cluster's GPUs."""
    if not cfg.eval.enabled or float(cfg.eval.gpus_per_worker) <= 0:
        return []
    return [Stage("eval", (Pool("eval", 1, float(cfg.eval.cpus_per_worker),
                                float(cfg.eval.gpus_per_worker)),))]


def check_cluster(cfg: DictConfig, nodes: Sequence[dict[str, float]],
                  sources: Sources | None = None) -> None:
    """Raise ``ConfigError`` when an enabled stage asks for more than ``nodes`` hold.

    ``nodes``: one resource mapping per node, as ``ray.nodes()[i]["Resources"]``
    (``{"CPU": 64.0, "GPU": 8.0, ...}``). ``sources`` (from ``load_recipe_with_sources``) names
    where each key's value came from. Stages run one after the other, so each is checked alone.
    """
    name = sources.describe if sources is not None else (lambda key: f"'{key}'")
    for stage in required_resources(cfg) + evaluation_resources(cfg):
        for resource, unit in (("GPU", "GPUs"), ("CPU", "CPUs")):
            problem = _total_problem(stage, resource, unit, nodes, name)
            if problem:
                raise ConfigError(problem)
        for pool in stage.pools:
            problem = _bundle_problem(stage, pool, nodes, name)
            if problem:
                raise ConfigError(problem)
        if _packs(stage.bundles, nodes) is False:
            pools = ", ".join(f"{p.count_text(name)} = {p.count} bundles of "
                              f"{_show_bundle(p.bundle)} (one per {p.role})" for p in stage.pools)
            raise ConfigError(
                f"the {stage.label} stage's placement-group bundles ({pools}) fit the cluster's "
                f"totals but cannot be packed onto its nodes ({_show_nodes(nodes)}): each "
                "bundle must sit whole on one node; use fewer GPUs per worker or nodes that "
                "match them")


def _total_problem(stage: Stage, resource: str, unit: str, nodes: Sequence[dict[str, float]],
                   name: Callable[[str], str]) -> str | None:
    need, have = stage.total(resource), sum(float(n.get(resource, 0.0)) for n in nodes)
    if need <= have + _EPS:
        return None
    pools = [p for p in stage.pools if p.amount(resource) > 0]
    keys = " + ".join(f"{p.count_text(name)} x {name(p.key(resource))}" for p in pools)
    values = " + ".join(f"{p.count} x {_num(p.amount(resource))}" for p in pools)
    return (f"the {stage.label} stage needs {keys} = {values} = {_num(need)} {unit}, but the "
            f"cluster has {_num(have)} ({_show_nodes(nodes)})")


def _bundle_problem(stage: Stage, pool: Pool, nodes: Sequence[dict[str, float]],
                    name: Callable[[str], str]) -> str | None:
    bundle = pool.bundle
    if any(_fits(bundle, node) for node in nodes):
        return None
    short = [r for r in bundle if not any(_fits({r: bundle[r]}, n) for n in nodes)]
    named = short or list(bundle)  # each part fits some node, but no node holds all of them
    wanted = " and ".join(f"{name(pool.key(r))} = {_num(bundle[r])} {r}s" for r in named)
    why = ("one vLLM engine's tensor-parallel ranks (rollout.tensor_parallel_size) share one "
           "node" if pool.section == "rollout" and bundle.get("GPU", 0) > 1
           else "a bundle is never split across nodes")
    largest = ", ".join(f"{_num(max(float(n.get(r, 0.0)) for n in nodes) if nodes else 0)} "
                        f"{r}s" for r in named)
    return (f"{wanted} per {pool.role} in the {stage.label} stage: each {pool.role} is one "
            f"placement-group bundle ({_show_bundle(bundle)}) that must fit on one node ({why}), "
            f"but no node has that (the most any node has: {largest}; "
            f"{_show_nodes(nodes)})")


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(amount <= float(node.get(r, 0.0)) + _EPS for r, amount in bundle.items())


def _packs(bundles: list[dict[str, float]], nodes: Sequence[dict[str, float]]) -> bool | None:
    """Whether every bundle can sit whole on some node at once: an exact search (bundles of a
    stage come in at most two shapes); ``None`` when it ran out of budget (then no error)."""
    if len(bundles) > 900:  # the search recurses once per bundle
        return None
    resources = sorted({r for b in bundles for r in b})
    items = sorted((tuple(b.get(r, 0.0) for r in resources) for b in bundles), reverse=True)
    free = [[float(n.get(r, 0.0)) for r in resources] for n in nodes]
    budget = [_PACK_BUDGET]

    def place(i: int, first: int) -> bool | None:
        if i == len(items):
            return True
        tried: set[tuple[float, ...]] = set()
        # the same shape as the previous item: only nodes from its node on (no permutations)
        start = first if i and items[i] == items[i - 1] else 0
        for j in range(start, len(free)):
            state = tuple(free[j])
            if state in tried or any(a > f + _EPS for a, f in zip(items[i], free[j],
                                                                   strict=True)):
                continue
            tried.add(state)
            budget[0] -= 1
            if budget[0] < 0:
                return None
            free[j] = [f - a for f, a in zip(free[j], items[i], strict=True)]
            found = place(i + 1, j)
            free[j] = list(state)
            if found is not False:
                return found
        return False

    return place(0, 0)


def nodes_from_ray() -> list[dict[str, float]]:
    """The live cluster's alive nodes, one resource mapping each (Ray must be initialised)."""
    return [{k: float(v) for k, v in node.get("Resources", {}).items()}
            for node in _alive_nodes()]


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


Writer = Callable[[list[str], str, str, float, bool], dict[str, str | None]]


def check_shared_output_dir(output_dir: str | Path, timeout_s: float = 60.0, *,
                            name: str = "'output_dir'",
                            nodes: Sequence[dict[str, Any]] | None = None,
                            writer: Writer | None = None, settle_s: float = 10.0) -> None:
    """On a cluster of several alive nodes, each node writes a marker file into ``output_dir``
    and the driver must read every one back; else ``ConfigError`` naming ``name`` and the nodes
    whose markers it could not see. One node: nothing to check. The markers are removed.

    ``nodes``: node records as ``ray.nodes()`` gives them (default: the live cluster's alive
    ones). ``writer(node_ids, directory, token, timeout_s, remove)`` writes (or, with
    ``remove``, deletes) each node's marker on that node and returns ``{node_id: problem or
    None}``; the default runs one Ray task per node (``write_markers``). ``settle_s``: how long
    the driver waits for markers written elsewhere to appear (network file systems cache).
    """
    records = list(_alive_nodes() if nodes is None else nodes)
    if len(records) <= 1:
        return
    write = writer or write_markers
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    ids = [str(node["NodeID"]) for node in records]
    where = {str(n["NodeID"]): str(n.get("NodeManagerAddress") or "?") for n in records}
    token = uuid.uuid4().hex
    problems: dict[str, str] = {}
    seen: set[str] = set()
    try:
        reports = write(ids, str(directory), token, float(timeout_s), False)
        for node_id in ids:
            report = reports.get(node_id, "did not report")
            if report:
                problems[node_id] = f"could not write its marker: {report}"
        written = [i for i in ids if i not in problems]
        unseen = _wait_for_markers(directory, written, token, settle_s)
        seen = set(written) - set(unseen)
        for node_id in unseen:
            problems[node_id] = (f"wrote {_marker(directory, node_id)}, which the driver (on "
                                 f"{socket.gethostname()}) cannot see")
    finally:
        for node_id in ids:
            try:
                _marker(directory, node_id).unlink(missing_ok=True)
            except OSError:
                pass
        invisible = [i for i in ids if i not in seen]
        if invisible:  # markers on storage only their node sees: that node removes them
            try:
                write(invisible, str(directory), token, min(float(timeout_s), 10.0), True)
            except Exception:  # best effort: the check's own result matters more
                pass
    if problems:
        lines = "; ".join(f"node {node_id} ({where[node_id]}) {text}"
                          for node_id, text in problems.items())
        raise ConfigError(f"{name} = {directory} must be on storage every node can reach "
                          f"(checkpoints are written on every node and read by the driver): "
                          f"{lines}")


def _marker(directory: Path, node_id: str) -> Path:
    return directory / f"{MARKER_PREFIX}{node_id}"


def _marker_ok(directory: Path, node_id: str, token: str) -> bool:
    try:
        return _marker(directory, node_id).read_text(encoding="utf-8").split() == [node_id,
                                                                                    token]
    except (OSError, UnicodeDecodeError):
        return False


def _wait_for_markers(directory: Path, ids: list[str], token: str, settle_s: float) -> list[str]:
    deadline = time.monotonic() + max(0.0, settle_s)
    unseen = [i for i in ids if not _marker_ok(directory, i, token)]
    while unseen and time.monotonic() < deadline:
        time.sleep(0.25)
        unseen = [i for i in unseen if not _marker_ok(directory, i, token)]
    return unseen


def marker_task(directory: str, node_id: str, token: str, remove: bool = False) -> str | None:
    """Runs on node ``node_id``: write (or remove) its marker; a problem as text, else None."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    if here != node_id:
        return f"the marker task ran on node {here}, not on {node_id}"
    path = _marker(Path(directory), node_id)
    if remove:
        path.unlink(missing_ok=True)
        return None
    if not Path(directory).is_dir():
        return f"{directory} does not exist on that node"
    try:
        path.write_text(f"{node_id}\n{token}\n", encoding="utf-8")
    except OSError as err:
        return f"{path}: {err.strerror or err}"
    return None


def write_markers(node_ids: list[str], directory: str, token: str, timeout_s: float,
                  remove: bool = False) -> dict[str, str | None]:
    """One zero-CPU Ray task pinned to each node (``NodeAffinitySchedulingStrategy``, not
    soft) runs ``marker_task`` there; ``{node_id: problem or None}`` within ``timeout_s``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(marker_task)
    reports: dict[str, str | None] = {}
    refs = {}
    for node_id in node_ids:
        try:
            refs[node_id] = task.options(
                num_cpus=0, max_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            ).remote(directory, node_id, token, remove)
        except Exception as err:  # e.g. not a node id
            reports[node_id] = f"its marker task could not start: {_one_line(err)}"
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    for node_id, ref in refs.items():
        if ref not in done:
            reports[node_id] = f"its marker task did not finish within {timeout_s:g} s"
            try:
                ray.cancel(ref, force=True)
            except Exception:  # finished meanwhile, or already gone
                pass
            continue
        try:
            reports[node_id] = ray.get(ref)
        except Exception as err:  # the node died, or the task could not be scheduled there
            reports[node_id] = f"its marker task failed: {_one_line(err)}"
    return reports


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: " + " ".join(str(err).split())[:300]


def _num(x: float) -> str:
    return f"{x:g}"


def _show_bundle(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{r}: {_num(a)}" for r, a in sorted(bundle.items())) + "}"


def _show_nodes(nodes: Sequence[dict[str, float]]) -> str:
    if not nodes:
        return "no nodes"
    shapes: dict[tuple[float, float], int] = {}
    for n in nodes:
        shape = (float(n.get("GPU", 0.0)), float(n.get("CPU", 0.0)))
        shapes[shape] = shapes.get(shape, 0) + 1
    return ", ".join(f"{count} node{'s' if count > 1 else ''}: {_num(g)} GPUs, {_num(c)} CPUs"
                     f"{' each' if count > 1 else ''}" for (g, c), count in shapes.items())
