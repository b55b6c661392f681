"""Chaos bench: each fault the RL stage must survive (or end by name), one run per fault.

    .venv/bin/python bench/bench_faults.py [--steps 8] [--at 6] [--only NAME,...] [key=value ...]
    .venv/bin/python bench/bench_faults.py --nodes [--steps 6] [--at 4]

``--nodes``: the node cases instead, on a local 3-node Ray (a head with the learner, two
rollout nodes, all on 127.0.0.1): a rollout node SIGKILLed with its raylet after step
``at - 1`` (the pool shrinks from 2 actors to 1 during step ``at``); in a second run, a
rollout node added then (the pool grows from 1 to 2 at the next step boundary); in a third,
two learner nodes added and the one holding the learner SIGKILLed after step ``at - 1``, with
a checkpoint every ``at - 2`` steps (so step ``at``'s update finds the learner dead and the
stage restarts from step ``at - 2``'s checkpoint on the other learner node, repeating step
``at - 1``; ``--at 4`` or more keeps that checkpoint off the lost step). Each row says when
the run noticed (the pool's line, or the stage's restart line), when the next step was
logged, the steps repeated, the pool size per step and whether every logged step's rewards
equal a fixed one-actor run's.

Runs ``umerl rl recipes/cpu_tiny.yaml`` from the tiny model (2 rollout actors, 2 learner actors,
a local Ray; ``--steps`` GRPO steps, a checkpoint every ``--steps // 2``) once without faults and
once per fault, the fault at step ``--at``, and prints per fault:

    detected   seconds from the fault to the run's first word about it (a replacement, a
               restart, a skipped update, the error line); for a hang this is the timeout
               that bounds it; "-" for the driver kill (nothing is left running to notice it:
               the same command, run again, resumes)
    outcome    recovered (the run finished) or failed, with the run's one-line error
    took       seconds from the fault to the next step logged (recovered) or to the exit
    lost       steps run twice (a restart from the last checkpoint) or never run
    exact      whether every step's rewards equal the clean run's

Times: the faulty actor or reward plug-in (``bench/fault_rewards.py``) stamps its ``[faults]``
line with the wall-clock time it fails (the driver kill is the bench's own); the run's reactions
are timed by the arrival of the driver's console lines. Hangs run with short timeouts
(``HANG_TIMEOUTS``), so their detection time is about the timeout that bounds them. Rewards
come from ``output_dir/metrics/rl.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path("/tmp/umerl-bench-faults")
REWARD_KEYS = ("reward/total", "reward/format", "reward/embedding", "reward/rank_score")
# Console lines that say the run noticed a fault (the first one after the injection counts).
NOTICED = ("[rollout] ", "[rl] learner", "umerl: error:")


@dataclass
class Fault:
    name: str
    overrides: list[str] = field(default_factory=list)
    # Called with the running job and the step to act at; for faults the bench itself injects.
    inject: Callable[[subprocess.Popen, Path, int], float] | None = None
    rerun: bool = False  # the fault ends the job: run the same command again to recover


# Short timeouts so a hang is bounded in seconds, not the defaults' minutes (kept in their
# order: the driver's call timeouts above the weight sync's own).
HANG_TIMEOUTS = ["rl.weight_sync_timeout_s=15", "rollout.call_timeout_s=20",
                 "learner.step_timeout_s=45", "rl.reward_timeout_s=20", "faults.stall_s=3600"]


def with_reward(plugin: str, at: int) -> str:
    """The recipe's two rewards plus one of bench/fault_rewards.py's, misbehaving at ``at``."""
    path = REPO / "bench" / "fault_rewards.py"
    return (f"rewards=[{{name: format}}, {{name: embedding}}, "
            f"{{name: '{path}:{plugin}', label: fault, kwargs: {{step: {at}}}}}]")


def faults(at: int, save_every: int) -> list[Fault]:
    save_at = max(save_every, at - at % save_every)  # the save step nearest before ``at``
    return [
        Fault("rollout killed mid-generate", [f"faults.kill=[rollout/1/{at}/generate]"]),
        Fault("rollout killed mid-weight-sync", [f"faults.kill=[rollout/0/{at}/weight_sync]"]),
        Fault("learner killed mid-update", [f"faults.kill=[learner/1/{at}/update]"]),
        Fault("learner killed mid-save", [f"faults.kill=[learner/0/{save_at}/save]"]),
        Fault("rollout hung mid-generate",
              [f"faults.stall=[rollout/1/{at}/generate]", *HANG_TIMEOUTS]),
        Fault("learner hung mid-update",
              [f"faults.stall=[learner/1/{at}/update]", *HANG_TIMEOUTS]),
        Fault("reward plug-in hangs", [with_reward("hang_at", at), *HANG_TIMEOUTS]),
        # Without std normalisation: divided by their group's std, even 3e38 rewards give
        # finite advantages.
        Fault("non-finite loss from then on",
              [with_reward("overflow_from", at), "rl.norm_adv_by_std=false"]),
        Fault("driver + local Ray SIGKILLed", inject=kill_session, rerun=True),
    ]


def command(out: Path, checkpoint: str, steps: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "umerl.cli", "rl", str(REPO / "recipes" / "cpu_tiny.yaml"),
            "--checkpoint", checkpoint, f"output_dir={out}", "rl.resume=auto",
            f"rl.max_steps={steps}", f"rl.save_every={max(1, steps // 2)}", "eval.enabled=false",
            *overrides]


def env() -> dict[str, str]:
    out = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out.pop("RAY_ADDRESS", None)
    return out


@dataclass
class Run:
    code: int
    lines: list[tuple[float, str]]  # (arrival time, line)
    injected: float | None


def run(argv: list[str], out: Path, inject: Callable | None = None, at: int = 0) -> Run:
    """The job in its own session; every console line timestamped on arrival."""
    proc = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=REPO)
    lines: list[tuple[float, str]] = []
    injected = None
    for line in proc.stdout:
        now = time.time()
        lines.append((now, line.rstrip()))
        if "[faults] " in line and "unix time " in line and injected is None:
            # stamped by the faulty actor or reward itself, at the moment it fails
            injected = float(line.rsplit("unix time ", 1)[1].split(")")[0])
        if inject is not None and injected is None and line.startswith(f"[rl] step {at - 1}/"):
            injected = inject(proc, out, at)
    return Run(proc.wait(), lines, injected)


def kill_session(proc: subprocess.Popen, out: Path, at: int) -> float:
    """SIGKILL the driver, its local Ray and every worker (all of the job's session)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == proc.pid:
                    os.kill(int(entry.name), signal.SIGKILL)
    return time.time()


def rewards(out: Path) -> tuple[list[int], dict[int, tuple]]:
    path = out / "metrics" / "rl.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    return ([m["step"] for m in lines],
            {m["step"]: tuple(m.get(k) for k in REWARD_KEYS) for m in lines})


