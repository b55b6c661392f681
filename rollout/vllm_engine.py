"""The GPU rollout engine: vLLM (V1) serving the policy, with in-place weight updates.

``VllmEngine`` implements the ``RolloutEngine`` protocol exactly as ``TransformersEngine`` does:
``generate(sides, n, sampling, seeds)`` returns ``[side][sample] -> completion token ids``, each
completion ending with its stop token (``<gen_emb>`` or ``<|im_end|>``) when one was produced,
never padded, never containing a vision placeholder or ``<disc_emb>``.

How each piece maps onto vLLM 0.32:

- Prompts: the UME-R1 prompt text (``umerl.prompts.render_prompt``) with the media as vLLM
  multimodal data, ``{"prompt": text, "multi_modal_data": {"image": [PIL, ...]}}``; text-only
  sides carry the blank 28x28 white image, as ``umerl.inputs`` does. A video is passed as
  ``(frames uint8 [T, H, W, 3], metadata)`` (the metadata Qwen3-VL needs; Qwen2-VL ignores it).
  A text-only served model (no ``vision_config``, e.g. the tiny Qwen2 used for vLLM-CPU tests)
  gets the same prompt as plain token ids, without multimodal data.
- Stops: ``stop_token_ids=[<gen_emb>, <|im_end|>]`` with ``ignore_eos=True``, so the stop set is
  exactly the policy's (vLLM would otherwise also stop at the tokenizer's and the generation
  config's EOS ids). vLLM keeps a stop token id in ``CompletionOutput.token_ids``
  (``include_stop_str_in_output`` only concerns stop *strings* in the text). Penalties stay
  off (``repetition_penalty=1``): vLLM does not merge the checkpoint's generation_config into
  explicit SamplingParams, whereas HF ``generate`` inherits any ``repetition_penalty`` in the
  checkpoint's generation_config.json (Qwen instruct releases often set one).
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
  methods there. An update is one session in each worker (``begin_weight_sync``, buckets,
  ``finish_weight_sync``) over vLLM's layerwise reload, then ``reset_prefix_cache``.
  ``load_weights`` packs tensors into buckets sent as bytes through that RPC (vLLM's msgpack RPC
  turns tensors nested in arguments into plain lists): right for small models and CPU tests.
  On GPU clusters ``init_broadcast_group`` + ``receive_broadcast`` receive buckets that learner
  rank 0 broadcasts over a separate NCCL communicator (vLLM's ``StatelessProcessGroup`` +
  ``PyNcclCommunicator``, as in vLLM's RLHF example). vLLM 0.32 also ships its own
  ``weight_transfer`` engines (``Worker.start_weight_update``/``update_weights``/
  ``finish_weight_update``); the extension's method names avoid those.

Weight names. Learners send Hugging Face parameter names. transformers 5 names Qwen-VL modules
``model.language_model.*`` and ``model.visual.*`` in memory, but saves Qwen2-VL / Qwen2.5-VL
checkpoints under the original names ``model.*`` and ``visual.*`` (``lm_head.*`` is unchanged),
while Qwen3-VL checkpoints use the in-memory names. ``to_checkpoint_name`` maps a learner name
onto the checkpoint's convention, which is what vLLM's ``model.load_weights`` is written for
(vLLM's Qwen2-VL loader happens to accept both; its Qwen3-VL loader only the new names). A DDP /
DeepSpeed ``module.`` prefix is dropped. vLLM fuses q/k/v and gate/up projections; its loader
does the fusing. Any subset of layers can be sent (layers not sent keep their weights; vLLM logs
"Failed to load weights" for each), but every part of a fused layer must come in the same
update session: a layer loaded in part is re-processed with its other parts undefined.

Bucket layout (the contract with ``rollout/weight_sync.py``, by simple data only): a bucket is
a flat ``uint8`` buffer (CPU tensor, numpy array or bytes) plus its metadata, one entry per
tensor: ``(name, dtype, shape)`` for tensors packed back to back in metadata order
(``pack_bucket``), or ``(name, dtype, shape, offset)`` / an object with ``name``, ``dtype``,
``shape`` and ``offset`` attributes (weight_sync's ``TensorMeta``, 64-byte aligned offsets) for
explicit placement; dtype is a torch dtype name such as ``"bfloat16"``. Bytes are the tensor's
contiguous row-major bytes. ``weights_digest`` uses weight_sync's formula (``named_digest``).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rollout.engine import SamplingParams
from umerl.data import Side
from umerl.inputs import blank_image, load_image
from umerl.prompts import render_prompt
from umerl.tokens import DISC_EMB, GEN_EMB, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

EXTENSION_CLASS = "rollout.vllm_engine.WeightSyncExtension"

# Families whose checkpoints keep the pre-transformers-4.52 names (model.* / visual.*).
LEGACY_NAME_TYPES = ("qwen2_vl", "qwen2_5_vl")
_LEGACY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))

# Tokens a completion must never contain (the same set as InputEncoder.suppressed_token_ids).
SUPPRESSED_TOKENS = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, DISC_EMB)

DEFAULT_LIMIT_MM_PER_PROMPT = {"image": 4, "video": 1}
DTYPES = ("auto", "float32", "bfloat16", "float16")


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


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` or ``"torch.bfloat16"`` -> ``torch.bfloat16``."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's contiguous row-major bytes as a flat uint8 CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def pack_bucket(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
) -> tuple[list[tuple[str, str, tuple[int, ...]]], torch.Tensor]:
    """Reference packing: ``(metadata, flat uint8 CPU buffer)`` in the documented layout."""
    metadata, parts = [], []
    for name, tensor in named_tensors:
        metadata.append((name, dtype_name(tensor.dtype), tuple(tensor.shape)))
        parts.append(_raw_bytes(tensor))
    buffer = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return metadata, buffer


def meta_entries(metadata: Iterable[Any]) -> list[tuple[str, str, tuple[int, ...], int]]:
    """Normalise bucket metadata to ``(name, dtype, shape, offset)`` with explicit offsets."""
    return _entries(metadata)[0]


def _entries(metadata: Iterable[Any]) -> tuple[list[tuple[str, str, tuple[int, ...], int]], bool]:
    out, offset, explicit = [], 0, False
    for entry in metadata:
        if hasattr(entry, "name"):
            name, dtype, shape = entry.name, entry.dtype, entry.shape
            at = getattr(entry, "offset", None)
        else:
            name, dtype, shape, *rest = entry
            at = rest[0] if rest else None
        dtype, shape = dtype_name(dtype_from_name(dtype)), tuple(int(d) for d in shape)
        if at is not None:
            offset, explicit = int(at), True
        out.append((str(name), dtype, shape, offset))
        offset += _nbytes(dtype_from_name(dtype), shape)
    return out, explicit


def bucket_size(metadata: Iterable[Any]) -> int:
    """Bytes a buffer needs for ``metadata`` (the end of its last tensor)."""
    return max((o + _nbytes(dtype_from_name(d), s) for _, d, s, o in meta_entries(metadata)),
               default=0)


def unpack_bucket(
    buffer: torch.Tensor | np.ndarray | bytes | memoryview,
    metadata: Iterable[Any],
) -> list[tuple[str, torch.Tensor]]:
    """Split a flat uint8 buffer into named tensors (views where alignment allows)."""
    if not isinstance(buffer, torch.Tensor):
        with warnings.catch_warnings():  # Ray hands out read-only numpy arrays; we only read
            warnings.simplefilter("ignore", UserWarning)
            buffer = torch.from_numpy(_uint8_array(buffer))
    buffer = buffer.reshape(-1)
    if buffer.dtype != torch.uint8:
        raise ValueError(f"bucket buffer must be uint8, got {buffer.dtype}")
    entries, explicit = _entries(metadata)
    out, end = [], 0
    for name, dtype_str, shape, offset in entries:
        dtype = dtype_from_name(dtype_str)
        size = _nbytes(dtype, shape)
        end = max(end, offset + size)
        if offset + size > buffer.numel():
            raise ValueError(f"bucket buffer too short for {name}: needs {offset + size} bytes, "
                             f"has {buffer.numel()}")
        chunk = buffer[offset:offset + size]
        if (buffer.storage_offset() + offset) % torch.empty((), dtype=dtype).element_size():
            chunk = chunk.clone()  # a dtype view needs an aligned storage offset
        out.append((name, chunk.view(dtype).reshape(shape)))
    if not explicit and end != buffer.numel():
        raise ValueError(f"bucket buffer has {buffer.numel()} bytes, metadata describes {end}")
    return out


def _uint8_array(buffer: torch.Tensor | np.ndarray | bytes | memoryview) -> np.ndarray:
    """A flat uint8 numpy view of a CPU buffer (no copy when already contiguous)."""
    if isinstance(buffer, torch.Tensor):
        buffer = buffer.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    if isinstance(buffer, np.ndarray):
        return np.ascontiguousarray(buffer).reshape(-1).view(np.uint8)
    return np.frombuffer(buffer, dtype=np.uint8)


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 over ``dtype name | shape | raw bytes`` of one tensor."""
    digest = hashlib.sha256(f"{dtype_name(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
    digest.update(memoryview(_raw_bytes(tensor).numpy()))
    return digest.hexdigest()


def named_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the tensors in sorted name order, each ``"name|dtype|shape\\n"`` then its
    raw bytes: the formula of ``rollout.weight_sync.weights_digest``, so a learner's digest and
    a rollout engine's compare bit for bit."""
    tensors = dict(named_tensors)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{dtype_name(tensor.dtype)}|{tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(_raw_bytes(tensor).numpy()))
    return digest.hexdigest()


def combine_digests(named_digests: Iterable[tuple[str, str]]) -> str:
    """sha256 over ``name=tensor_digest\\n`` lines, in the order given."""
    digest = hashlib.sha256()
    for name, value in named_digests:
        digest.update(f"{name}={value}\n".encode())
    return digest.hexdigest()


@dataclass
class WeightLoadStats:
    """What one weight update moved (``RolloutActor.load_weights`` reports bytes and seconds)."""

    bytes: int = 0
    seconds: float = 0.0
    tensors: int = 0


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
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(),
                                      self.vllm_config.model_config)
        # Cached vision-encoder outputs are reset by the engine (VllmEngine.finish_weight_update):
        # the scheduler keeps its own record of them, which a worker-side reset would desync.
        reset = getattr(self.model_runner, "reset_lora_state", None)
        if callable(reset):
            reset()

    def load_named_tensors(
        self, named_tensors: Sequence[tuple[str, torch.Tensor]], record_digests: bool = True
    ) -> int:
        """Load checkpoint-named tensors into the running model (vLLM shards and fuses them);
        a session of its own unless one is open."""
        from vllm.config import set_current_vllm_config

        named_tensors = list(named_tensors)
        if record_digests:  # a host copy of what arrived, for weights_digest
            received = self.__dict__.setdefault("_umerl_received", {})
            for name, tensor in named_tensors:
                received[name] = tensor.detach().to("cpu", copy=True)

        own_session = not getattr(self, "_umerl_session", False)
        if own_session:
            self.begin_weight_sync()
        try:
            with set_current_vllm_config(self.vllm_config):
                self.model_runner.get_model().load_weights(weights=iter(named_tensors))
        finally:
            if own_session:
                self.finish_weight_sync()
        return len(named_tensors)

    def load_bucket(
        self, metadata: Sequence[Any], buffer: bytes | memoryview | np.ndarray | torch.Tensor,
        record_digests: bool = True,
    ) -> int:
        """``load_named_tensors`` of one packed bucket: the form ``collective_rpc`` carries
        (vLLM's msgpack RPC decodes tensors nested in arguments as plain lists, bytes as bytes).
        """
        return self.load_named_tensors(unpack_bucket(buffer, metadata), record_digests)

    def received_digest(self, names: Sequence[tuple[str, str]]) -> str:
        """``named_digest`` of the tensors last received, ``names`` being (learner name,
        checkpoint name) pairs: hashed under the learner name, as the learner hashes them."""
        received = self.__dict__.get("_umerl_received", {})
        missing = [stored for _, stored in names if stored not in received]
        if missing:
            raise KeyError(f"never received (or record_digests off): {missing[:5]}")
        return named_digest((name, received[stored]) for name, stored in names)

    def parameters_digest(self) -> str:
        """``combine_digests`` over the served model's own parameters (vLLM names, sorted): a
        bit-exact fingerprint of what this worker generates with."""
        params = dict(self.model_runner.get_model().named_parameters())
        return combine_digests((name, tensor_digest(params[name])) for name in sorted(params))

    def init_broadcast_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int
    ) -> int:
        """Join the learners' weight-broadcast group; returns this worker's rank in it.

        Rank 0 is the learner that broadcasts; vLLM workers take ``rank_offset + worker rank``.
        Blocks until every member joins, so the learner must join concurrently.
        """
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = get_world_group().rank + rank_offset
        group = StatelessProcessGroup.create(
            host=master_address, port=master_port, rank=rank, world_size=world_size
        )
        self._umerl_comm = PyNcclCommunicator(group, device=self.device)
        return rank

    def receive_broadcast(self, metadata: Sequence[Any], record_digests: bool = True) -> int:
        """Receive one bucket broadcast from rank 0 and load it; returns its byte count."""
        comm = getattr(self, "_umerl_comm", None)
        if comm is None:
            raise RuntimeError("receive_broadcast before init_broadcast_group")
        size = bucket_size(metadata)
        buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        comm.broadcast(buffer, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        self.load_named_tensors(unpack_bucket(buffer, metadata), record_digests)
        return size


class VllmEngine:
    """Samples from a vLLM ``LLM`` serving ``checkpoint`` (see the module docstring).

    ``checkpoint`` must already hold ``<disc_emb>`` and ``<gen_emb>`` in its tokenizer (SFT
    checkpoints do). ``llm_kwargs`` go to ``vllm.LLM`` unchanged (e.g.
    ``distributed_executor_backend``, ``kv_cache_memory_bytes``). ``record_digests`` makes each
    worker keep a host copy of the weights it last received, for ``weights_digest`` (the
    learner-vs-rollout check): one extra host copy of the synced weights per worker, so turn it
    off for large models once syncs are trusted. ``bucket_bytes`` sizes ``load_weights``'s RPCs.
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
        record_digests: bool = True,
        bucket_bytes: int = 256 << 20,
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
                             "saved after umerl.model.add_embedding_tokens (e.g. an SFT one)")
        self.gen_id, self.disc_id = vocab[GEN_EMB], vocab[DISC_EMB]
        self.stop_ids = (self.gen_id, vocab[IM_END])
        self.suppressed_ids, self.bad_words = self._suppressed(vocab)
        self.video_fps = video_fps
        self.record_digests = record_digests
        self.bucket_bytes = bucket_bytes
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
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if seeds is not None and len(seeds) != len(sides):
            raise ValueError(f"{len(sides)} sides but {len(seeds)} seeds")
        if not sides:
            return []
        if seeds is None:
            # One call-level seed: distinct per (side, sample), reproducible for the same call.
            base = sampling.seed
            seeds = [None if base is None else base + i * n for i in range(len(sides))]
        prompts = [self.prompt(side) for side in sides]
        params = [self.sampling_params(sampling, n, seed) for seed in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for output in outputs:
            samples = sorted(output.outputs, key=lambda c: c.index)
            completions = [_strip_after_stop(list(c.token_ids), self.stop_ids) for c in samples]
            if not sampling.do_sample:
                completions = [list(completions[0]) for _ in range(n)]
            result.append(completions)
        return result

    def sampling_params(self, sampling: SamplingParams, n: int, seed: int | None) -> Any:
        """Our ``SamplingParams`` as a ``vllm.SamplingParams`` for one side."""
        import vllm

        common = dict(
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(self.stop_ids),
            ignore_eos=True,  # stop exactly at stop_ids, not also at the config's EOS ids
            bad_words=list(self.bad_words),
            repetition_penalty=1.0,
            detokenize=False,
        )
        if not sampling.do_sample:
            return vllm.SamplingParams(n=1, temperature=0.0, **common)
        return vllm.SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_k=sampling.top_k if sampling.top_k and sampling.top_k > 0 else 0,
            top_p=sampling.top_p,
            seed=seed,
            **common,
        )

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

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightLoadStats:
        """Push learner-named tensors into every worker, packed in buckets of about
        ``bucket_bytes`` and sent through ``collective_rpc`` (names: ``to_checkpoint_name``)."""
        start = time.perf_counter()
        stats = WeightLoadStats()
        with self._weight_update():
            bucket: list[tuple[str, torch.Tensor]] = []
            size = 0
            for name, tensor in named_tensors:
                bucket.append((to_checkpoint_name(name, self.model_type), tensor))
                size += tensor.numel() * tensor.element_size()
                if size >= self.bucket_bytes:
                    self._send_bucket(*pack_bucket(bucket), stats)
                    bucket, size = [], 0
            if bucket:
                self._send_bucket(*pack_bucket(bucket), stats)
        stats.seconds = time.perf_counter() - start
        return stats

    def load_weights_from_payload(self, payload: Any) -> WeightLoadStats:
        """Load learner buckets: an iterable of ``(metadata, buffer)`` pairs or of bucket objects
        (``.metas`` + ``.buffer``, as weight_sync's ``Bucket``), or an object whose ``.refs``
        hold such buckets as Ray object refs (weight_sync's ``SyncPayload``): fetched one at a
        time, so one bucket at most is in this process. Names are learner names."""
        start = time.perf_counter()
        stats = WeightLoadStats()
        with self._weight_update():
            for item in getattr(payload, "refs", payload):
                if type(item).__name__ == "ObjectRef":
                    import ray

                    item = ray.get(item)
                metadata, buffer = ((item.metas, item.buffer) if hasattr(item, "metas")
                                    else item)
                mapped = [(to_checkpoint_name(name, self.model_type), dtype, shape, offset)
                          for name, dtype, shape, offset in meta_entries(metadata)]
                self._send_bucket(mapped, buffer, stats)
                del item, buffer
        stats.seconds = time.perf_counter() - start
        return stats

    @contextmanager
    def _weight_update(self) -> Iterator[None]:
        self.begin_weight_update()
        try:
            yield
        finally:
            self.finish_weight_update()

    def begin_weight_update(self) -> None:
        """Open a weight-update session in every worker (before ``receive_broadcast``)."""
        self.llm.collective_rpc("begin_weight_sync")

    def finish_weight_update(self) -> None:
        """Close the session: finish the layers' processing, drop state built on old weights."""
        self.llm.collective_rpc("finish_weight_sync")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        # Vision-encoder outputs too; through the engine core, which clears the scheduler's
        # encoder-cache manager and the model runners' caches together (vLLM 0.32).
        self.llm.llm_engine.reset_encoder_cache()

    def _send_bucket(self, metadata: Sequence[Any], buffer: Any, stats: WeightLoadStats) -> None:
        array = _uint8_array(buffer)
        entries = meta_entries(metadata)
        counts = self.llm.collective_rpc(
            "load_bucket",
            args=([list(e) for e in entries], memoryview(array)),
            kwargs={"record_digests": self.record_digests},
        )
        stats.tensors += int(counts[0])
        stats.bytes += sum(_nbytes(dtype_from_name(d), shape) for _, d, shape, _ in entries)

    def init_broadcast_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int
    ) -> list[int]:
        """Every worker joins the learners' NCCL group (GPU only); returns their ranks."""
        return self.llm.collective_rpc(
            "init_broadcast_group", args=(master_address, master_port, rank_offset, world_size)
        )

    def receive_broadcast(self, metadata: Sequence[Any]) -> int:
        """Receive one broadcast bucket in every worker (blocks until rank 0 sends it).

        ``metadata`` (learner names) is any form ``meta_entries`` reads; rank 0 broadcasts a
        uint8 buffer of ``bucket_size(metadata)`` bytes. Bracket the buckets of one update with
        ``begin_weight_update`` / ``finish_weight_update``.
        """
        entries = [[to_checkpoint_name(name, self.model_type), dtype, list(shape), offset]
                   for name, dtype, shape, offset in meta_entries(metadata)]
        sizes = self.llm.collective_rpc(
            "receive_broadcast", args=(entries,), kwargs={"record_digests": self.record_digests}
        )
        return int(sizes[0])

    def weights_digest(self, names: Sequence[str]) -> str:
        """``named_digest`` of the tensors last received under the learner ``names``: equal to
        ``rollout.weight_sync.weights_digest(learner_model, names)`` after a sync. Needs
        ``record_digests`` (each worker keeps a host copy of what it received)."""
        pairs = [(name, to_checkpoint_name(name, self.model_type)) for name in sorted(set(names))]
        return _same(self.llm.collective_rpc("received_digest", args=(pairs,)))

    def parameters_digest(self) -> list[str]:
        """Per worker: a bit-exact fingerprint of the parameters it serves (vLLM layout)."""
        return self.llm.collective_rpc("parameters_digest")

    def close(self) -> None:
        """Stop vLLM's engine-core process (the engine is unusable afterwards)."""
        llm = self.__dict__.pop("llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()


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
