"""What the SFT workers and the RL learners share: the DeepSpeed engine and its checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from umerl.model.loading import PolicyBundle, save_policy
from umerl.model.policy import PolicyModule
from umerl.train import checkpoint as ckpt
from umerl.train import dist as udist


def parameter_group(name: str) -> str:
    """Which part of a Qwen-VL model a parameter belongs to: vision, projector or llm."""
    if ".visual." in f".{name}":
        return "projector" if "merger" in name else "vision"
    return "llm"


def set_trainable(model: torch.nn.Module, train: dict[str, bool]) -> dict[str, int]:
    """Freeze what the recipe does not train; returns trainable parameter counts per part."""
    counts = {"llm": 0, "projector": 0, "vision": 0}
    for name, param in model.named_parameters():
        part = parameter_group(name)
        param.requires_grad_(bool(train[part]))
        if param.requires_grad:
            counts[part] += param.numel()
    if not any(counts.values()):
        raise ValueError("train: every part is frozen; nothing to train")
    return counts


def cosine_schedule(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    warmup = max(0, round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1)))

    return factor


def prepare_for_training(model: torch.nn.Module, gradient_checkpointing: bool) -> None:
    """Train mode (``load_policy`` returns eval mode, and transformers only checkpoints layers
    in training mode), with gradient checkpointing when asked. Non-reentrant: with a frozen
    vision tower the first layer's inputs need no grad, which the reentrant variant rejects."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def policy_module(bundle: PolicyBundle, zero_stage: int) -> PolicyModule:
    """The module a DeepSpeed engine trains. Under ZeRO-3 every forward calls the vision tower
    for both modalities (blank media for one the micro-batch lacks), so ranks whose batches
    differ in images or videos still make the same collectives (``PolicyModule``)."""
    lockstep = bundle.encoder.blank_media() if int(zero_stage) == 3 else None
    return PolicyModule(bundle.model, bundle.disc_id, bundle.gen_id, lockstep_media=lockstep)


def build_engine(
    module: torch.nn.Module, *, lr: float, weight_decay: float, total_steps: int,
    warmup_ratio: float, min_lr_ratio: float, micro_batch_size: int,
    gradient_accumulation_steps: int, grad_clip: float, zero_stage: int, bf16: bool,
) -> Any:
    """A DeepSpeed engine over ``module``'s trainable parameters, cosine schedule with warmup."""
    udist.configure_accelerator()
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    # A client torch AdamW: DeepSpeed's fused/CPU Adam would JIT-compile for minutes on CPU.
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(total_steps, warmup_ratio, min_lr_ratio)
    )
    config = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(gradient_accumulation_steps),
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": int(zero_stage)},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    udist.disable_deepspeed_jit_ops()
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine


def full_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """ZeRO-3 shards parameters: gather them (a collective: every rank calls this; only rank 0
    gets the dict, the others None). Below stage 3 every rank holds all parameters and None
    means "the module's own"."""
    if int(zero_stage) != 3:
        return None
    state = engine._zero3_consolidated_16bit_state_dict()
    if state is None:  # ranks other than 0
        return None
    return {k.removeprefix("model."): v for k, v in state.items()}


def save_checkpoint(
    engine: Any, bundle: PolicyBundle, root: Path, step: int, stage: str,
    client_state: dict[str, Any], zero_stage: int, keep_last: int,
    midway: Callable[[], None] | None = None,
) -> Path:
    """Collective save: every rank writes its DeepSpeed state into the staging folder, rank 0
    writes the Hugging Face weights and commits (see ``umerl.train.checkpoint``). ``midway`` runs
    between the two (fault injection: a death there must leave the last checkpoint intact)."""
    rank = udist.rank()
    if rank == 0:
        ckpt.begin(root, step)
    udist.barrier()
    staging = ckpt.partial_dir(root, step)
    engine.save_checkpoint(str(staging / ckpt.TRAIN_STATE), tag="ds",
                           client_state={**client_state, "step": step, "stage": stage},
                           save_latest=False)
    torch.save(udist.rng_state(), staging / ckpt.TRAIN_STATE / f"rng_rank{rank}.pt")
    if midway is not None:
        midway()
    state_dict = full_state_dict(engine, zero_stage)
    if rank == 0:
        save_policy(bundle, staging, state_dict)
    udist.barrier()
    final = ckpt.step_dir(root, step)
    if rank == 0:
        final = ckpt.commit(root, step, stage, {"world_size": udist.world_size()})
        ckpt.prune(root, keep_last)
        print(f"[{stage}] checkpoint {final}", flush=True)
    udist.barrier()
    return final


def load_checkpoint(engine: Any, path: Path) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns client state."""
    _, client = engine.load_checkpoint(str(path / ckpt.TRAIN_STATE), tag="ds")
    rng_file = path / ckpt.TRAIN_STATE / f"rng_rank{udist.rank()}.pt"
    if rng_file.is_file():
        udist.set_rng_state(torch.load(rng_file, weights_only=False))
    return client