def report(fault: Fault, runs: list[Run], out: Path, clean: dict[int, tuple], steps: int
           ) -> str:
    t0 = next((r.injected for r in runs if r.injected is not None), None)
    if t0 is None:
        return f"{fault.name:34s} the fault never fired"
    after = [(t, line) for r in runs for t, line in r.lines if t > t0]
    noticed = next((t for t, line in after
                    if line.startswith(NOTICED) or "update skipped" in line), None)
    order, got = rewards(out)
    final = runs[-1]
    if final.code == 0:
        resumed = next((t for t, line in after if line.startswith("[rl] step ")), None)
        outcome = "recovered"
        took = (resumed or after[-1][0]) - t0
    else:
        error = next((line for _, line in after if line.startswith("umerl: error:")), "")
        outcome = f"failed: {error.removeprefix('umerl: error: ')[:120]}"
        took = after[-1][0] - t0
    lost = len(order) - len(set(order)) + len([s for s in range(1, steps + 1) if s not in got])
    # A failed run has no rewards after the fault to compare: "-", not "no".
    exact = ("-" if final.code != 0 else
             "yes" if all(got.get(s) == v for s, v in clean.items()) else "no")
    detected = "-" if noticed is None else f"{noticed - t0:5.1f} s"
    return (f"{fault.name:34s} detected {detected:>8s}  took {took:5.1f} s  lost {lost}  "
            f"exact {exact:3s}  {outcome}")


