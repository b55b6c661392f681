"""What the SFT workers and the RL learners share: the DeepSpeed engine and its checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from umerl.model.loading import PolicyBundle, save_policy
from umerl.model.policy import LOGPROB_CHUNK_TOKENS, PolicyModule
from umerl.train import checkpoint as ckpt
from umerl.train import dist as udist

MIN_REDUCE_BUCKET = 1 << 24  # elements: 64 MiB in fp32
CLIENT_STATE = "client_state.pt"  # in train_state/: step, stage, data cursor, rollouts ahead


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


class FiniteStepAdamW(torch.optim.AdamW):
    """AdamW that refuses an update from a non-finite loss or gradient, on every rank alike.

    DeepSpeed (0.19) calls this optimizer's ``step`` on the gradients it has reduced and
    clipped (stage 0 in fp32: the module's; ZeRO and bf16: each rank's fp32 partition, once
    per parameter group or ZeRO-3 sub-group), after the grad norm is known and before
    anything is applied. Some paths skip a non-finite norm themselves and never get here
    (ZeRO 1-2 in fp32, ZeRO-3, the bf16 optimizer of stage 0: ``engine.was_step_applied()``
    tells); fp32 stage 0 and ZeRO 1-2 in bf16 would apply it, a finite gradient from a
    non-finite loss passes them all, and a ZeRO rank sees only its partition. So every rank
    checks its own gradients and the losses it saw, and the ranks agree (one all-reduce)
    before any of them applies the step.
    """

    def __init__(self, params: Any, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.begin_step()

    def begin_step(self) -> None:
        """Forget the previous step's losses and verdict (call before its first backward)."""
        self.losses_finite = True
        self.skipped = False

    def note_loss(self, loss: torch.Tensor) -> None:
        self.losses_finite = self.losses_finite and bool(torch.isfinite(loss.detach()).all())

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        finite = self.losses_finite and (not grads or bool(
            torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()))
        if udist.on_every_rank(finite):
            return super().step(closure)
        self.skipped = True  # DeepSpeed zeroes the gradients after this call, as after a step
        return None


def policy_module(bundle: PolicyBundle, zero_stage: int,
                  logprob_chunk_tokens: int = LOGPROB_CHUNK_TOKENS) -> PolicyModule:
    """The module a DeepSpeed engine trains. Under ZeRO-3 every forward calls the vision tower
    once, on all its micro-batch's images and video together (the blank image where it has
    no media), and runs as many log-prob chunks as the rank with the most completion tokens,
    so ranks whose batches differ in images, videos or lengths still make the same
    collectives, forward and backward (``PolicyModule``)."""
    zero3 = int(zero_stage) == 3
    return PolicyModule(bundle.model, bundle.disc_id, bundle.gen_id,
                        lockstep_media=bundle.encoder.blank_media() if zero3 else None,
                        logprob_chunk_tokens=logprob_chunk_tokens,
                        agree_chunks=udist.largest_on_any_rank if zero3 else None)


def reduce_bucket_elements(hidden_size: int) -> int:
    """ZeRO's gradient bucket (DeepSpeed's ``reduce_bucket_size``), in elements: hidden_size
    squared (Hugging Face's "auto" for it), at least MIN_REDUCE_BUCKET so that a small model's
    gradients still go in one collective. DeepSpeed's own default, 5e8 whatever the model, is
    allocated at each backward in fp32 under ZeRO-1/2 and held in the weights' dtype under
    ZeRO-3: on an H200, one tiny-model learner step peaked at 3.85 GiB, 3.73 GiB of it two
    such buckets. Qwen2-VL-7B's is 12.8M elements (49 MiB in fp32), so the floor's 16.8M."""
    return max(int(hidden_size) ** 2, MIN_REDUCE_BUCKET)


def build_engine(
    module: torch.nn.Module, *, lr: float, weight_decay: float, total_steps: int,
    warmup_ratio: float, min_lr_ratio: float, micro_batch_size: int,
    gradient_accumulation_steps: int, grad_clip: float, zero_stage: int, bf16: bool,
    hidden_size: int, skip_non_finite: bool = False,
) -> Any:
    """A DeepSpeed engine over ``module``'s trainable parameters, cosine schedule with warmup.
    ``hidden_size``: the language model's, which sizes ZeRO's gradient buckets
    (``reduce_bucket_elements``). ``skip_non_finite``: its optimizer is a ``FiniteStepAdamW``
    (``engine.client_optimizer``)."""
    udist.configure_accelerator()
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    # A client torch AdamW: DeepSpeed's fused/CPU Adam would JIT-compile for minutes on CPU.
    adamw = FiniteStepAdamW if skip_non_finite else torch.optim.AdamW
    optimizer = adamw(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(total_steps, warmup_ratio, min_lr_ratio)
    )
    config = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(gradient_accumulation_steps),
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": int(zero_stage),
                              "reduce_bucket_size": reduce_bucket_elements(hidden_size)},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # ZeRO vets optimizers by exact type; FiniteStepAdamW is AdamW with a guarded step.
        "zero_allow_untested_optimizer": skip_non_finite,
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
    midway: Callable[[], None] | None = None, recipe: dict[str, Any] | None = None,
) -> Path:
    """Collective save: every rank writes its DeepSpeed state into the staging folder, rank 0
    writes the Hugging Face weights and commits (see ``umerl.train.checkpoint``). ``midway`` runs
    between the two (fault injection: a death there must leave the last checkpoint intact).
    ``recipe`` (the run's config) goes into the manifest: a resume compares it with its own."""
    rank = udist.rank()
    if rank == 0:
        ckpt.begin(root, step)
    udist.barrier()
    staging = ckpt.partial_dir(root, step)
    state_dir = staging / ckpt.TRAIN_STATE
    # The client state goes beside DeepSpeed's files, not into them: it loads without
    # unpickling (weights_only), as do the RNG states.
    engine.save_checkpoint(str(state_dir), tag="ds", save_latest=False)
    if rank == 0:
        torch.save({**client_state, "step": step, "stage": stage}, state_dir / CLIENT_STATE)
    torch.save(udist.rng_state(), state_dir / f"rng_rank{rank}.pt")
    if midway is not None:
        midway()
    state_dict = full_state_dict(engine, zero_stage)
    if rank == 0:
        save_policy(bundle, staging, state_dict)
    udist.barrier()
    final = ckpt.step_dir(root, step)
    if rank == 0:
        final = ckpt.commit(root, step, stage, {"world_size": udist.world_size(),
                                                "recipe": recipe})
        ckpt.prune(root, keep_last, written=step)
        print(f"[{stage}] checkpoint {final}", flush=True)
    udist.barrier()
    return final


def load_checkpoint(engine: Any, path: Path) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns client state.
    ``path`` comes from ``ckpt.resolve_resume``, which has checked every file's SHA-256:
    DeepSpeed's ``load_checkpoint`` unpickles its files (``weights_only=False``)."""
    state_dir = path / ckpt.TRAIN_STATE
    client = torch.load(state_dir / CLIENT_STATE, weights_only=True)
    engine.load_checkpoint(str(state_dir), tag="ds")
    rng_file = state_dir / f"rng_rank{udist.rank()}.pt"
    if rng_file.is_file():  # absent when resuming with more ranks than the checkpoint had
        udist.set_rng_state(torch.load(rng_file, weights_only=True))
    return client
