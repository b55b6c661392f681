"""Cold-start SFT: InfoNCE on gen and disc embeddings + CE on both completions, DeepSpeed-trained.

``sft_worker`` is the per-rank training loop: Ray Train runs it on every worker (the process
group already exists there); tests run it in-process with world size 1. Per micro-step, each
rank takes its slice of one contrastive batch and runs ONE teacher-forced forward per side
(prompt + completion + <|im_end|>), which yields the disc embedding, the gen embedding and the
completion log-probs together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from umerl.config.recipe import to_container
from umerl.data.formats import Pair, Side, read_sft_pairs
from umerl.data.tokens import IM_END
from umerl.model.loading import PolicyBundle, load_policy, prompt_limit
from umerl.model.policy import PolicyOutput
from umerl.runtime.console import Progress
from umerl.runtime.devices import use_bf16, use_reserved_cpus
from umerl.train import checkpoint as ckpt
from umerl.train import dist as udist
from umerl.train.engine import (
    build_engine,
    load_checkpoint,
    policy_module,
    prepare_for_training,
    save_checkpoint,
    set_trainable,
)
from umerl.train.losses import info_nce
from umerl.train.sft_data import ContrastiveBatcher, load_pair_datasets, shard, target_id

LOSS_PARTS = ("gen_nce", "disc_nce", "query_ce", "target_ce")


def side_inputs(bundle: PolicyBundle, sides: list[Side]) -> dict[str, torch.Tensor]:
    """Teacher-forced inputs: prompt + completion + <|im_end|>, the assistant turn's tokens."""
    im_end = bundle.tokenizer.convert_tokens_to_ids(IM_END)
    prompts = [bundle.encoder.encode(side) for side in sides]
    completions = [
        bundle.tokenizer(side.completion, add_special_tokens=False)["input_ids"] + [im_end]
        for side in sides
    ]
    return bundle.encoder.policy_inputs(prompts, completions)


def completion_nll(output: PolicyOutput) -> torch.Tensor:
    """Mean token cross-entropy over the completion (assistant) tokens only."""
    mask = output.completion_mask
    return -(output.logprobs * mask).sum() / mask.sum().clamp(min=1)


def loss_parts(engine: Any, bundle: PolicyBundle, pairs: list[Pair], scale: float
               ) -> tuple[dict[str, torch.Tensor], int]:
    """The four SFT losses for this rank's pairs, and the number of tokens processed."""
    device = next(engine.parameters()).device
    outputs, tokens = [], 0
    for sides in ([p.query for p in pairs], [p.target for p in pairs]):
        batch = {k: v.to(device) for k, v in side_inputs(bundle, sides).items()}
        tokens += int(batch["attention_mask"].sum())
        outputs.append(engine(**batch))
    query, target = outputs
    ids = torch.tensor([target_id(p.target) for p in pairs], device=device)
    parts = {
        "gen_nce": info_nce(query.gen, target.gen, scale=scale, target_ids=ids),
        "disc_nce": info_nce(query.disc, target.disc, scale=scale, target_ids=ids),
        "query_ce": completion_nll(query),
        "target_ce": completion_nll(target),
    }
    return parts, tokens


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done