class Stamped:
    """stdout that keeps each line with its arrival time (the in-process node runs)."""

    def __init__(self, out):
        self.out, self.lines, self.part = out, [], ""

    def write(self, text: str) -> int:
        self.out.write(text)
        self.part += text
        *done, self.part = self.part.split("\n")
        self.lines.extend((time.time(), line) for line in done)
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def node_faults(steps: int, at: int) -> list[str]:
    """A rollout node removed after step ``at - 1`` (so during step ``at``), one added then,
    and a learner node removed then (checkpoints every ``at - 2`` steps), on a local 3-node
    cluster (tests/multinode.py); rewards against a fixed one-actor run. The driver runs here
    (the pool's and the stage's own console lines are timed)."""
    sys.path.insert(0, str(REPO / "tests"))
    from multinode import LocalCluster, connected

    from umerl.config.recipe import load_recipe
    from umerl.data.tasks import ensure_benchmark
    from umerl.driver import absolute_paths
    from umerl.rl import run_rl
    from umerl.runtime.tracking import MemoryTracker

    bench_dir = ensure_benchmark(OUT / "benchmark").parent
    checkpoint = OUT / "tiny"

    def config(name: str, *overrides: str, learner_node: str = "learner_node"):
        # learner.resources given once: a second {..} override would merge into the first.
        cfg = load_recipe(REPO / "recipes" / "cpu_tiny.yaml", [
            f"output_dir={OUT / name}", f"data.benchmark_dir={bench_dir}", "rl.data=[]",
            f"rl.max_steps={steps}", f"rl.save_every={steps}", "rl.pairs_per_step=2",
            "rl.group_size=2", "rl.max_new_tokens=8", "wandb.mode=disabled",
            "learner.num_workers=1", f"learner.resources={{{learner_node}: 1}}",
            "rollout.resources={rollout_node: 1}", "rollout.replace_timeout_s=30", *overrides])
        cfg.rl.data = [str(bench_dir / "digits_cls" / "rl_pairs.jsonl")]
        return absolute_paths(cfg)

    class Hooked(MemoryTracker):
        def __init__(self, action):
            super().__init__()
            self.action, self.when = action, None

        def log(self, metrics, step: int) -> None:
            super().log(metrics, step)
            if step == at - 1 and self.when is None:
                self.when = time.time()
                self.action()

    def remove_learner_node() -> None:
        """The node holding the learner's placement group (learner_alt), lost."""
        import ray

        holding = {node for g in ray.util.placement_group_table().values()
                   if g["state"] == "CREATED"
                   and any("learner_alt" in b for b in g["bundles"].values())
                   for node in g["bundles_to_node_id"].values()}
        (node,) = holding
        cluster.remove(next(n for n in ("learnerA", "learnerB")
                            if n in cluster.nodes and cluster.node_id(n) == node))

    cluster = LocalCluster(head_cpus=1, head_resources={"learner_node": 1})
    rows = []
    folders = ("nfixed", "nlost", "nadd", "nlearner")
    try:
        cluster.add("rollout1", resources={"rollout_node": 1})
        cluster.add("rollout2", resources={"rollout_node": 1})
        with connected(cluster):
            subprocess.run(["rm", "-rf", *(str(OUT / n) for n in folders)])
            clean = MemoryTracker()
            run_rl(config("nfixed", "rollout.num_workers=1"), str(checkpoint),
                   str(checkpoint), clean)
            cases = [("rollout node removed", "lost with its node",
                      lambda: cluster.remove("rollout2"),
                      lambda: config("nlost", "rollout.num_workers=2", "rollout.min_workers=1")),
                     ("rollout node added", "added on node",
                      lambda: cluster.add("rollout3", resources={"rollout_node": 1}),
                      lambda: config("nadd", "rollout.num_workers=1", "rollout.max_workers=2")),
                     ("learner node removed", "restarting the RL stage",
                      remove_learner_node,
                      lambda: config("nlearner", "rollout.num_workers=1",
                                     f"rl.save_every={max(1, at - 2)}", "rl.max_failures=1",
                                     "learner.placement_timeout_s=60",
                                     learner_node="learner_alt"))]
            for name, said, action, make_config in cases:
                if name.startswith("learner"):  # two nodes that may hold the learner
                    for node in ("learnerA", "learnerB"):
                        cluster.add(node, resources={"learner_alt": 1})
                tracker, stamped = Hooked(action), Stamped(sys.stdout)
                sys.stdout = stamped
                try:
                    run_rl(make_config(), str(checkpoint), str(checkpoint), tracker)
                finally:
                    sys.stdout = stamped.out
                rows.append(node_row(name, tracker, stamped.lines, said, clean, steps, at))
                print(rows[-1], flush=True)
    finally:
        cluster.shutdown()
    return rows


