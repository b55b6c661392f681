"""The recipe schema: each key's type and range, and the rules between keys.

Defaults live in ``umerl/config/defaults.yaml`` only; this file says what each key may hold. Checked
by ``umerl.config.recipe.load_recipe`` before anything starts; every error names the key, where its
value came from, what was wrong and what is allowed. Checks that touch the filesystem or import
code (data files, reward plug-ins, checkpoints, ``output_dir``) are the driver's preflight
(``umerl.preflight``); this module reads nothing but the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from umerl.config.origins import ConfigError, Sources
from umerl.data.dtypes import MODEL_DTYPES
from umerl.runtime.devices import ENGINES, engine_for
from umerl.runtime.faults import STALL_PHASES, parse_fault

# `serve.direct_port`: the replicas' own HTTP servers take their ports from this many.
DIRECT_PORT_SPAN = 100

Check = Callable[[Any], str | None]  # None when the value is fine, else what is wrong
# A rule between keys: None when the config keeps it, else the error naming the keys' sources.
Rules = tuple[Callable[[DictConfig, Sources], str | None], ...]


@dataclass(frozen=True)
class Rule:
    check: Check
    allowed: str


# rl.loss_agg_mode's choices, verl's names (umerl/train/grpo.py implements each).
LOSS_AGG_MODES = ("seq-mean-token-sum-norm", "seq-mean-token-sum", "seq-mean-token-mean",
                  "token-mean")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(float(v))


def Int(low: int | None = None, high: int | None = None, nullable: bool = False) -> Rule:
    bounds = _bounds_text(low, high)

    def check(v: Any) -> str | None:
        if v is None and nullable:
            return None
        if not _is_int(v):
            return f"expected an integer, got {_show(v)}"
        return _out_of_range(v, low, high)

    return Rule(check, f"an integer{bounds}{' or null' if nullable else ''}")


def Float(low: float | None = None, high: float | None = None, low_open: bool = False,
          nullable: bool = False) -> Rule:
    def check(v: Any) -> str | None:
        if v is None and nullable:
            return None
        if not _is_number(v):
            return f"expected a finite number, got {_show(v)}"
        if low_open and low is not None and v <= low:
            return f"{v} is not > {low}"
        return _out_of_range(v, low, high)

    low_text = f" > {low}" if low_open and low is not None else ""
    bounds = low_text + (_bounds_text(None, high) if low_open else _bounds_text(low, high))
    return Rule(check, f"a number{bounds}{' or null' if nullable else ''}")


def Bool() -> Rule:
    return Rule(lambda v: None if isinstance(v, bool) else f"expected true or false, got "
                f"{_show(v)}", "true or false")


def OneOf(*choices: Any) -> Rule:
    def check(v: Any) -> str | None:
        if any(v == c and type(v) is type(c) for c in choices):
            return None
        return f"{_show(v)} is not allowed"

    return Rule(check, "one of " + ", ".join(_show(c) for c in choices))


def Str(nullable: bool = False, nonempty: bool = True) -> Rule:
    def check(v: Any) -> str | None:
        if v is None and nullable:
            return None
        if not isinstance(v, str):
            return f"expected a string, got {_show(v)}"
        if nonempty and not v.strip():
            return "is empty"
        return None

    kind = "a non-empty string" if nonempty else "a string"
    return Rule(check, kind + (" or null" if nullable else ""))


def ListOf(item: Rule, min_len: int = 0) -> Rule:
    def check(v: Any) -> str | None:
        if not isinstance(v, (list, tuple, ListConfig)):
            return f"expected a list, got {_show(v)}"
        if len(v) < min_len:
            return f"has {len(v)} entries, needs at least {min_len}"
        for i, x in enumerate(v):
            problem = item.check(x)
            if problem:
                return f"entry [{i}]: {problem}"
        return None

    least = f" (at least {min_len})" if min_len else ""
    return Rule(check, f"a list{least}, each {item.allowed}")


def Either(*rules: Rule) -> Rule:
    def check(v: Any) -> str | None:
        problems = [r.check(v) for r in rules]
        return None if any(p is None for p in problems) else f"{_show(v)} is not allowed"

    return Rule(check, " or ".join(r.allowed for r in rules))


def Mapping() -> Rule:
    return Rule(lambda v: None if isinstance(v, (dict, DictConfig)) else
                f"expected a mapping, got {_show(v)}", "a mapping")


def RlExtra() -> Rule:
    """``build_benchmark``'s ``rl_extra``: task -> extra RL queries (the builder says which
    tasks have an extra pool)."""
    from umerl.data.benchmark.build import RL_EXTRA_TASKS, check_rl_extra

    def check(v: Any) -> str | None:
        if not isinstance(v, (dict, DictConfig)):
            return f"expected a mapping, got {_show(v)}"
        try:
            check_rl_extra(dict(v))
        except ValueError as err:
            return str(err)
        return None

    return Rule(check, f"a mapping of {', '.join(RL_EXTRA_TASKS)} to an integer >= 0")


def _out_of_range(v: float, low: float | None, high: float | None) -> str | None:
    if low is not None and v < low:
        return f"{v} is below the minimum {low}"
    if high is not None and v > high:
        return f"{v} is above the maximum {high}"
    return None


def _bounds_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""


def _show(v: Any) -> str:
    if isinstance(v, str):
        return repr(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(v))
    return str(v)


def Resources() -> Rule:
    """Custom Ray resources of a bundle: names to positive amounts (CPU and GPU have keys)."""

    def check(v: Any) -> str | None:
        if not isinstance(v, (dict, DictConfig)):
            return f"expected a mapping, got {_show(v)}"
        for name, amount in v.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                return f"{name!r} has its own key (cpus_per_worker, gpus_per_worker)"
            if not _is_number(amount) or float(amount) <= 0:
                return f"{name!r}: expected a number > 0, got {_show(amount)}"
        return None

    return Rule(check, "a mapping of custom resource names to numbers > 0, e.g. {rollout_node: 1}")


def FaultSpec() -> Rule:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"expected a string, got {_show(v)}"
        try:
            parse_fault(v)
        except ValueError as err:
            return str(err)
        return None

    return Rule(check, "ACTOR/INDEX/STEP/PHASE, e.g. rollout/1/3/generate")


MODES = ("disc:disc", "gen:gen", "disc:gen", "gen:disc")
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# force: as auto, also when the recipe differs from the checkpoint's in keys that matter.
RESUME = Either(OneOf("auto", "force"), Str(nullable=True))
BF16 = OneOf("auto", True, False)
ZERO = OneOf(0, 1, 2, 3)
PROBABILITY = Float(0.0, 1.0)
POSITIVE = Float(0.0, low_open=True)
NONNEG = Float(0.0)
TRAIN_PARTS = {"llm": Bool(), "projector": Bool(), "vision": Bool()}


def _stage_common() -> dict[str, Rule]:
    return {
        "enabled": Bool(), "data": ListOf(Str()), "max_steps": Int(1), "lr": POSITIVE,
        "weight_decay": NONNEG, "warmup_ratio": PROBABILITY, "grad_clip": NONNEG,
        "save_every": Int(1), "keep_last": Int(0), "resume": RESUME, "log_every": Int(1),
        "output_subdir": Str(),
    }


def _pool(prefix: str) -> dict[str, Rule]:
    return {f"{prefix}.num_workers": Int(1), f"{prefix}.cpus_per_worker": POSITIVE,
            f"{prefix}.gpus_per_worker": NONNEG}


SCHEMA: dict[str, Rule] = {
    "seed": Int(0),
    "output_dir": Str(),
    "model.path": Str(nullable=True),
    "model.dtype": OneOf(*MODEL_DTYPES),
    # One merged vision token at least (28 x 28 px in Qwen2-VL).
    "model.max_pixels": Int(28 * 28, nullable=True),
    "model.tiny.family": OneOf(*FAMILIES),
    "model.tiny.size": OneOf("tiny", "small"),
    "model.tiny.seed": Int(0),
    "model.tiny.dir": Str(),
    "data.benchmark_dir": Str(nullable=True),
    "data.benchmark_seed": Int(0),
    "data.benchmark_rl_extra": RlExtra(),
    "data.skip_invalid": Bool(),
    "data.max_prompt_tokens": Either(OneOf("auto"), Int(16)),
    "eval.enabled": Bool(),
    "eval.before": Bool(),
    "eval.tasks": ListOf(Str(), min_len=1),
    "eval.split": Str(),
    "eval.modes": ListOf(OneOf(*MODES), min_len=1),
    "eval.pass_k": ListOf(Int(1)),
    "eval.batch_size": Int(1),
    "eval.max_new_tokens": Int(1),
    "eval.temperature": POSITIVE,
    "eval.top_k": Int(0),
    "eval.save_embeddings": Bool(),
    "eval.out_dir": Str(nullable=True),
    "eval.gpus_per_worker": NONNEG,
    "eval.cpus_per_worker": POSITIVE,
    "ray.address": Str(nullable=True),
    "ray.num_cpus": Int(1, nullable=True),
    # Ray refuses an object store under 75 MiB.
    "ray.object_store_memory": Int(75 << 20),
    **{f"sft.{k}": rule for k, rule in _stage_common().items()},
    **_pool("sft"),
    "sft.resources": Resources(),
    "sft.zero_stage": ZERO,
    "sft.micro_batch_size": Int(1),
    "sft.gradient_accumulation_steps": Int(1),
    "sft.min_lr_ratio": PROBABILITY,
    "sft.bf16": BF16,
    "sft.gradient_checkpointing": Bool(),
    "sft.logit_scale": POSITIVE,
    **{f"sft.loss_weights.{k}": NONNEG for k in ("gen_nce", "disc_nce", "query_ce", "target_ce")},
    **{f"sft.train.{k}": rule for k, rule in TRAIN_PARTS.items()},
    **{f"rl.{k}": rule for k, rule in _stage_common().items()},
    "rl.pairs_per_step": Int(1),
    # GRPO normalises rewards within a group: one sample has no group to compare with.
    "rl.group_size": Int(2),
    "rl.max_new_tokens": Int(1),
    "rl.temperature": POSITIVE,
    "rl.top_k": Int(0),
    "rl.top_p": Float(0.0, 1.0, low_open=True),
    "rl.adv_eps": POSITIVE,
    "rl.norm_adv_by_std": Bool(),
    "rl.loss_agg_mode": OneOf(*LOSS_AGG_MODES),
    "rl.clip_eps_low": Float(0.0, 1.0, low_open=True),
    "rl.clip_eps_high": POSITIVE,
    "rl.kl_beta": NONNEG,
    "rl.entropy_coeff": NONNEG,
    "rl.max_completion_length": Int(1, nullable=True),
    "rl.weight_sync_transport": OneOf("auto", "nccl", "shm", "gloo"),
    "rl.weight_sync_bucket_mb": POSITIVE,
    "rl.weight_sync_timeout_s": POSITIVE,
    "rl.reward_timeout_s": POSITIVE,
    "rl.mask_shared_targets": Bool(),
    "rl.weight_sync_verify_every": Int(0),
    "rl.max_staleness": OneOf(0, 1),
    **_pool("rollout"),
    "rollout.engine": OneOf("auto", *ENGINES),
    "rollout.tensor_parallel_size": Int(1),
    "rollout.gpu_memory_utilization": Float(0.0, 1.0, low_open=True),
    "rollout.enforce_eager": Bool(),
    "rollout.share_prefill": Bool(),
    "rollout.call_timeout_s": POSITIVE,
    "rollout.max_restarts": Int(0),
    "rollout.min_workers": Int(1, nullable=True),
    "rollout.max_workers": Int(1, nullable=True),
    "rollout.replace_timeout_s": POSITIVE,
    "rollout.resources": Resources(),
    "rl.max_failures": Int(0),
    "faults.kill": ListOf(FaultSpec()),
    "faults.stall": ListOf(FaultSpec()),
    "faults.stall_s": POSITIVE,
    "rollout.max_model_len": Int(16, nullable=True),
    **_pool("learner"),
    "learner.zero_stage": ZERO,
    "learner.step_timeout_s": POSITIVE,
    "learner.placement_timeout_s": POSITIVE,
    "learner.resources": Resources(),
    "learner.micro_batch_size": Int(0),
    "learner.bf16": BF16,
    "learner.gradient_checkpointing": Bool(),
    "learner.logprob_chunk_tokens": Int(1),
    "learner.reference_placement": OneOf("device", "zero3", "zero3_offload"),
    "learner.single_forward": OneOf("auto", True, False),
    "learner.shared_prompt": OneOf("auto", True, False),
    "learner.shared_media": Bool(),
    "learner.max_skipped_steps": Int(1),
    **{f"learner.train.{k}": rule for k, rule in TRAIN_PARTS.items()},
    "annotate.max_new_tokens": Int(1),
    "annotate.max_completion_tokens": Int(1),
    "annotate.temperature": POSITIVE,
    "annotate.top_k": Int(0),
    "annotate.batch_size": Int(1),
    "serve.host": Str(),
    "serve.port": Int(1, 65535),
    "serve.direct_port": Int(1024, 65535 - DIRECT_PORT_SPAN + 1, nullable=True),
    "serve.num_replicas": Int(1),
    "serve.cpus_per_replica": POSITIVE,
    "serve.gpus_per_replica": NONNEG,
    "serve.engine": OneOf("auto", *ENGINES),
    "serve.gpu_memory_utilization": Float(0.0, 1.0, low_open=True),
    "serve.model_name": Str(nullable=True),
    "serve.disc_batch_size": Int(1),
    "serve.disc_batch_wait_s": NONNEG,
    "serve.gen_batch_size": Int(1),
    "serve.gen_batch_wait_s": NONNEG,
    "serve.max_ongoing_requests": Int(1),
    "serve.max_queued_requests": Int(1),
    "serve.request_timeout_s": POSITIVE,
    "serve.body_timeout_s": POSITIVE,
    "serve.health_check_period_s": POSITIVE,
    "serve.autoscaling.enabled": Bool(),
    "serve.autoscaling.min_replicas": Int(0),
    "serve.autoscaling.max_replicas": Int(1),
    "serve.autoscaling.target_ongoing_requests": POSITIVE,
    "serve.api_key_env": Str(),
    "serve.ssl_certfile": Str(nullable=True),
    "serve.ssl_keyfile": Str(nullable=True),
    "serve.max_new_tokens": Int(1),
    "serve.temperature": POSITIVE,
    "serve.top_k": Int(0),
    "serve.max_inputs": Int(1),
    "serve.max_samples": Int(1),
    "serve.max_request_bytes": Int(1024),
    "serve.max_image_bytes": Int(1),
    "serve.max_image_pixels": Int(1),
    "serve.max_request_pixels": Int(1),
    "serve.max_video_frames": Int(1),
    "serve.max_text_chars": Int(1),
    "serve.route.split": Str(),
    "serve.route.folds": Int(2),
    # Reward entries are checked (and imported) by umerl.preflight through rewards/.
    "rewards": ListOf(Either(Mapping(), Str()), min_len=1),
    "wandb.mode": OneOf("offline", "online", "disabled"),
    "wandb.project": Str(),
    "wandb.name": Str(nullable=True),
}


def validate(config: DictConfig, sources: Sources | None = None) -> None:
    """Types and ranges of every key, then the rules between keys; raises ``ConfigError``."""
    sources = sources or Sources()
    for key, rule in SCHEMA.items():
        value = OmegaConf.select(config, key, throw_on_missing=False)
        problem = rule.check(value)
        if problem:
            raise ConfigError(f"{sources.describe(key)}: {problem}; allowed: {rule.allowed}")
    _check_rules(config, sources, CROSS_RULES)


def check_learner(config: DictConfig, sources: Sources | None = None) -> None:
    """The rules between the learner's keys and the RL stage's, whether or not ``rl.enabled``:
    a ``Learner`` runs them when it is built, since tests and benchmarks build one from a
    config that ``validate`` may have passed with the RL stage off. Raises ``ConfigError``."""
    _check_rules(config, sources or Sources(), LEARNER_RULES)


def _check_rules(config: DictConfig, sources: Sources, rules: Rules) -> None:
    for rule in rules:
        problem = rule(config, sources)
        if problem:
            raise ConfigError(problem)


def _pairs_divide_learners(c: DictConfig, s: Sources) -> str | None:
    pairs, learners = int(c.rl.pairs_per_step), int(c.learner.num_workers)
    if pairs % learners:
        return (f"{s.describe('rl.pairs_per_step')} = {pairs} must be a multiple of "
                f"{s.describe('learner.num_workers')} = {learners}: each learner takes an equal "
                "share of the step's pairs")
    return None


def _learner_micro_batch(c: DictConfig, s: Sources) -> str | None:
    micro = int(c.learner.micro_batch_size)
    rows = int(c.rl.pairs_per_step) // int(c.learner.num_workers) * int(c.rl.group_size)
    if micro and rows % micro:
        return (f"{s.describe('learner.micro_batch_size')} = {micro} must divide the {rows} "
                "rollouts per side per learner (rl.pairs_per_step / learner.num_workers x "
                "rl.group_size); 0 means all at once")
    return None


def _learner_sizes(c: DictConfig, s: Sources) -> str | None:
    """How a step's rollouts split over learners and micro-batches matters only to a run whose
    RL stage is on (``check_learner`` asks regardless)."""
    if not c.rl.enabled:
        return None
    return _pairs_divide_learners(c, s) or _learner_micro_batch(c, s)


def _single_forward(c: DictConfig, s: Sources) -> str | None:
    if c.learner.single_forward is True and int(c.learner.zero_stage) == 3:
        return (f"{s.describe('learner.single_forward')} = true cannot run under "
                f"{s.describe('learner.zero_stage')} = 3 (ZeRO-3 releases a forward's "
                "parameters before the next forward); use auto or false")
    return None


def _shared_prompt(c: DictConfig, s: Sources) -> str | None:
    if c.learner.shared_prompt is not True:
        return None
    key = s.describe("learner.shared_prompt")
    micro, G = int(c.learner.micro_batch_size), int(c.rl.group_size)
    if micro % G:
        return (f"{key} = true needs micro-batches of whole groups: "
                f"{s.describe('learner.micro_batch_size')} = {micro} is not a multiple of "
                f"{s.describe('rl.group_size')} = {G}; use auto or false")
    if c.learner.gradient_checkpointing:
        return (f"{key} = true cannot run with {s.describe('learner.gradient_checkpointing')}"
                " = true (checkpointed layers keep no cache of the prompt); use auto or false")
    if int(c.learner.zero_stage) == 3:
        return (f"{key} = true is not supported under {s.describe('learner.zero_stage')} = 3;"
                " use auto or false")
    return None


def _reference_placement(c: DictConfig, s: Sources) -> str | None:
    """A ZeRO-3 reference runs the policy's micro-batches, and each of its forwards is a
    collective whose vision-tower calls must match across ranks: the policy's ZeRO-3 inputs
    guarantee it, the shared-prompt ones (below ZeRO-3) do not."""
    placement = str(c.learner.reference_placement)
    if placement != "device" and int(c.learner.zero_stage) != 3:
        return (f"{s.describe('learner.reference_placement')} = {placement} needs "
                f"{s.describe('learner.zero_stage')} = 3, got {c.learner.zero_stage}; use "
                "device below ZeRO-3")
    return None


def _direct_ports_apart(c: DictConfig, s: Sources) -> str | None:
    first = c.serve.direct_port
    if first is not None and first <= int(c.serve.port) < first + DIRECT_PORT_SPAN:
        return (f"{s.describe('serve.port')} = {c.serve.port} lies in the replicas' direct "
                f"ports {first}..{first + DIRECT_PORT_SPAN - 1} "
                f"({s.describe('serve.direct_port')} = {first}); move one of them")
    return None


def _serve_tls_and_scaling(c: DictConfig, s: Sources) -> str | None:
    cert, key = c.serve.ssl_certfile, c.serve.ssl_keyfile
    if (cert is None) != (key is None):
        return (f"{s.describe('serve.ssl_certfile')} and {s.describe('serve.ssl_keyfile')} go "
                "together: set both for TLS, or neither")
    scaling = c.serve.autoscaling
    if scaling.enabled and int(scaling.min_replicas) > int(scaling.max_replicas):
        return (f"{s.describe('serve.autoscaling.min_replicas')} = {scaling.min_replicas} is "
                f"over {s.describe('serve.autoscaling.max_replicas')} = {scaling.max_replicas}")
    return None


def _tensor_parallel(c: DictConfig, s: Sources) -> str | None:
    tp, gpus = int(c.rollout.tensor_parallel_size), float(c.rollout.gpus_per_worker)
    engine = engine_for(c.rollout.engine, gpus)
    if tp > 1 and engine != "vllm":
        return (f"{s.describe('rollout.tensor_parallel_size')} = {tp} needs the vLLM engine; "
                f"{s.describe('rollout.engine')} resolves to {engine}")
    if engine == "vllm" and gpus >= 1 and gpus != tp:
        return (f"{s.describe('rollout.gpus_per_worker')} = {gpus:g} must equal "
                f"{s.describe('rollout.tensor_parallel_size')} = {tp}: each rollout actor's vLLM "
                "engine runs one tensor-parallel rank per GPU of its bundle")
    if tp > 1 and gpus < 1:
        return (f"{s.describe('rollout.tensor_parallel_size')} = {tp} needs "
                f"rollout.gpus_per_worker = {tp}, got {gpus:g}")
    return None


def _vllm_whole_gpus(c: DictConfig, s: Sources) -> str | None:
    """vLLM checks at start that the GPU's free memory covers gpu_memory_utilization x its
    total memory, so an actor on a GPU share (Ray lets others onto the rest) fails to start."""
    gpus = float(c.rollout.gpus_per_worker)
    engine = engine_for(c.rollout.engine, gpus)
    if engine != "vllm" or gpus == int(gpus):
        return None
    return (f"{s.describe('rollout.gpus_per_worker')} = {gpus:g} is not a whole number of GPUs, "
            f"but {s.describe('rollout.engine')} resolves to vllm, whose start-up check needs "
            f"the free memory of each GPU it uses ({s.describe('rollout.gpu_memory_utilization')}"
            " of the total) to itself: use gpus_per_worker 1 (or tensor_parallel_size GPUs) "
            "or the transformers engine")


def _stale_vllm_temperature(c: DictConfig, s: Sources) -> str | None:
    """Off-policy rollouts bring the sampling weights' log-probs from the engine; the learners
    read log-probs at rl.temperature, and vLLM reports them at temperature 1 only."""
    engine = engine_for(c.rollout.engine, float(c.rollout.gpus_per_worker))
    if int(c.rl.max_staleness) == 0 or engine != "vllm" or float(c.rl.temperature) == 1.0:
        return None
    return (f"{s.describe('rl.max_staleness')} = {c.rl.max_staleness} with "
            f"{s.describe('rl.temperature')} = {c.rl.temperature:g}: the learners read the "
            "sampling weights' log-probs at that temperature, and vLLM (what "
            f"{s.describe('rollout.engine')} resolves to) reports them at temperature 1 only; "
            "use rl.temperature 1, rl.max_staleness 0 or the transformers engine")


def _something_trains(c: DictConfig, s: Sources) -> str | None:
    for stage, parts in (("sft", c.sft.train), ("learner", c.learner.train)):
        enabled = c.sft.enabled if stage == "sft" else c.rl.enabled
        if enabled and not any(bool(v) for v in parts.values()):
            return (f"{s.describe(stage + '.train')}: llm, projector and vision are all false; "
                    "nothing would train")
    return None


def _pass_k_distinct(c: DictConfig, s: Sources) -> str | None:
    if len(set(c.eval.pass_k)) != len(c.eval.pass_k):
        return f"{s.describe('eval.pass_k')}: repeated values in {list(c.eval.pass_k)}"
    return None


def _faults_can_fire(c: DictConfig, s: Sources) -> str | None:
    """A fault that names an actor, a step or (a stall) a phase the run does not have would
    silently not fire."""
    for key in ("faults.kill", "faults.stall"):
        for text in OmegaConf.select(c, key):
            fault = parse_fault(text)
            workers = int(c[fault.actor].num_workers)
            if fault.index >= workers:
                return (f"{s.describe(key)}: {text} names {fault.actor} {fault.index}, "
                        f"but {fault.actor}.num_workers = {workers}")
            if fault.step > int(c.rl.max_steps):
                return (f"{s.describe(key)}: {text} is at step {fault.step}, after "
                        f"rl.max_steps = {c.rl.max_steps}")
            if key == "faults.stall" and fault.phase not in STALL_PHASES[fault.actor]:
                return (f"{s.describe(key)}: {text}: a {fault.actor} stall fires in "
                        f"{', '.join(STALL_PHASES[fault.actor])} only")
    return None


def _timeouts_ordered(c: DictConfig, s: Sources) -> str | None:
    """A failed weight sync ends every rank's wait at rl.weight_sync_timeout_s; a driver-side
    timeout at or below it would kill a learner or rollout actor that was about to report the
    sync's named error (and, for learners, cost a restart from the last checkpoint)."""
    sync = float(c.rl.weight_sync_timeout_s)
    for key in ("learner.step_timeout_s", "rollout.call_timeout_s"):
        if float(OmegaConf.select(c, key)) <= sync:
            return (f"{s.describe(key)} = {OmegaConf.select(c, key):g} must be above "
                    f"{s.describe('rl.weight_sync_timeout_s')} = {sync:g}: a call that waits "
                    "behind a failed sync would time out before the sync reports its error")
    return None


