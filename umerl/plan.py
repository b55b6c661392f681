"""``umerl plan``: per-GPU memory of a recipe's learners and rollout engines, before a run.

Parameter counts are exact: the model is built on PyTorch's ``meta`` device (no weights, no
memory) from its ``config.json`` (the recipe's ``model.path``, ``--model-config``) or from
the public shapes of Qwen2-VL-2B/7B built in here, for recipes whose checkpoint is not on this
machine. The rest are estimates from the recipe's keys, each line saying what it assumes:

learner GPU, held for the run:
    weights (bf16, or the model dtype without bf16), sharded under ZeRO-3 over the learners;
    gradients of the trained parameters in fp32, sharded under ZeRO-2/3; Adam's two moments
    plus an fp32 master copy when training in bf16 (fp32 weights are their own master),
    sharded under ZeRO-1/2/3; the frozen reference policy in the model dtype as
    ``learner.reference_placement`` puts it (a full copy, a ZeRO-3 partition over the
    learners, or none on the GPU when offloaded to CPU; nothing without a KL term);
    ZeRO-3's gathered parameters (DeepSpeed's default stage3_max_live_parameters, 1e9);
    CUDA context and communication buffers.
learner GPU, per micro-batch (the step), per reference forward (ZeRO-3 reference) or per
weight sync, whichever is larger:
    step: activations of ``micro_batch_size`` rows of prompt + completion tokens (with
    gradient checkpointing: every layer's input plus one layer's working set; without: every
    layer's working set), and 4 chunks of fp32 vocabulary logits (the peak measured in
    tests/test_logprob_chunks.py); reference forward: its gathered parameters (as the
    policy's) and the same logits; sync (rank 0): two bucket buffers plus one gathered bucket.
rollout GPU (vLLM): gpu_memory_utilization x the GPU is vLLM's; the weights' share over
    tensor-parallel ranks and a fixed activation reserve come off it, the rest is KV cache.

Prompt length: ``--prompt-tokens``, else the tokens of one image of ``model.max_pixels``
(the processor default when null: 12845056 px, 16384 tokens) plus 256 text tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
TEXT_TOKENS = 256  # a prompt's text around its image: instruction, question, chat markup
PROCESSOR_MAX_PIXELS = 12845056  # Qwen2-VL's image processor default
PIXELS_PER_TOKEN = 28 * 28  # one merged vision token: 2 x 2 patches of 14 px
CONTEXT_BYTES = int(1.5 * GIB)  # CUDA context, NCCL and allocator slack per process
VLLM_ACTIVATION_RESERVE = 2 * GIB  # vLLM's profiled forward peak, CUDA graphs, sampler
ZERO3_MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's default stage3_max_live_parameters
LOGIT_CHUNK_COPIES = 4  # fp32 logits of one chunk alive at once (tests/test_logprob_chunks.py)

_QWEN2_VL_VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
                    "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
                    "spatial_patch_size": 14, "temporal_patch_size": 2}
_MROPE = {"type": "mrope", "mrope_section": [16, 24, 24]}
# The public config.json values of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2-VL-7B-Instruct.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "qwen2-vl-2b": {"model_type": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960,
                    "num_hidden_layers": 28, "num_attention_heads": 12,
                    "num_key_value_heads": 2, "vocab_size": 151936,
                    "tie_word_embeddings": True, "max_position_embeddings": 32768,
                    "rope_scaling": _MROPE,
                    "vision_config": {**_QWEN2_VL_VISION, "hidden_size": 1536}},
    "qwen2-vl-7b": {"model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28,
                    "num_key_value_heads": 4, "vocab_size": 152064,
                    "tie_word_embeddings": False, "max_position_embeddings": 32768,
                    "rope_scaling": _MROPE,
                    "vision_config": {**_QWEN2_VL_VISION, "hidden_size": 3584}},
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: parameter counts by part and the text shapes."""

    source: str
    params: dict[str, int]  # llm, projector, vision
    largest_tensor: int  # elements (the embedding or LM head matrix)
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_heads: int
    head_dim: int

    @property
    def total(self) -> int:
        return sum(self.params.values())

    def trainable(self, train: dict[str, bool]) -> int:
        return sum(n for part, n in self.params.items() if train.get(part))