def node_row(name: str, tracker, lines: list[tuple[float, str]], said: str, clean, steps: int,
             at: int) -> str:
    t0 = tracker.when
    noticed = next((t for t, line in lines if t > t0 and said in line), None)
    sizes = [int(m["rollout/pool_size"]) for _, m in tracker.logged]
    changed = next((i for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1]), None)
    # recovered: the first step logged after the run noticed (on the new pool size, or the
    # first step of the restarted stage)
    after = [t for t, line in lines if t > (noticed or t0) and line.startswith("[rl] step ")]
    order = [s for s, _ in tracker.logged]
    lost = len(order) - len(set(order)) + len([s for s in range(1, steps + 1) if s not in order])
    # every logged step (a repeated one too) against the fixed run's same step
    fixed = {s: [m[k] for k in REWARD_KEYS] for s, m in clean.logged}
    exact = (set(order) == set(fixed)
             and all([m[k] for k in REWARD_KEYS] == fixed[s] for s, m in tracker.logged))
    detected = "-" if noticed is None else f"{noticed - t0:5.1f} s"
    took = f"{after[0] - t0:5.1f} s" if after else "-"
    return (f"{name:22s} after step {at - 1}  detected "
            f"{detected:>8s}  took {took:>7s}  lost {lost}  exact {'yes' if exact else 'no':3s}"
            f"  steps logged {order}  pool per step {sizes} (changed at step "
            f"{changed + 1 if changed is not None else '-'})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--at", type=int, default=6, help="the step each fault hits")
    parser.add_argument("--only", default="", help="comma-separated fault names (substrings)")
    parser.add_argument("--nodes", action="store_true",
                        help="only the node faults: a rollout node removed, one added, a "
                             "learner node removed, on a local 3-node Ray (one Ray session at "
                             "a time on the machine)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.nodes:
        from umerl.model.tiny import build_tiny_model

        if not (OUT / "tiny" / "config.json").is_file():
            build_tiny_model(OUT / "tiny", family="qwen2_vl")
        rows = node_faults(args.steps, args.at)
        print(f"\n{args.steps} steps, each node change after step {args.at - 1}:")
        print("\n".join(rows))
        return
    from umerl.model.tiny import build_tiny_model

    checkpoint = OUT / "tiny"
    if not (checkpoint / "config.json").is_file():
        build_tiny_model(checkpoint, family="qwen2_vl")
    chosen = [f for f in faults(args.at, max(1, args.steps // 2))
              if not args.only or any(s in f.name for s in args.only.split(","))]
    base = command(OUT / "clean", str(checkpoint), args.steps, args.overrides)
    subprocess.run(["rm", "-rf", str(OUT / "clean")], check=True)
    clean_run = run(base, OUT / "clean")
    assert clean_run.code == 0, "\n".join(line for _, line in clean_run.lines[-30:])
    _, clean = rewards(OUT / "clean")
    print(f"clean: {len(clean)} steps", flush=True)
    rows = []
    for i, fault in enumerate(chosen):
        out = OUT / f"fault-{i}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        argv = command(out, str(checkpoint), args.steps, [*args.overrides, *fault.overrides])
        runs = [run(argv, out, fault.inject, args.at)]
        if fault.rerun:
            runs.append(run(argv, out))
        rows.append(report(fault, runs, out, clean, args.steps))
        print(rows[-1], flush=True)
    print(f"\n{args.steps} steps, each fault at step {args.at}, checkpoints every "
          f"{max(1, args.steps // 2)} steps:")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
