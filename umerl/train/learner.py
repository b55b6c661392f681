"""GRPO learners: DeepSpeed data-parallel ranks that score rollouts and update the policy.

Per RL step each rank holds a contiguous slice of the step's pairs with their G query and G
target completions, and:

1. scores its rollouts: a forward of the policy over prompt + completion gives the gen
   embedding at <gen_emb> (and the disc one at <disc_emb>); the frozen reference gives
   reference log-probs (``umerl.train.reference``: placed by ``learner.reference_placement``,
   not built when ``rl.kl_beta`` is 0). With ``learner.single_forward`` that forward is the
   update's own, with gradients (its embeddings detached); else a separate pass without
   gradients;
2. all-gathers the embeddings and completions of every rank, so each reward sees the whole
   step, and computes the rewards (identically on every rank);
3. turns rewards into group advantages, (r - mean) / (std + eps) over each pair-side group;
4. minimises the token-level clipped objective with the k3 KL to the reference, token sums /
   max completion length, (query + target) / 2 (two-pass mode: running the policy again with
   gradients). The ratio's denominator is the sampling weights' log-prob for rollouts a step
   stale (``rl.max_staleness: 1``, from the rollout engine), else the current policy's own.

With ``learner.shared_prompt`` every forward above runs each prompt once per micro-batch and
its G completions on the prompt's keys and values (``PolicyModule``), not G copies of it.
Where rows run whole (ZeRO-3, gradient checkpointing), ``learner.shared_media`` still encodes
each distinct side of a micro-batch once and runs each of its images and videos through the
vision tower once, for all the rows that hold it.

The embedding reward of a stale rollout still uses the current policy's embeddings: the
reward compares the step's rollouts with one another (rank among the step's targets, margin
to the others), so every rollout must be embedded in one space, and the space the update
moves is the current policy's. Embeddings from the sampling weights would score a completion
in a space the learners have already left.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from rewards import RewardContext, reward_metrics, rewards_from_config
from rewards.builtin import step_rank_and_margin
from umerl.config.recipe import to_container
from umerl.config.schema import check_learner
from umerl.data.formats import Pair, Side
from umerl.model.loading import load_policy
from umerl.model.policy import (
    PolicyOutput,
    completion_block_mask,
    completion_mask_for,
)
from umerl.runtime.devices import use_bf16, use_reserved_cpus
from umerl.runtime.faults import for_actor, kill_if, recipe_faults, stall_if
from umerl.runtime.remote import WorkerError, gather
from umerl.train import checkpoint as ckpt
from umerl.train import dist as udist
from umerl.train.engine import (
    FiniteStepAdamW,
    build_engine,
    load_checkpoint,
    policy_module,
    prepare_for_training,
    save_checkpoint,
    set_trainable,
)
from umerl.train.grpo import group_advantages, grpo_side_loss
from umerl.train.reference import build_reference


@dataclass
class StepShard:
    """One learner rank's part of an RL step (a picklable message from the driver)."""

    step: int
    pairs: list[Pair]
    pair_offset: int  # global index of pairs[0] within the step
    query_completions: list[list[list[int]]]  # [pair][sample] token ids
    target_completions: list[list[list[int]]]
    # Off-policy rollouts (rl.max_staleness > 0): how many updates behind the learners the
    # weights that sampled them were, and each token's log-prob under those weights
    # ([pair][sample][token], from the rollout engine). None: sampled by the current policy.
    staleness: int = 0
    query_logprobs: list[list[list[float]]] | None = None
    target_logprobs: list[list[list[float]]] | None = None