def _elastic_range(c: DictConfig, s: Sources) -> str | None:
    """rollout.min_workers <= rollout.num_workers <= rollout.max_workers (null: num_workers)."""
    start = int(c.rollout.num_workers)
    low, high = c.rollout.min_workers, c.rollout.max_workers
    if low is not None and int(low) > start:
        return (f"{s.describe('rollout.min_workers')} = {low} is above "
                f"{s.describe('rollout.num_workers')} = {start}: the pool starts with "
                "num_workers actors and may shrink to min_workers (null: num_workers)")
    if high is not None and int(high) < start:
        return (f"{s.describe('rollout.max_workers')} = {high} is below "
                f"{s.describe('rollout.num_workers')} = {start}: the pool starts with "
                "num_workers actors and may grow to max_workers (null: num_workers)")
    return None


LEARNER_RULES: Rules = (_pairs_divide_learners, _learner_micro_batch, _single_forward,
                        _shared_prompt, _reference_placement)
CROSS_RULES: Rules = (
    _learner_sizes, _single_forward, _shared_prompt, _reference_placement, _direct_ports_apart,
    _serve_tls_and_scaling,
    _vllm_whole_gpus, _tensor_parallel, _stale_vllm_temperature, _something_trains,
    _pass_k_distinct, _faults_can_fire, _timeouts_ordered, _elastic_range,
)