class SftRun:
    """One rank's SFT run: engine, data, checkpoints and logging, built from the recipe."""

    def __init__(self, cfg: DictConfig, init_checkpoint: str):
        self.cfg, self.scfg = cfg, cfg.sft
        self.rank, self.world = udist.rank(), udist.world_size()
        udist.seed_everything(int(cfg.seed) + self.rank)
        self.root = Path(cfg.output_dir) / self.scfg.output_subdir
        self.bundle = load_policy(init_checkpoint, dtype=cfg.model.dtype,
                                  max_pixels=cfg.model.max_pixels)
        model = self.bundle.model
        prepare_for_training(model, bool(self.scfg.gradient_checkpointing))
        self.trainable = set_trainable(model, dict(self.scfg.train))
        s = self.scfg
        self.engine = build_engine(
            policy_module(self.bundle, int(s.zero_stage)),
            lr=float(s.lr), weight_decay=float(s.weight_decay), total_steps=int(s.max_steps),
            warmup_ratio=float(s.warmup_ratio), min_lr_ratio=float(s.min_lr_ratio),
            micro_batch_size=int(s.micro_batch_size),
            gradient_accumulation_steps=int(s.gradient_accumulation_steps),
            grad_clip=float(s.grad_clip), zero_stage=int(s.zero_stage), bf16=use_bf16(s.bf16),
            hidden_size=self.bundle.hidden_size,
        )
        datasets = load_pair_datasets(
            list(s.data), read_sft_pairs, bool(cfg.data.skip_invalid), self.bundle.encoder,
            prompt_limit(cfg.data.max_prompt_tokens, init_checkpoint), key="sft.data")
        self.batcher = ContrastiveBatcher(
            datasets, int(s.micro_batch_size) * self.world, seed=int(cfg.seed)
        )
        self.state = TrainState()

    def resume(self) -> Path | None:
        path = ckpt.resolve_resume(self.scfg.resume, self.root, "sft.resume")
        if path is None:
            return None
        client = load_checkpoint(self.engine, path)
        self.state.step = int(client["step"])
        self.batcher.load_state_dict(client["data"])
        return path

    def train(self, tracker: Any = None) -> Path:
        resumed = self.resume()
        total = int(self.scfg.max_steps)
        if self.rank == 0:
            where = f"resumed from {resumed}" if resumed else "from scratch"
            print(f"[sft] {where}: step {self.state.step}/{total}, world size {self.world}, "
                  f"contrastive batch {self.batcher.batch_size}, "
                  f"{self.batcher.batches_per_epoch()} batches/epoch, trainable "
                  f"{self.trainable}", flush=True)
        last_saved = None
        progress = Progress(total, "steps", done=self.state.step)
        while self.state.step < total:
            metrics = self.optimizer_step()
            self.state.step += 1
            step = self.state.step
            if self.rank == 0 and (step % int(self.scfg.log_every) == 0 or step == total):
                print(f"{_format_metrics(step, total, metrics)} | {progress.line(step)}",
                      flush=True)
            if tracker is not None:
                tracker.log(metrics, step)
            if step % int(self.scfg.save_every) == 0 or step == total:
                last_saved = self.save()
        return last_saved or ckpt.latest(self.root)

    def optimizer_step(self) -> dict[str, float]:
        start = time.perf_counter()
        sums = dict.fromkeys(LOSS_PARTS + ("loss",), 0.0)
        tokens = samples = 0
        weights = self.scfg.loss_weights
        accum = int(self.scfg.gradient_accumulation_steps)
        for _ in range(accum):
            _, batch = self.batcher.next_batch()
            local = shard(batch, self.rank, self.world)
            parts, n_tokens = loss_parts(self.engine, self.bundle, local,
                                         float(self.scfg.logit_scale))
            loss = sum(float(weights[name]) * parts[name] for name in LOSS_PARTS)
            self.engine.backward(loss)
            self.engine.step()
            for name in LOSS_PARTS:
                sums[name] += parts[name].item() / accum
            sums["loss"] += loss.item() / accum
            tokens += n_tokens
            samples += len(batch)
        seconds = time.perf_counter() - start
        total_tokens = udist.all_reduce_sum(tokens)
        metrics = {f"sft/{k}": v for k, v in sums.items()}
        metrics.update({
            "sft/lr": self.engine.get_lr()[0],
            "sft/epoch": self.batcher.state.epoch,
            "perf/samples_per_s": samples / seconds,
            "perf/tokens_per_s": total_tokens / seconds,
            "timing/step": seconds,
        })
        return metrics

    def save(self) -> Path:
        return save_checkpoint(
            self.engine, self.bundle, self.root, self.state.step, "sft",
            {"data": self.batcher.state_dict()}, int(self.scfg.zero_stage),
            int(self.scfg.keep_last), recipe=to_container(self.cfg),
        )


def _format_metrics(step: int, total: int, m: dict[str, float]) -> str:
    parts = " ".join(f"{name} {m['sft/' + name]:.3f}" for name in LOSS_PARTS)
    return (f"[sft] step {step}/{total} loss {m['sft/loss']:.3f} ({parts}) lr {m['sft/lr']:.2e} "
            f"{m['perf/samples_per_s']:.1f} samples/s {m['perf/tokens_per_s']:.0f} tokens/s")


def sft_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point (the process group already exists)."""
    from umerl.runtime.tracking import Tracker, adopt_credentials

    udist.configure_accelerator()
    cfg = OmegaConf.create(config["cfg"])
    use_reserved_cpus(cfg.sft.cpus_per_worker)
    run = SftRun(cfg, config["init_checkpoint"])
    if udist.rank() == 0 and config.get("credentials") is not None:
        adopt_credentials(config["credentials"])  # for wandb, which runs here
    tracker = Tracker(cfg, stage="sft") if udist.rank() == 0 else None
    try:
        final = run.train(tracker)
    finally:
        if tracker is not None:
            tracker.finish()
    try:
        import ray.train

        ray.train.report({"checkpoint": str(final), "step": run.state.step})
    except (ImportError, RuntimeError):  # outside Ray Train (tests, single process)
        pass
