"""Diagnose ZeRO-3 collective mismatches: log every parameter all-gather, release and
gradient reduce-scatter DeepSpeed issues on each rank, with module names, and compare.

Runs one learner step on 2 gloo ranks (CPU, DeepSpeed's CPU accelerator) with the tiny model
and the data layouts of ``tests/test_shared_media.py``; each rank writes its event log to
``<out>/trace_rank<r>.txt`` as it goes (flushed per line, so a hang leaves the logs), and
faulthandler dumps every thread's stack after ``--hang-s``. Then prints the first event where
the two ranks' collective sequences differ.

    python scripts/zero3_trace.py --out /tmp/z3 --data 0 1 --checkpointing
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _names(model: torch.nn.Module) -> dict[int, str]:
    return {id(m): n or "<root>" for n, m in model.named_modules()}


def install_trace(engine: Any, log_path: Path) -> None:
    """Wrap the ZeRO-3 coordinator's all-gather and release and the optimizer's reduce so
    each call appends a line: event, forward/backward, module name, parameter ids."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator as Coordinator,
    )

    names = _names(engine.module)
    log = open(log_path, "w", buffering=1)  # noqa: SIM115 (kept open for the run)
    state = {"module": "?", "forward": True}

    def line(text: str) -> None:
        log.write(text + "\n")

    fetch = Coordinator._fetch_sub_module_impl

    def traced_fetch(self, module, forward, is_leaf):
        state["module"], state["forward"] = names.get(id(module), type(module).__name__), forward
        if not forward or torch._C._current_graph_task_id() != -1:
            missing = [p.ds_id for p in module.parameters(recurse=False)
                       if p.ds_status.name == "NOT_AVAILABLE"]
            line(f"fetch {'fwd' if forward else 'bwd'} {state['module']} missing={missing}")
        return fetch(self, module, forward, is_leaf)

    gather = Coordinator._PartitionedParameterCoordinator__all_gather_params

    def traced_gather(self, params, forward):
        ids = sorted(p.ds_id for p in params if p.ds_status.name == "NOT_AVAILABLE")
        if ids:
            where = "fwd" if forward else "bwd"
            recompute = torch._C._current_graph_task_id() != -1
            line(f"GATHER {where}{'(in backward)' if recompute else ''} {state['module']} {ids}")
        return gather(self, params, forward)

    release = Coordinator.release_sub_module

    def traced_release(self, module, forward=False):
        line(f"release {'fwd' if forward else 'bwd'} {names.get(id(module), '?')}")
        return release(self, module, forward)

    invalidate = Coordinator._invalidate_trace

    def traced_invalidate(self):
        line(f"TRACE INVALIDATED at {state['module']}")
        return invalidate(self)

    Coordinator._invalidate_trace = traced_invalidate
    Coordinator._PartitionedParameterCoordinator__all_gather_params = traced_gather
    Coordinator._fetch_sub_module_impl = traced_fetch
    Coordinator.release_sub_module = traced_release
    optimizer = engine.optimizer
    reduce = optimizer._DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads

    def traced_reduce(dtype):
        bucket = optimizer.ipg_buckets[dtype]
        if bucket.params:
            line(f"REDUCE {sorted(p.ds_id for p in bucket.params)}")
        return reduce(dtype)

    optimizer._DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads = traced_reduce
    backward = engine.backward

    def traced_backward(loss, *args, **kwargs):
        line("=== backward")
        out = backward(loss, *args, **kwargs)
        line("=== backward done")
        return out

    engine.backward = traced_backward
    policy_forward = engine.module.forward

    def traced_forward(*args, **kwargs):
        grids = {k: v.tolist() for k, v in kwargs.items() if k.endswith("grid_thw")}
        line(f"=== forward grad={torch.is_grad_enabled()} rows={kwargs['input_ids'].shape[0]} "
             f"{grids}")
        return policy_forward(*args, **kwargs)

    engine.module.forward = traced_forward
    line("=== start")


def _rank_main(rank: int, port: int, model: str, out: str, data: tuple[int, int],
               checkpointing: bool, shared: bool, hang_s: float) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    out_path = Path(out)
    stacks = open(out_path / f"stacks_rank{rank}.txt", "w")  # noqa: SIM115
    faulthandler.dump_traceback_later(hang_s, exit=True, file=stacks)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_shared_media import _media, _pairs, _rollouts

    from umerl.config.recipe import load_recipe
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_process_group(rank, 2, "127.0.0.1", port, backend="gloo")
    cfg = load_recipe(None, [
        f"output_dir={out_path / 'run'}", "rl.pairs_per_step=4", "rl.group_size=4",
        "rl.lr=0.001", "learner.num_workers=2", "learner.zero_stage=3",
        f"learner.gradient_checkpointing={checkpointing}", "learner.micro_batch_size=2",
        f"learner.shared_media={shared}", "wandb.mode=disabled"])
    learner = Learner(cfg, model, model)
    install_trace(learner.engine, out_path / f"trace_rank{rank}.txt")
    pairs = _pairs(_media(out_path), data[rank])
    learner.step(StepShard(1, pairs, 2 * rank, *_rollouts(learner.bundle.tokenizer, pairs)))
    udist.barrier()
    faulthandler.cancel_dump_traceback_later()


def first_divergence(a: list[str], b: list[str]) -> int | None:
    """Index of the first collective (GATHER/REDUCE line) where the two logs differ."""
    ca = [x for x in a if x.startswith(("GATHER", "REDUCE"))]
    cb = [x for x in b if x.startswith(("GATHER", "REDUCE"))]
    for i, (x, y) in enumerate(zip(ca, cb)):
        if x.split()[0] != y.split()[0] or x.split("[")[-1] != y.split("[")[-1]:
            return i
    return None if len(ca) == len(cb) else min(len(ca), len(cb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="a tiny model dir (built if absent)")
    parser.add_argument("--data", type=int, nargs=2, default=(0, 1))
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--no-shared", action="store_true")
    parser.add_argument("--hang-s", type=float, default=150)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from umerl.train.dist import free_port

    model = args.model
    if model is None or not Path(model).exists():
        from umerl.model.tiny import build_tiny_model

        model = str(build_tiny_model(out / "tiny", family="qwen2_vl"))
    start = time.monotonic()
    context = mp.spawn(_rank_main, args=(free_port(), model, str(out), tuple(args.data),
                                         args.checkpointing, not args.no_shared, args.hang_s),
                       nprocs=2, join=False)
    try:
        while not context.join(timeout=5):
            pass
        print(f"finished in {time.monotonic() - start:.0f}s")
    except Exception as exc:  # a rank died (faulthandler exits a hung rank)
        print(f"a rank failed after {time.monotonic() - start:.0f}s: {exc}".splitlines()[0])
    logs = [(out / f"trace_rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    index = first_divergence(*logs)
    print("collective sequences identical" if index is None else
          f"first divergent collective: #{index}")
    if index is not None:
        for r, log in enumerate(logs):
            coll = [i for i, x in enumerate(log) if x.startswith(("GATHER", "REDUCE"))]
            at = coll[index] if index < len(coll) else len(log)
            print(f"--- rank {r} (log lines {max(0, at - 6)}..{at + 3})")
            print("\n".join(log[max(0, at - 6):at + 4]))


if __name__ == "__main__":
    main()