def shape_from_config(config_dict: dict[str, Any], source: str) -> ModelShape:
    """Count a model's parameters by building it on the meta device (exact, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    fields = {k: v for k, v in config_dict.items() if k != "model_type"}
    config = AutoConfig.for_model(config_dict["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    params = {"llm": 0, "projector": 0, "vision": 0}
    largest = 0
    for name, p in model.named_parameters():  # tied weights are listed once
        params[_part(name)] += p.numel()
        largest = max(largest, p.numel())
    text = getattr(config, "text_config", config)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return ModelShape(source, params, largest, int(text.hidden_size),
                      int(text.intermediate_size), int(text.num_hidden_layers),
                      int(text.vocab_size), int(text.num_key_value_heads), head_dim)


def _part(name: str) -> str:
    """The part a parameter trains with (``umerl.train.engine.parameter_group``'s rule, here
    so planning imports no DeepSpeed)."""
    if ".visual." in f".{name}":
        return "projector" if "merger" in name else "vision"
    return "llm"


def resolve_shape(model_path: str | None, model_config: str | None = None,
                  model_name: str | None = None) -> ModelShape:
    """``--model-config`` (a config.json or its folder), else ``--model`` (a built-in name),
    else the recipe's ``model.path`` when it holds a config.json, else a built-in whose size
    (2b / 7b) the path names."""
    if model_config:
        path = Path(model_config)
        path = path / "config.json" if path.is_dir() else path
        return shape_from_config(json.loads(path.read_text()), str(path))
    if model_name:
        if model_name not in KNOWN_MODELS:
            raise ValueError(f"--model {model_name}: known models are "
                             f"{', '.join(KNOWN_MODELS)}")
        return shape_from_config(KNOWN_MODELS[model_name], f"built-in {model_name}")
    if model_path and (Path(model_path) / "config.json").is_file():
        config = Path(model_path) / "config.json"
        return shape_from_config(json.loads(config.read_text()), str(config))
    guessed = [name for name in KNOWN_MODELS if name.split("-")[-1] in str(model_path).lower()]
    if len(guessed) != 1:
        raise ValueError(f"model.path {model_path}: no config.json there and no size (2b, 7b) "
                         f"in its name; give --model-config or --model "
                         f"({', '.join(KNOWN_MODELS)})")
    return shape_from_config(KNOWN_MODELS[guessed[0]],
                             f"built-in {guessed[0]} (no config.json at {model_path}; "
                             "size from its name)")


@dataclass
class Column:
    """One GPU's figures: (item, bytes, what it assumes) lines, and whether it fits."""

    title: str
    gpu_bytes: int
    held: list[tuple[str, int, str]] = field(default_factory=list)
    transient: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)
    limit: int | None = None  # vLLM: its budget, not the whole GPU
    reserve: tuple[str, int] | None = None  # what must stay free of the limit, and why
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        peaks = [sum(b for _, b, _ in lines) for lines in self.transient.values()]
        return sum(b for _, b, _ in self.held) + max(peaks, default=0)

    @property
    def margin(self) -> int:
        limit = self.limit if self.limit is not None else self.gpu_bytes
        return limit - self.total - (self.reserve[1] if self.reserve else 0)

    @property
    def fits(self) -> bool:
        return self.margin >= 0


def prompt_tokens(max_pixels: int | None) -> int:
    return (max_pixels or PROCESSOR_MAX_PIXELS) // PIXELS_PER_TOKEN + TEXT_TOKENS