class Learner:
    """One learner rank (the Ray actor ``LearnerActor`` wraps it; tests use it directly)."""

    def __init__(self, cfg: DictConfig, policy_checkpoint: str, reference_checkpoint: str):
        check_learner(cfg)  # the recipe's rules, also for a config load_recipe did not check
        self.cfg, self.lcfg, self.rcfg = cfg, cfg.learner, cfg.rl
        self.rank, self.world = udist.rank(), udist.world_size()
        udist.seed_everything(int(cfg.seed) + 1000 + self.rank)
        self.bundle = load_policy(policy_checkpoint, dtype=cfg.model.dtype,
                                  max_pixels=cfg.model.max_pixels)
        prepare_for_training(self.bundle.model, bool(self.lcfg.gradient_checkpointing))
        self.trainable = set_trainable(self.bundle.model, dict(self.lcfg.train))
        rows = int(self.rcfg.pairs_per_step) // self.world * int(self.rcfg.group_size)
        self.micro = micro = int(self.lcfg.micro_batch_size) or rows
        self.single_forward = single_forward_mode(self.lcfg.single_forward, rows // micro,
                                                  int(self.lcfg.zero_stage))
        self.shared_prompt = shared_prompt_mode(
            self.lcfg.shared_prompt, micro % int(self.rcfg.group_size) == 0,
            bool(self.lcfg.gradient_checkpointing), int(self.lcfg.zero_stage))
        self.shared_media = bool(self.lcfg.shared_media)
        r = self.rcfg
        self.engine = build_engine(
            policy_module(self.bundle, int(self.lcfg.zero_stage),
                          int(self.lcfg.logprob_chunk_tokens)),
            lr=float(r.lr), weight_decay=float(r.weight_decay), total_steps=int(r.max_steps),
            warmup_ratio=float(r.warmup_ratio), min_lr_ratio=1.0, micro_batch_size=micro,
            gradient_accumulation_steps=2 * rows // micro, grad_clip=float(r.grad_clip),
            zero_stage=int(self.lcfg.zero_stage), bf16=use_bf16(self.lcfg.bf16),
            hidden_size=self.bundle.hidden_size, skip_non_finite=True,
        )
        self.optimizer: FiniteStepAdamW = self.engine.client_optimizer
        self.skipped_steps = 0  # updates skipped for a non-finite loss or gradient
        self.skipped_in_a_row = 0
        # The frozen reference (learner.reference_placement; None without a KL term), where
        # DeepSpeed put the policy or sharded over the ranks: batches go to the policy's device.
        self.reference = build_reference(cfg, reference_checkpoint, self.engine.device)
        self.rewards = rewards_from_config(cfg.rewards, base_dir=os.getcwd(),
                                           timeout_s=float(self.rcfg.reward_timeout_s))
        self.root = Path(cfg.output_dir) / r.output_subdir
        self.faults = for_actor(recipe_faults(cfg.faults), "learner", self.rank)

    @property
    def temperature(self) -> float:
        """The rollouts' sampling temperature: the policy that sampled a completion is
        softmax(logits / T) (top-k aside), so the ratio, the policy gradient and the KL read
        log-probs at T, the policy's and the reference's alike (as verl's actor and ref do)."""
        return float(self.rcfg.temperature)

    @property
    def max_completion_length(self) -> int:
        return int(self.rcfg.max_completion_length or self.rcfg.max_new_tokens)

    # -- the step ------------------------------------------------------------------------------

    def step(self, shard: StepShard) -> dict[str, float]:
        G = int(self.rcfg.group_size)
        if shard.staleness and shard.query_logprobs is None:
            raise ValueError(f"step {shard.step}: rollouts {shard.staleness} update(s) stale "
                             "came without the log-probs of the weights that sampled them")
        sides = {
            "query": ([p.query for p in shard.pairs for _ in range(G)],
                      _flat(shard.query_completions), _flat(shard.query_logprobs)),
            "target": ([p.target for p in shard.pairs for _ in range(G)],
                       _flat(shard.target_completions), _flat(shard.target_logprobs)),
        }
        # Encoded once: the scoring pass and the update pass read the same micro-batches.
        batches = {name: self._micro_batches(*rows) for name, rows in sides.items()}
        if self.single_forward:  # the update's own forward gives the (detached) embeddings
            forwards = {name: [self._policy_forward(b["inputs"]) for b in batches[name]]
                        for name in batches}
            scored = {name: self._score(batches[name], forwards[name]) for name in batches}
        else:  # two passes: a no-grad one now, the update's forward per micro-batch later
            forwards = None
            scored = {name: self._score(batches[name]) for name in batches}
        rewards, metrics = self._rewards(shard, scored)
        advantages = group_advantages(rewards, G, eps=float(self.rcfg.adv_eps),
                                      norm_by_std=bool(self.rcfg.norm_adv_by_std))
        # Groups that teach nothing: identical rewards, so every advantage is 0.
        metrics["reward/zero_advantage_groups"] = float(
            (advantages.view(-1, G).abs().amax(dim=1) == 0).float().mean())
        local = self._local_rows(advantages, len(shard.pairs) * G)
        kill_if(self.faults, shard.step, "update")
        stall_if(self.faults, shard.step, "update")
        metrics.update(self._update(batches, scored, local, forwards))
        skipped = bool(metrics.pop("actor/skipped"))
        self._count_skipped(shard.step, skipped)
        metrics["actor/update_skipped"] = float(skipped)  # this step's (the console says so)
        metrics["actor/skipped_steps"] = float(self.skipped_steps)
        return metrics

    def _count_skipped(self, step: int, skipped: bool) -> None:
        """Count a skipped update; ``learner.max_skipped_steps`` in a row stop the run (every
        rank raises alike: the ranks agreed on each skip)."""
        self.skipped_steps += int(skipped)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        limit = int(self.lcfg.max_skipped_steps)
        if self.skipped_in_a_row >= limit:
            raise RuntimeError(
                f"step {step}: the loss or gradient was not finite in {self.skipped_in_a_row} "
                f"steps in a row ({step - self.skipped_in_a_row + 1}..{step}, updates skipped; "
                f"learner.max_skipped_steps = {limit}); the weights are those after step "
                f"{step - self.skipped_in_a_row}")

    def _micro_batches(self, sides: list[Side], completions: list[list[int]],
                       logprobs: list[list[float]] | None) -> list[dict[str, Any]]:
        """Model inputs per micro-batch and, for off-policy rollouts, their old log-probs laid
        out like the policy's (the completion tokens' positions of each row). With
        ``shared_prompt`` a micro-batch holds whole groups, each prompt encoded once; else,
        with ``shared_media``, each distinct side is encoded once and its images and video run
        through the vision tower once (``PolicyModule``), however many rows hold it."""
        encoder = self.bundle.encoder
        G = int(self.rcfg.group_size)
        out = []
        for a in range(0, len(sides), self.micro):
            chunk = completions[a:a + self.micro]
            if self.shared_prompt:  # rows a + i * G .. a + i * G + G - 1 share one prompt
                inputs = encoder.shared_prompt_inputs(
                    [encoder.encode(side) for side in sides[a:a + self.micro:G]], chunk)
            elif self.shared_media:  # each distinct side encoded once, its media run once
                distinct, rows = distinct_sides(sides[a:a + self.micro])
                inputs = encoder.shared_media_inputs(
                    [encoder.encode(side) for side in distinct], rows, chunk)
            else:
                inputs = encoder.policy_inputs(
                    [encoder.encode(side) for side in sides[a:a + self.micro]], chunk)
            inputs = self._to_device(inputs)
            old = None
            if logprobs is not None:
                rows = logprobs[a:a + self.micro]
                if [len(r) for r in rows] != inputs["completion_lengths"].tolist():
                    raise ValueError("rollout log-probs do not match their completions' lengths")
                mask = _completion_mask(inputs)
                old = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
                # Each row's completion is contiguous in the mask: mask order is token order.
                old[mask] = torch.tensor([x for row in rows for x in row],
                                         dtype=torch.float32, device=mask.device)
            out.append({"inputs": inputs, "old_logprobs": old})
        return out

    @torch.no_grad()
    def _score(self, batches: list[dict[str, Any]],
               forwards: list[PolicyOutput] | None = None) -> dict[str, Any]:
        """Gen and disc embeddings (current policy) and reference log-probs, micro-batch by
        micro-batch; the embeddings from ``forwards`` (the update's own, detached) if given,
        else from a forward without gradients."""
        gen, disc, found, ref = [], [], [], []
        for i, batch in enumerate(batches):
            out: PolicyOutput = (forwards[i] if forwards is not None
                                 else self.engine.module(**batch["inputs"], with_logprobs=False))
            gen.append(out.gen.detach())
            disc.append(out.disc.detach())  # at the prompt's <disc_emb>: same for a pair's G
            found.append(out.gen_found)
            ref.append(None if self.reference is None  # rl.kl_beta 0: no KL term
                       else self.reference(**batch["inputs"],
                                           temperature=self.temperature).logprobs)
        return {"gen": torch.cat(gen), "disc": torch.cat(disc), "found": torch.cat(found),
                "ref": ref}

    def _rewards(self, shard: StepShard, scored: dict[str, Any]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """Gather every rank's rollouts; every rank computes the same step-wide rewards."""
        query_emb = _all_gather_rows(scored["query"]["gen"])
        target_emb = _all_gather_rows(scored["target"]["gen"])
        disc_query = _all_gather_rows(scored["query"]["disc"])
        disc_target = _all_gather_rows(scored["target"]["disc"])
        local = {"pairs": shard.pairs, "q": shard.query_completions,
                 "t": shard.target_completions}
        everyone = _all_gather_objects(local)
        pairs = [p for part in everyone for p in part["pairs"]]
        q_ids = [c for part in everyone for group in part["q"] for c in group]
        t_ids = [c for part in everyone for group in part["t"] for c in group]
        decode = self.bundle.tokenizer.batch_decode
        ids = q_ids + t_ids
        ctx = RewardContext.from_pairs(
            pairs, completions=decode(ids, skip_special_tokens=True), completion_ids=ids,
            query_embeddings=query_emb, target_embeddings=target_emb,
            disc_query_embeddings=disc_query, disc_target_embeddings=disc_target,
            group_size=int(self.rcfg.group_size), step=shard.step,
            mask_shared_targets=bool(self.rcfg.mask_shared_targets),
        )
        total, parts, timings = self.rewards(ctx)
        metrics = reward_metrics(ctx, total, parts, timings)
        factors = step_rank_and_margin(ctx)  # the embedding reward's own, when it ran
        metrics["reward/rank_score"] = float(
            torch.cat([factors.query_rank, factors.target_rank]).float().mean())
        lengths = torch.tensor([len(c) for c in ids], dtype=torch.float32)
        metrics.update({"rollout/completion_len_mean": float(lengths.mean()),
                        "rollout/completion_len_max": float(lengths.max()),
                        # Cut at the budget: no stop token, so no format reward (what the
                        # recipe's max_new_tokens costs the policy).
                        "rollout/truncated": float(
                            (lengths >= int(self.rcfg.max_new_tokens)).float().mean()),
                        "rollout/gen_emb_found": float(torch.cat(
                            [scored["query"]["found"], scored["target"]["found"]]).float().mean())})
        return total, metrics

    def _local_rows(self, advantages: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
        """This rank's advantages: its slice of the query half and of the target half."""
        half = advantages.shape[0] // 2
        start = self.rank * rows
        return {"query": advantages[start:start + rows],
                "target": advantages[half + start:half + start + rows]}

    def _update(self, batches: dict, scored: dict, advantages: dict,
                forwards: dict[str, list[PolicyOutput]] | None) -> dict[str, float]:
        """The clipped loss and backward, micro-batch by micro-batch (the policy forward with
        gradients: ``forwards`` if the scoring pass already ran it); one optimizer step.
        Off-policy rows take the ratio against the sampling weights' log-probs; on-policy
        ones against the current policy's own (detached: a ratio of 1). ``actor/skipped``:
        the update was not applied (a non-finite loss or gradient on some rank)."""
        sums: dict[str, float] = {}
        self.optimizer.begin_step()
        n_micro = sum(len(side_batches) for side_batches in batches.values())
        mode = str(self.rcfg.loss_agg_mode)
        for name, side_batches in batches.items():
            divisor = _token_divisor(side_batches) if mode == "token-mean" else None
            for i, batch in enumerate(side_batches):
                a = i * self.micro
                out: PolicyOutput = (forwards[name][i] if forwards is not None
                                     else self._policy_forward(batch["inputs"]))
                loss, parts = grpo_side_loss(
                    out.logprobs, batch["old_logprobs"], scored[name]["ref"][i],
                    advantages[name][a:a + self.micro].to(out.logprobs.device),
                    out.completion_mask, self.max_completion_length,
                    kl_beta=float(self.rcfg.kl_beta), eps_low=float(self.rcfg.clip_eps_low),
                    eps_high=float(self.rcfg.clip_eps_high), loss_agg_mode=mode,
                    token_divisor=divisor, entropy=out.entropy,
                    entropy_coeff=float(self.rcfg.entropy_coeff),
                )
                # DeepSpeed averages micro-batch losses over gradient accumulation; with both
                # sides' micro-batches equal in size that is (loss_query + loss_target) / 2.
                self.optimizer.note_loss(loss)
                self.engine.backward(loss)
                self.engine.step()
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + float(value) / n_micro
        # DeepSpeed's own overflow skip (ZeRO 1-2 in fp32) never reaches the optimizer.
        skipped = self.optimizer.skipped or not self.engine.was_step_applied()
        return ({f"actor/{k}": v for k, v in sums.items()}
                | {"actor/lr": self.engine.get_lr()[0], "actor/skipped": float(skipped)})

    def _policy_forward(self, inputs: dict[str, torch.Tensor]) -> PolicyOutput:
        """The update's forward (with gradients): log-probs at the rollout temperature and,
        for the entropy bonus, the per-token entropy."""
        return self.engine(**inputs, temperature=self.temperature,
                           with_entropy=float(self.rcfg.entropy_coeff) != 0)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(self.engine.module.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    # -- weights and checkpoints ----------------------------------------------------------------

    def weight_specs(self) -> list[tuple[str, list[int], str]]:
        """(name, full shape, dtype) of every trainable parameter, in model order: what a
        weight sync moves (under ZeRO-3 the full shapes, not this rank's shards)."""
        return [(n, list(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
                for n, p in self.bundle.model.named_parameters() if p.requires_grad]

    def weight_buckets(self, plan: Any) -> Iterator[list[torch.Tensor]]:
        """Each bucket's full tensors, bucket by bucket. Under ZeRO-3 a collective: every rank
        must iterate, each bucket is gathered while it is yielded and released after, so at
        most one bucket's full parameters exist at once, never the whole model."""
        params = dict(self.bundle.model.named_parameters())
        zero3 = int(self.lcfg.zero_stage) == 3
        if zero3:
            import deepspeed
        for bucket in plan.buckets:
            group = [params[m.name] for m in bucket]
            if zero3:
                with deepspeed.zero.GatheredParameters(group):
                    yield [p.detach() for p in group]
            else:
                yield [p.detach() for p in group]

    def save(self, step: int, client_state: dict[str, Any]) -> Path:
        return save_checkpoint(self.engine, self.bundle, self.root, step, "rl", client_state,
                               int(self.lcfg.zero_stage), int(self.rcfg.keep_last),
                               midway=lambda: kill_if(self.faults, step, "save"),
                               recipe=to_container(self.cfg))

    def resume(self) -> tuple[Path | None, dict[str, Any]]:
        path = ckpt.resolve_resume(self.rcfg.resume, self.root, "rl.resume")
        if path is None:
            return None, {}
        return path, load_checkpoint(self.engine, path)


def single_forward_mode(setting: str | bool, micro_batches_per_side: int, zero_stage: int
                        ) -> bool:
    """``learner.single_forward``: the update's forward also gives the reward's embeddings
    (one policy forward per rollout per step, as the authors' trainer) instead of a separate
    no-grad pass first. It holds every micro-batch's activations until the rewards are known,
    so ``auto`` takes it only with one micro-batch per side (``learner.micro_batch_size: 0``
    or the rank's whole share) and not under ZeRO-3, whose parameter gathering assumes each
    forward is followed by its backward (``true`` there is the schema's error)."""
    if setting == "auto":
        return micro_batches_per_side == 1 and zero_stage < 3
    return setting is True


def shared_prompt_mode(setting: str | bool, whole_groups: bool, gradient_checkpointing: bool,
                       zero_stage: int) -> bool:
    """``learner.shared_prompt``: a micro-batch runs each prompt once, its G completions on
    its keys and values. ``auto`` takes it where it can run: micro-batches of whole groups,
    no gradient checkpointing (its layers keep no cache) and ZeRO stage < 3 (not run there).
    ``true`` elsewhere is the schema's error."""
    if setting == "auto":
        return whole_groups and not gradient_checkpointing and zero_stage < 3
    return setting is True


def distinct_sides(sides: list[Side]) -> tuple[list[Side], list[int]]:
    """The distinct sides in first-seen order, and each row's index among them (a group's
    G rows repeat one side; equal sides of different pairs share too)."""
    first: dict[Side, int] = {}
    rows = [first.setdefault(side, len(first)) for side in sides]
    return list(first), rows


def _completion_mask(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where the policy's ``logprobs`` of these inputs hold completion tokens."""
    if "completion_ids" in inputs:  # shared prompt: completions left-aligned in their block
        return completion_block_mask(inputs["completion_ids"], inputs["completion_lengths"])
    return completion_mask_for(inputs["input_ids"], inputs["completion_lengths"])


def _flat(groups: list[list[Any]] | None) -> list[Any] | None:
    """[pair][sample] -> [pair * G + sample] (None stays None)."""
    return None if groups is None else [x for group in groups for x in group]


def _token_divisor(side_batches: list[dict[str, Any]]) -> float:
    """``token-mean``'s divisor for each micro-batch of one side: the side's completion tokens
    over every rank, divided by the micro-batches that DeepSpeed and data parallelism average
    (this side's on every rank), so that the averaged gradient is the step-wide token mean."""
    local = float(sum(int(b["inputs"]["completion_lengths"].sum()) for b in side_batches))
    return udist.all_reduce_sum(local) / (udist.world_size() * len(side_batches))


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    if udist.world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(udist.world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _all_gather_objects(obj: Any) -> list[Any]:
    if udist.world_size() == 1:
        return [obj]
    out: list[Any] = [None] * udist.world_size()
    dist.all_gather_object(out, obj)
    return out


class LearnerActor:
    """A learner rank as a Ray actor; ``ray.remote`` is applied by ``LearnerPool``."""

    def __init__(self, cfg: dict[str, Any], rank: int, world_size: int):
        udist.configure_accelerator()
        self.cfg = OmegaConf.create(cfg)
        self.threads = use_reserved_cpus(self.cfg.learner.cpus_per_worker)
        self.rank, self.world_size = rank, world_size
        self.learner: Learner | None = None

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), udist.free_port()

    def setup(self, master: tuple[str, int], policy: str, reference: str) -> dict[str, Any]:
        udist.init_process_group(self.rank, self.world_size, master[0], master[1])
        import ray

        self.learner = Learner(self.cfg, policy, reference)
        return {"rank": self.rank, "trainable": self.learner.trainable,
                "device": str(self.learner.engine.device),
                "model_type": str(self.learner.bundle.model.config.model_type),
                # How it runs the policy per step: the RL stage's first console line says.
                "passes": ("one forward" if self.learner.single_forward else "two passes")
                + (", shared prompt" if self.learner.shared_prompt
                   else ", shared media" if self.learner.shared_media else ""),
                "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "threads": self.threads}

    def step(self, shard: StepShard) -> dict[str, float]:
        return self.learner.step(shard)

    def weight_specs(self) -> list[tuple[str, list[int], str]]:
        return self.learner.weight_specs()

    def open_weight_sync(self, spec: Any, plan: Any) -> None:
        """Every rank keeps the plan (ZeRO-3 gathers follow it); rank 0 joins the sync group
        as its sender (blocks until every rollout worker has joined)."""
        from rollout.weight_sync import WeightSender, open_channel

        self.plan = plan
        if getattr(self, "sender", None) is not None:  # a re-formed group: the old one goes
            self.sender.close()
        self.sender = (WeightSender(open_channel(spec, 0, self.learner.engine.device), plan)
                       if self.rank == 0 else None)

    def send_weights(self, digest: bool) -> dict[str, Any] | None:
        """One sync: every rank takes part (ZeRO-3 gathers), rank 0 sends and answers."""
        buckets = self.learner.weight_buckets(self.plan)
        if self.sender is None:
            for _ in buckets:
                pass
            return None
        return self.sender.send(buckets, digest).as_dict()

    def save(self, step: int, client_state: dict[str, Any]) -> str:
        return str(self.learner.save(step, client_state))

    def resume(self) -> tuple[str | None, dict[str, Any]]:
        path, client = self.learner.resume()
        return (str(path) if path else None), client


def unplaced(n: int, bundle: dict[str, float], wait_s: float) -> str:
    """Why the learner pool could not start: its bundles, the keys behind them, and the
    resources of the cluster's alive nodes (a node lost since the run started shows here)."""
    import ray

    def show(resources: dict[str, float]) -> str:
        return "{" + ", ".join(f"{k}: {float(v):g}" for k, v in sorted(resources.items())
                               if k in bundle) + "}"

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = "; ".join(f"node {x['NodeID'][:12]} {show(x.get('Resources', {}))}" for x in nodes)
    return (f"learner.num_workers={n} bundles of {show(bundle)} (learner.cpus_per_worker, "
            f"learner.gpus_per_worker, learner.resources; PACK placement) could not be placed "
            f"within learner.placement_timeout_s={wait_s:g} s; alive nodes: {have or 'none'}")


class LearnerPool:
    """``learner.num_workers`` learner actors in one placement group, one process group."""

    def __init__(self, cfg: DictConfig, policy: str, reference: str):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lcfg = cfg.learner
        n, gpus = int(lcfg.num_workers), float(lcfg.gpus_per_worker)
        bundle = ({"CPU": float(lcfg.cpus_per_worker)} | ({"GPU": gpus} if gpus else {})
                  | {str(k): float(v) for k, v in (lcfg.get("resources") or {}).items()})
        self.placement_group = placement_group([bundle] * n, strategy="PACK")
        wait_s = float(lcfg.get("placement_timeout_s") or 600)
        if not ray.wait([self.placement_group.ready()], timeout=wait_s)[0]:
            remove_placement_group(self.placement_group)
            raise WorkerError("learner pool", unplaced(n, bundle, wait_s), "")
        actor_cls = ray.remote(LearnerActor)
        plain = OmegaConf.to_container(cfg, resolve=True)
        self.actors = [
            actor_cls.options(
                num_cpus=float(lcfg.cpus_per_worker), num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
            ).remote(plain, i, n)
            for i in range(n)
        ]
        self.names = [f"learner rank {i}" for i in range(n)]
        self.timeout_s = float(lcfg.step_timeout_s)
        try:
            master = self._gather([self.actors[0].address.remote()], self.names[:1])[0]
            self.info = self._gather([a.setup.remote(master, policy, reference)
                                      for a in self.actors])
        except BaseException:
            self.shutdown()  # no pool for the caller to shut down: its group must not linger
            raise

    def _gather(self, refs: list[Any], names: list[str] | None = None) -> list[Any]:
        """Every driver-to-learner call, bounded by ``learner.step_timeout_s`` from dispatch.
        The driver waits for each call before the next, so a call queues at most behind a
        weight sync that failed on the rollout side, itself bounded by
        ``rl.weight_sync_timeout_s`` (the sender's own deadline): the generous default covers
        both. A learner still running then is hung: ``kill_hung``."""
        try:
            return gather(refs, names or self.names, timeout_s=self.timeout_s,
                          timeout_key="learner.step_timeout_s")
        except WorkerError as err:
            self.kill_hung(err)
            raise

    def kill_hung(self, err: WorkerError) -> None:
        """Kill the learners ``err`` found hung and count them as dead: the RL loop then
        restarts the stage from its checkpoint, as for a learner that died. A hung actor can
        answer nothing else (it is single-threaded), and its ranks' process group is stuck."""
        import ray

        for name in err.hung:
            if name in self.names and name not in err.dead:
                ray.kill(self.actors[self.names.index(name)], no_restart=True)
                err.dead.append(name)

    def step(self, shards: list[StepShard]) -> list[dict[str, float]]:
        return self._gather([a.step.remote(s) for a, s in zip(self.actors, shards)])

    def weight_specs(self) -> list[tuple[str, list[int], str]]:
        return self._on_rank0("weight_specs")

    def endpoint(self) -> tuple[str, int]:
        """Learner rank 0's node address and a free port there: the sync group's rendezvous."""
        return self._on_rank0("address")

    def save(self, step: int, client_state: dict[str, Any]) -> str:
        return self._gather([a.save.remote(step, client_state) for a in self.actors])[0]

    def resume(self) -> tuple[str | None, dict[str, Any]]:
        return self._gather([a.resume.remote() for a in self.actors])[0]

    def _on_rank0(self, method: str) -> Any:
        return self._gather([getattr(self.actors[0], method).remote()], self.names[:1])[0]

    def async_open_weight_sync(self, spec: Any, plan: Any) -> tuple[list[Any], list[str]]:
        """The calls (refs, worker names) joining the sync group; the driver waits on them
        together with the rollout side's, which must run at the same time."""
        return [a.open_weight_sync.remote(spec, plan) for a in self.actors], self.names

    def async_send_weights(self, digest: bool) -> tuple[list[Any], list[str]]:
        """The calls of one sync (every rank: ZeRO-3 gathers); rank 0's result is the sender's."""
        return [a.send_weights.remote(digest) for a in self.actors], self.names

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement_group)
