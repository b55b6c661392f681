"""The GRPO learners' frozen reference policy, and where its weights live.

The reference only gives the KL term's log-probs (no gradients, never updated), so without a
KL term (``rl.kl_beta: 0``) it is not built at all. Otherwise ``learner.reference_placement``:

- ``device``: a full copy in the model dtype on each learner's device (15.4 GiB for
  Qwen2-VL-7B in bf16, on every learner GPU);
- ``zero3``: a DeepSpeed ZeRO-3 engine without an optimizer, its parameters partitioned over
  the learner ranks (1/N of them per rank) and gathered layer by layer during each forward,
  then released;
- ``zero3_offload``: the same with the partitions in CPU memory (``offload_param``), copied to
  the device for each forward.

Under ZeRO-3 each reference forward is a collective: every rank must run as many as the
others, and each with the same vision-tower calls. The learners run the reference once per
micro-batch of the scoring pass (equal counts: ranks take equal shares of a step), and the
module is the policy's ZeRO-3 one (``policy_module``: one vision-tower call per forward,
whatever modalities the micro-batch holds).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from umerl.model.loading import PolicyBundle, load_policy
from umerl.model.policy import PolicyModule
from umerl.train import dist as udist
from umerl.train.engine import policy_module

REFERENCE_PLACEMENTS = ("device", "zero3", "zero3_offload")
# Parameters up to this many times the hidden size stay whole on every rank (norms, biases):
# gathering them costs a collective each for a few KB. Hugging Face's DeepSpeed integration
# uses the same rule for "stage3_param_persistence_threshold": "auto".
PERSISTENCE_PER_HIDDEN = 10


def build_reference(cfg: DictConfig, checkpoint: str, device: torch.device | str
                    ) -> nn.Module | None:
    """The reference module the learner calls with a micro-batch's inputs (a ``PolicyModule``
    or a ZeRO-3 engine around one), or None when ``rl.kl_beta`` is 0. A collective under
    ``zero3*``: every learner rank builds it."""
    if float(cfg.rl.kl_beta) == 0:
        return None
    placement = str(cfg.learner.reference_placement)
    if placement not in REFERENCE_PLACEMENTS:
        raise ValueError(f"learner.reference_placement {placement!r}: one of "
                         f"{', '.join(REFERENCE_PLACEMENTS)}")
    chunk = int(cfg.learner.logprob_chunk_tokens)
    if placement == "device":
        bundle = load_policy(checkpoint, dtype=cfg.model.dtype, device=str(device),
                             max_pixels=cfg.model.max_pixels)
        module = PolicyModule(bundle.model, bundle.disc_id, bundle.gen_id,
                              logprob_chunk_tokens=chunk)
        return module.requires_grad_(False).eval()
    # Loaded on the CPU: DeepSpeed moves it to the device one parameter at a time to partition.
    bundle = load_policy(checkpoint, dtype=cfg.model.dtype, max_pixels=cfg.model.max_pixels)
    return zero3_inference_engine(bundle, offload=placement == "zero3_offload",
                                  logprob_chunk_tokens=chunk, device=torch.device(device))


def zero3_inference_engine(bundle: PolicyBundle, offload: bool, logprob_chunk_tokens: int,
                           device: torch.device) -> Any:
    """A DeepSpeed ZeRO-3 engine over the frozen ``bundle`` (no optimizer: DeepSpeed then
    only partitions, gathers and releases parameters), partitions in CPU memory if
    ``offload``, buffers on ``device`` (where its forwards run). The weights keep the dtype
    they were loaded in (no bf16 cast), so its log-probs are those of the ``device``
    placement."""
    udist.configure_accelerator()
    import deepspeed

    module = policy_module(bundle, 3, logprob_chunk_tokens)  # lockstep vision-tower calls
    module.requires_grad_(False).eval()
    text = getattr(bundle.model.config, "text_config", bundle.model.config)
    zero: dict[str, Any] = {
        "stage": 3,
        "stage3_param_persistence_threshold": PERSISTENCE_PER_HIDDEN * int(text.hidden_size),
    }
    if offload:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": 1,  # required by the config; no batches pass here
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    udist.disable_deepspeed_jit_ops()
    # Partition before initialize: given a module not yet partitioned, initialize first moves
    # it whole to the device (the full copy this placement exists to avoid).
    dtype = next(module.parameters()).dtype
    deepspeed.zero.Init(module=module, config_dict_or_path=config, dtype=dtype)
    engine, _, _, _ = deepspeed.initialize(model=module, config=config)
    # zero.Init places and partitions parameters only, and initialize() does not move a module
    # so partitioned: its buffers (the rotary embeddings' inv_freq) would stay on the CPU,
    # and the first forward on a GPU fail (seen on an H200).
    buffers_to(module, device)
    engine.eval()
    return engine


def buffers_to(module: nn.Module, device: torch.device) -> None:
    """Every buffer of ``module`` on ``device``, persistent or not; parameters untouched."""
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None and buffer.device != device:
                sub._buffers[name] = buffer.to(device)


def resident_elements(module: nn.Module) -> dict[str, int]:
    """Parameter elements this process holds, per device type: a ZeRO-3 parameter's partition
    plus whatever of it is gathered now (whole for a persistent one after a forward, none for
    a released one); a plain parameter whole."""
    held: dict[str, int] = {}
    for p in module.parameters():
        parts = [p.data] + ([p.ds_tensor] if hasattr(p, "ds_tensor") else [])
        for t in parts:
            held[t.device.type] = held.get(t.device.type, 0) + t.numel()
    return held