def learner_column(cfg: Any, shape: ModelShape, gpu_bytes: int,
                   prompt_len: int | None = None) -> Column:
    from umerl.train.engine import reduce_bucket_elements

    lcfg, rcfg = cfg.learner, cfg.rl
    world, stage = int(lcfg.num_workers), int(lcfg.zero_stage)
    bf16 = _bf16(lcfg.bf16, lcfg.gpus_per_worker)
    model_bytes = {"bfloat16": 2, "float16": 2}.get(str(cfg.model.dtype), 4)
    weight_bytes = 2 if bf16 else model_bytes
    P, T = shape.total, shape.trainable(dict(lcfg.train))
    over = f"/ {world} ranks"
    col = Column(f"learner GPU (x{world}, ZeRO-{stage})", gpu_bytes)
    col.held += [
        ("policy weights", P * weight_bytes // (world if stage == 3 else 1),
         f"{P / 1e9:.2f}B x {weight_bytes} B" + (f" {over}" if stage == 3 else "")),
        ("gradients", T * 4 // (world if stage >= 2 else 1),
         f"{T / 1e9:.2f}B trained x 4 B (fp32)" + (f" {over}" if stage >= 2 else "")),
        ("optimizer states", T * (12 if weight_bytes < 4 else 8) // (world if stage >= 1 else 1),
         ("Adam m, v + fp32 master" if weight_bytes < 4 else "Adam m, v")
         + (f" {over}" if stage >= 1 else "")),
    ]
    col.held.append(_reference_line(cfg, P, model_bytes, world))
    if stage == 3:
        live = min(P, ZERO3_MAX_LIVE_PARAMETERS)
        col.held.append(("ZeRO-3 gathered params", live * weight_bytes,
                         "stage3_max_live_parameters (DeepSpeed default 1e9)"))
    bucket = reduce_bucket_elements(shape.hidden)
    if stage == 3:
        col.held.append(("ZeRO-3 gradient bucket", bucket * weight_bytes,
                         f"reduce_bucket_size {bucket:,} x {weight_bytes} B"))
    col.held.append(("CUDA context, NCCL", CONTEXT_BYTES, "fixed allowance"))
    rows = int(lcfg.micro_batch_size) or int(rcfg.pairs_per_step) // world * int(
        rcfg.group_size)
    prompt_len = prompt_len or prompt_tokens(cfg.model.max_pixels)
    completion = int(rcfg.max_new_tokens)
    tokens = rows * (prompt_len + completion)
    layer_set = tokens * (8 * shape.hidden + 4 * shape.intermediate) * weight_bytes
    if bool(lcfg.gradient_checkpointing):
        activations = shape.layers * tokens * shape.hidden * weight_bytes + layer_set
        how = "checkpointed: each layer's input + one layer's working set"
    else:
        activations = shape.layers * layer_set
        how = "every layer's working set (no gradient checkpointing)"
    chunk = min(int(lcfg.logprob_chunk_tokens), rows * completion)
    col.transient["step"] = [
        ("activations", activations,
         f"{rows} rows x ({prompt_len} prompt + {completion} new) tokens; {how}"),
        ("log-prob logits", LOGIT_CHUNK_COPIES * chunk * shape.vocab * 4,
         f"{LOGIT_CHUNK_COPIES} x {chunk} tokens x {shape.vocab} vocab x fp32"),
    ]
    if stage in (1, 2):  # allocated at each backward, two alive where micro-steps meet
        col.transient["step"].append(("ZeRO gradient buckets", 2 * bucket * 4,
                                      f"2 x reduce_bucket_size {bucket:,} x fp32"))
    if _reference_sharded(cfg):
        col.transient["reference forward"] = [
            ("reference gathered", min(P, ZERO3_MAX_LIVE_PARAMETERS) * model_bytes,
             "stage3_max_live_parameters (DeepSpeed default 1e9)"),
            col.transient["step"][1]]
    if str(lcfg.reference_placement) == "zero3_offload" and float(rcfg.kl_beta) > 0:
        col.notes.append(f"reference partitions in CPU memory: {P * model_bytes / world / GIB:.1f}"
                         f" GiB per learner process ({P / 1e9:.2f}B x {model_bytes} B / {world})")
    sync_bucket = max(int(float(rcfg.weight_sync_bucket_mb) * 2**20), shape.largest_tensor * 2)
    col.transient["weight sync (rank 0)"] = [
        ("sync buffers", 3 * sync_bucket, "2 bucket buffers + 1 gathered bucket (freed after)")]
    return col


def _reference_sharded(cfg: Any) -> bool:
    return float(cfg.rl.kl_beta) > 0 and str(cfg.learner.reference_placement) != "device"


def _reference_line(cfg: Any, params: int, model_bytes: int, world: int
                    ) -> tuple[str, int, str]:
    """The frozen reference on a learner GPU (``umerl.train.reference``)."""
    placement = str(cfg.learner.reference_placement)
    if float(cfg.rl.kl_beta) == 0:
        return ("reference policy", 0, "not built (rl.kl_beta 0)")
    if placement == "device":
        return ("reference policy", params * model_bytes, f"full copy, {model_bytes} B/param")
    if placement == "zero3":
        return ("reference policy", -(-params // world) * model_bytes,
                f"ZeRO-3 partition: {params / 1e9:.2f}B x {model_bytes} B / {world} ranks")
    return ("reference policy", 0, "ZeRO-3 partitions offloaded to CPU memory")


def rollout_column(cfg: Any, shape: ModelShape, gpu_bytes: int, prompt_len: int) -> Column:
    rcfg = cfg.rollout
    tp = int(rcfg.tensor_parallel_size)
    budget = int(float(rcfg.gpu_memory_utilization) * gpu_bytes)
    col = Column(f"rollout GPU (x{int(rcfg.num_workers) * tp}, vLLM TP {tp})", gpu_bytes,
                 limit=budget)
    weights = shape.total * 2 // tp
    col.held += [("weights", weights, f"{shape.total / 1e9:.2f}B x 2 B / {tp} TP ranks"),
                 ("activation reserve", VLLM_ACTIVATION_RESERVE, "profiled forward, graphs")]
    per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2 // tp  # K and V, bf16
    sequence = prompt_len + int(cfg.rl.max_new_tokens)
    col.reserve = ("KV cache of one whole sequence", sequence * per_token)
    kv = budget - col.total
    col.notes.append(f"KV cache: the rest of gpu_memory_utilization "
                     f"{float(rcfg.gpu_memory_utilization):g} = {max(kv, 0) / GIB:.1f} GiB, "
                     f"{max(kv, 0) // per_token:,} tokens ({sequence} per sequence)")
    return col


def _bf16(setting: Any, gpus: float) -> bool:
    """``bf16: auto`` is bf16 on a GPU (every GPU the recipes name has it)."""
    return bool(float(gpus) > 0) if setting == "auto" else bool(setting)


def plan(cfg: Any, shape: ModelShape, gpu_memory_gb: float,
         prompt_len: int | None = None) -> list[Column]:
    gpu_bytes = int(gpu_memory_gb * GIB)
    columns = [learner_column(cfg, shape, gpu_bytes, prompt_len)]
    if cfg.rl.enabled and float(cfg.rollout.gpus_per_worker) > 0:
        columns.append(rollout_column(cfg, shape, gpu_bytes,
                                      prompt_len or prompt_tokens(cfg.model.max_pixels)))
    return columns


def render(columns: list[Column], shape: ModelShape, gpu_memory_gb: float) -> str:
    p = shape.params
    lines = [f"model: {shape.source}",
             f"  {shape.total / 1e9:.3f}B parameters (llm {p['llm'] / 1e9:.3f}B, projector "
             f"{p['projector'] / 1e6:.1f}M, vision {p['vision'] / 1e6:.1f}M); "
             f"GPU: {gpu_memory_gb:g} GiB"]
    for col in columns:
        lines += ["", col.title]
        lines += [_row(item, b, note) for item, b, note in col.held]
        for phase, items in col.transient.items():
            lines.append(f"  during {phase}:")
            lines += [_row(item, b, note, indent=4) for item, b, note in items]
        lines += [f"  {note}" for note in col.notes]
        limit = col.limit if col.limit is not None else col.gpu_bytes
        verdict = "fits" if col.fits else "DOES NOT FIT"
        kept = f" keeping {col.reserve[1] / GIB:.2f} GiB for the {col.reserve[0]}" \
            if col.reserve else ""
        lines.append(f"  {'total':<26}{col.total / GIB:8.1f} GiB of {limit / GIB:.1f} GiB: "
                     f"{verdict}, margin {col.margin / GIB:.1f} GiB{kept}")
    return "\n".join(lines)


def run_plan(recipe: str, overrides: list[str], gpu_memory_gb: float,
             model_config: str | None = None, model_name: str | None = None,
             prompt_len: int | None = None) -> int:
    """``umerl plan``: print the table; 0 when every GPU fits, 3 when one does not."""
    from umerl.config.recipe import load_recipe

    cfg = load_recipe(recipe, overrides)
    if not cfg.rl.enabled:
        raise ValueError(f"{recipe}: umerl plan estimates the GRPO stage (learners and rollout "
                         "engines); this recipe has rl.enabled: false")
    shape = resolve_shape(cfg.model.path, model_config, model_name)
    columns = plan(cfg, shape, gpu_memory_gb, prompt_len)
    print(render(columns, shape, gpu_memory_gb))
    if all(col.fits for col in columns):
        return 0
    print(f"umerl plan: does not fit {gpu_memory_gb:g} GiB: lower learner.micro_batch_size, "
          "model.max_pixels or rl.max_new_tokens, raise learner.zero_stage or "
          "learner.num_workers, enable learner.gradient_checkpointing, or (under ZeRO-3) set "
          "learner.reference_placement to zero3 or zero3_offload")
    return 3


def _row(item: str, nbytes: int, note: str, indent: int = 2) -> str:
    return f"{' ' * indent}{item:<{26 - indent + 2}}{nbytes / GIB:8.2f} GiB  {note}"
