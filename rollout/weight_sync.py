"""Weight sync: the learners' trainable weights, after each update, into the rollout engines.

Everything moves in **buckets**: many tensors packed into one flat ``uint8`` buffer, so a sync is
a handful of large transfers instead of one per parameter (per-parameter RPCs and broadcasts are
where published refit time goes, not the wire). A bucket's layout is a list of ``TensorMeta``
(name, shape, dtype, byte offset, byte length); every tensor starts at a 64-byte aligned offset,
so a slice of the flat buffer can be viewed as any dtype, bfloat16 included (numpy has no
bfloat16: bytes go through ``tensor.view(torch.uint8)``, never through numpy dtypes).

Three transports share that layout:

``ObjectStoreSender`` / ``receive``  (CPU default, runs and is tested here)
    Learner rank 0 ``ray.put``s one ``Bucket`` per object (its buffer is a numpy array, which Ray
    stores out of band: readers get a read-only view of the shared memory, no copy) and hands the
    driver a small ``SyncPayload`` of object refs. Each rollout actor ``ray.get``s the buckets one
    at a time and copies them into its parameters, so at most one bucket is materialised at once.
``GlooBroadcaster``  (CPU, runs and is tested here)
    A stand-alone gloo communicator (own ``TCPStore``, ``ProcessGroupGloo`` built directly, the
    default process group untouched) between learner rank 0 and the rollout workers; rank 0
    broadcasts a self-describing stream of buckets.
``NcclBroadcaster``  (GPU clusters only; NOT run by any test on the CPU-only build machines)
    The same stream over a vLLM ``PyNcclCommunicator`` on a ``StatelessProcessGroup``.

Both broadcasters inherit the stream protocol from ``_Broadcaster``; they differ only in how one
tensor is broadcast. ``load_weights`` and ``weights_digest`` are the shared receive-side pieces:
the driver compares the learner's digest with every rollout actor's after a sync (bit for bit).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

DEFAULT_BUCKET_BYTES = 64 << 20
ALIGN = 64  # byte alignment of every tensor inside a bucket (any dtype view is then legal)

NamedTensors = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives inside a bucket's flat buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype without the "torch." prefix, e.g. "bfloat16"
    offset: int  # bytes from the start of the buffer, a multiple of ALIGN
    nbytes: int


@dataclass
class Bucket:
    """One flat, C-contiguous, 1-D ``uint8`` numpy buffer and the layout of its tensors."""

    buffer: np.ndarray
    metas: tuple[TensorMeta, ...]

    @property
    def nbytes(self) -> int:
        """Payload bytes (without the alignment padding)."""
        return sum(m.nbytes for m in self.metas)


@dataclass(frozen=True)
class SyncPayload:
    """What the driver passes from learner rank 0 to the rollout actors: refs, not tensors.

    ``layout`` repeats each bucket's metadata so that a receiver checks every name, shape and
    dtype against its model *before* fetching anything: a mismatch fails without a partial load.
    """

    refs: list[Any]  # one ray.ObjectRef[Bucket] per bucket
    layout: list[tuple[TensorMeta, ...]]
    bytes: int
    tensors: int
    published_at: float  # time.time() when publishing started
    publish_seconds: float  # packing + ray.put


@dataclass(frozen=True)
class SyncStats:
    bytes: int
    seconds: float
    tensors: int


# ---------------------------------------------------------------------------------------------
# Layout, packing, unpacking (shared by every transport)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r} in a weight-sync bucket")
    return dtype


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes as a flat uint8 tensor (a view when it is already contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _plan(named_tensors: NamedTensors, bucket_bytes: int
          ) -> Iterator[tuple[list[TensorMeta], list[torch.Tensor], int]]:
    """Greedy bucketing in input order: (metas, tensors, buffer size) per bucket.

    A tensor that would overflow a non-empty bucket starts the next one; a tensor larger than
    ``bucket_bytes`` therefore always sits alone in its bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    seen: set[str] = set()
    metas: list[TensorMeta] = []
    tensors: list[torch.Tensor] = []
    size = 0
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in one weight sync")
        seen.add(name)
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        start = _aligned(size)
        if metas and start + nbytes > bucket_bytes:
            yield metas, tensors, size
            metas, tensors, start = [], [], 0
        metas.append(TensorMeta(name, tuple(tensor.shape), _dtype_name(tensor.dtype), start,
                                nbytes))
        tensors.append(tensor)
        size = start + nbytes
    if metas:
        yield metas, tensors, size


def _fill(flat: torch.Tensor, metas: Sequence[TensorMeta], tensors: Sequence[torch.Tensor]
          ) -> None:
    """Copy each tensor's bytes into its slot of ``flat`` (any device to any device)."""
    for meta, tensor in zip(metas, tensors, strict=True):
        if meta.nbytes:
            flat[meta.offset:meta.offset + meta.nbytes].copy_(_as_bytes(tensor))


def _views(flat: torch.Tensor, metas: Sequence[TensorMeta]
           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Typed, shaped views into a flat uint8 tensor (no copies)."""
    for meta in metas:
        dtype = _torch_dtype(meta.dtype)
        if meta.nbytes == 0:
            yield meta.name, torch.empty(meta.shape, dtype=dtype, device=flat.device)
            continue
        raw = flat[meta.offset:meta.offset + meta.nbytes]
        yield meta.name, raw.view(dtype).view(meta.shape)


def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int = DEFAULT_BUCKET_BYTES
                 ) -> Iterator[Bucket]:
    """Like ``pack_buckets`` but one bucket at a time, so only one is in memory at once."""
    for metas, tensors, size in _plan(named_tensors, bucket_bytes):
        buffer = np.zeros(size, dtype=np.uint8)  # zeros: the alignment padding is deterministic
        _fill(torch.from_numpy(buffer), metas, tensors)
        yield Bucket(buffer, tuple(metas))


def pack_buckets(named_tensors: NamedTensors, bucket_bytes: int = DEFAULT_BUCKET_BYTES
                 ) -> list[Bucket]:
    """Pack (name, tensor) pairs of any dtype, shape and device into host buckets."""
    return list(iter_buckets(named_tensors, bucket_bytes))


def unpack_bucket(bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs whose tensors are views of ``bucket.buffer``: nothing is copied.

    A bucket from ``ray.get`` is backed by the object store's shared memory and its buffer is
    read-only. ``torch.frombuffer`` can not mark a tensor read-only, so it warns; that warning is
    silenced here on purpose, because the alternative (copying the buffer to make it writable)
    would double the receive cost, and the only consumer, ``load_weights``, copies each view into
    its parameter anyway. The contract instead: treat these tensors as read-only and do not keep
    them beyond loading (they also pin the object-store buffer while they live).
    """
    if bucket.buffer.nbytes == 0:
        flat = torch.empty(0, dtype=torch.uint8)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(bucket.buffer, dtype=torch.uint8)
    yield from _views(flat, bucket.metas)


# ---------------------------------------------------------------------------------------------
# Loading and checking


def _targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name; tied weights are reachable under each alias."""
    targets: dict[str, torch.Tensor] = dict(model.named_buffers(remove_duplicate=False))
    targets.update(model.named_parameters(remove_duplicate=False))
    return targets


def _check(targets: dict[str, torch.Tensor], name: str, shape: Sequence[int],
           dtype: torch.dtype, strict: bool) -> torch.Tensor | None:
    dst = targets.get(name)
    if dst is None:
        if strict:
            raise ValueError(f"weight sync: the model has no parameter or buffer {name!r}")
        return None
    if tuple(dst.shape) != tuple(shape):
        raise ValueError(f"weight sync: parameter {name!r} has shape {tuple(shape)}, "
                         f"the model's has {tuple(dst.shape)}")
    if dst.dtype != dtype:
        raise ValueError(f"weight sync: parameter {name!r} has dtype {dtype}, "
                         f"the model's has {dst.dtype}")
    return dst


def _load(targets: dict[str, torch.Tensor], named_tensors: NamedTensors, strict: bool) -> int:
    """Check every pair first, then copy: a bad entry leaves the model untouched."""
    pairs = []
    for name, src in named_tensors:
        dst = _check(targets, name, src.shape, src.dtype, strict)
        if dst is not None:
            pairs.append((dst, src))
    loaded = 0
    with torch.no_grad():
        for dst, src in pairs:
            dst.data.copy_(src)
            loaded += src.numel() * src.element_size()
    return loaded


def load_weights(model: torch.nn.Module, named_tensors: NamedTensors, strict: bool = True) -> int:
    """Copy (name, tensor) pairs into the model's parameters/buffers of those names.

    Names are the model's own ``named_parameters()`` / ``named_buffers()`` names. Unknown names
    raise ValueError (``strict=False`` skips them instead); a shape or dtype mismatch always
    raises, naming the parameter, and nothing is cast: the sync is bit-exact or it fails. All
    pairs are checked before the first copy. Returns the number of bytes loaded.
    """
    return _load(_targets(model), named_tensors, strict)


def weights_digest(model: torch.nn.Module, names: Iterable[str] | None = None) -> str:
    """sha256 over name, dtype, shape and raw bytes of the named tensors, in sorted name order.

    ``names`` defaults to every ``named_parameters()`` name; buffers may be named explicitly.
    Two models have equal digests over the same names iff those tensors are bit-for-bit equal.
    """
    targets = _targets(model)
    if names is None:
        names = [name for name, _ in model.named_parameters()]
    missing = sorted(set(names) - set(targets))
    if missing:
        raise ValueError(f"weights_digest: the model has no parameter or buffer {missing[0]!r}")
    return tensors_digest((name, targets[name]) for name in set(names))


def tensors_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The digest of ``weights_digest`` over (name, tensor) pairs, in sorted name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(f"{name}|{_dtype_name(tensor.dtype)}|{tuple(tensor.shape)}\n".encode())
        digest.update(_as_bytes(tensor).cpu().numpy().data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Object store (CPU default)


class ObjectStoreSender:
    """Learner rank 0 side: publish trainable weights to the Ray object store, bucket by bucket.

    The returned ``SyncPayload`` is small and picklable; pass it to every rollout actor, which
    calls ``receive`` (``ObjectStoreSender.receive`` is the same function). Refs nested in a
    dataclass argument are not resolved by Ray, so each receiver fetches the buckets itself, one
    at a time. The objects are owned by the publishing process and freed once no payload copy
    refers to them any more.
    """

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.bucket_bytes = int(bucket_bytes)

    def publish(self, named_tensors: NamedTensors) -> SyncPayload:
        import ray

        wall, start = time.time(), time.perf_counter()
        refs: list[Any] = []
        layout: list[tuple[TensorMeta, ...]] = []
        total = count = 0
        for bucket in iter_buckets(named_tensors, self.bucket_bytes):
            refs.append(ray.put(bucket))
            layout.append(bucket.metas)
            total += bucket.nbytes
            count += len(bucket.metas)
            del bucket  # at most one packed bucket in this process's memory
        return SyncPayload(refs, layout, total, count, wall, time.perf_counter() - start)

    @staticmethod
    def receive(payload: SyncPayload, model: torch.nn.Module, strict: bool = True) -> SyncStats:
        return receive(payload, model, strict)


def receive(payload: SyncPayload, model: torch.nn.Module, strict: bool = True) -> SyncStats:
    """Rollout side: fetch each bucket of ``payload`` (zero-copy) and load it into ``model``.

    The whole layout is checked against the model before the first fetch.
    """
    import ray

    start = time.perf_counter()
    targets = _targets(model)
    for metas in payload.layout:
        for meta in metas:
            _check(targets, meta.name, meta.shape, _torch_dtype(meta.dtype), strict)
    loaded = tensors = 0
    for ref in payload.refs:
        bucket: Bucket = ray.get(ref)
        loaded += _load(targets, unpack_bucket(bucket), strict)
        tensors += len(bucket.metas)
        del bucket  # drop the view before fetching the next one
    return SyncStats(loaded, time.perf_counter() - start, tensors)


# ---------------------------------------------------------------------------------------------
# Collective broadcast (gloo on CPU, NCCL on GPU): one protocol, two communicators

Sink = torch.nn.Module | Callable[[list[tuple[str, torch.Tensor]]], Any]
_END, _ABORT = 0, -1  # header lengths with a special meaning


class _Broadcaster:
    """Rank 0 sends a stream of buckets, every other rank receives it.

    Per bucket three broadcasts: the header length (int64[1]), the JSON header (uint8: size and
    the ``TensorMeta`` fields), then the flat uint8 buffer; length 0 ends the stream and -1 says
    the sender failed (it raises too, receivers raise instead of waiting for buckets). The
    stream describes itself, so receivers need no side channel, and JSON (not pickle) means the
    wire never executes code. A receiver that hits a bad entry keeps draining the stream and
    raises only at its end, so neither the sender nor the other receivers hang; buckets that
    were fine are loaded (the model is then partly updated: treat the error as fatal).
    Subclasses set ``rank``, ``world_size`` and ``device`` and implement ``_broadcast``.
    """

    rank: int
    world_size: int
    device: torch.device

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        raise NotImplementedError

    def _length(self, value: int) -> torch.Tensor:
        return torch.tensor([value], dtype=torch.int64, device=self.device)

    def _synchronize(self) -> None:
        """Block until every enqueued broadcast has completed (gloo's are synchronous)."""

    def close(self) -> None:
        raise NotImplementedError

    def send(self, named_tensors: NamedTensors, bucket_bytes: int = DEFAULT_BUCKET_BYTES
             ) -> SyncStats:
        if self.rank != 0:
            raise RuntimeError(f"only rank 0 sends weights; this is rank {self.rank}")
        start = time.perf_counter()
        total = count = 0
        plan = _plan(named_tensors, bucket_bytes)
        while True:
            try:  # everything that can fail locally, before this bucket's first broadcast
                item = next(plan, None)
                if item is None:
                    break
                metas, tensors, size = item
                header = json.dumps({"size": size, "tensors": [
                    [m.name, list(m.shape), m.dtype, m.offset, m.nbytes] for m in metas]}).encode()
                flat = torch.zeros(size, dtype=torch.uint8, device=self.device)
                _fill(flat, metas, tensors)
            except Exception:
                self._broadcast(self._length(_ABORT), 0)  # receivers raise instead of hanging
                raise
            self._broadcast(self._length(len(header)), 0)
            self._broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8)
                            .to(self.device), 0)
            if size:
                self._broadcast(flat, 0)
            total += sum(m.nbytes for m in metas)
            count += len(metas)
            del flat
        self._broadcast(self._length(_END), 0)
        self._synchronize()
        return SyncStats(total, time.perf_counter() - start, count)

    def receive(self, sink: Sink, strict: bool = True) -> SyncStats:
        """Receive one stream. ``sink`` is a module (``load_weights`` semantics) or a callable
        taking each bucket's (name, tensor) views, e.g. a vLLM model's ``load_weights``; the
        views alias the receive buffer and are only valid during the call."""
        if self.rank == 0:
            raise RuntimeError("rank 0 is the sender")
        targets = _targets(sink) if isinstance(sink, torch.nn.Module) else None
        start = time.perf_counter()
        total = count = 0
        error: Exception | None = None
        while True:
            length_t = self._length(0)
            self._broadcast(length_t, 0)
            length = int(length_t.item())
            if length == _END:
                break
            if length == _ABORT:
                raise RuntimeError("weight sync: the sender failed mid-stream (see its error); "
                                   "this model may be partly updated")
            raw = torch.zeros(length, dtype=torch.uint8, device=self.device)
            self._broadcast(raw, 0)
            header = json.loads(raw.cpu().numpy().tobytes())
            metas = [TensorMeta(n, tuple(s), d, o, b) for n, s, d, o, b in header["tensors"]]
            flat = torch.empty(int(header["size"]), dtype=torch.uint8, device=self.device)
            if flat.numel():
                self._broadcast(flat, 0)
            if error is None:  # after an error: only drain the stream, then raise
                try:
                    total += _deliver(sink, targets, flat, metas, strict)
                    count += len(metas)
                except Exception as exc:
                    error = exc
            del flat  # release this bucket before the next one is allocated
        self._synchronize()
        if error is not None:
            raise error
        return SyncStats(total, time.perf_counter() - start, count)


def _deliver(sink: Sink, targets: dict[str, torch.Tensor] | None, flat: torch.Tensor,
             metas: Sequence[TensorMeta], strict: bool) -> int:
    items = list(_views(flat, metas))
    if targets is not None:
        return _load(targets, items, strict)
    sink(items)
    return sum(m.nbytes for m in metas)


class GlooBroadcaster(_Broadcaster):
    """CPU broadcaster over a gloo group of its own: learner rank 0 plus the rollout workers.

    ``world_size = 1 + number of receiving processes``; rank 0 (the sender) hosts the
    ``TCPStore`` on ``master_port``, and every rank must construct its broadcaster concurrently
    (the constructor blocks until all have joined). The ``ProcessGroupGloo`` is built directly
    on that store, so ``torch.distributed``'s default group (the learners' DeepSpeed group) is
    neither needed nor touched. Gloo picks its network interface from the hostname; set
    ``GLOO_SOCKET_IFNAME`` on multi-homed nodes.
    """

    def __init__(self, master_addr: str, master_port: int, world_size: int, rank: int,
                 timeout_s: float = 300.0):
        import torch.distributed as dist

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")
        self._store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0,
                                    timeout=timeout)
        self._group = dist.ProcessGroupGloo(dist.PrefixStore("umerl/weight_sync", self._store),
                                            rank, world_size, timeout)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = src, 0
        self._group.broadcast([tensor], options).wait()

    def close(self) -> None:
        self._group = None
        self._store = None


class NcclBroadcaster(_Broadcaster):
    """GPU broadcaster: learner rank 0 -> every rollout (vLLM) GPU worker over NCCL.

    UNTESTED HERE: the build machines are CPU-only, so no test runs this class; its protocol
    (everything but ``_broadcast``) is the one ``GlooBroadcaster``'s tests exercise.

    ``torch.distributed.new_group`` can only span ranks of the default group, and the learners'
    default group (DeepSpeed) does not contain the vLLM workers, which have groups of their own.
    So, as vLLM's own RLHF weight transfer and TRL's ``VLLMClient`` do, the group is made with
    ``vllm.distributed.utils.StatelessProcessGroup.create`` (a private ``TCPStore``: rank 0
    listens on ``master_port``) and the data plane is a
    ``vllm.distributed.device_communicators.pynccl.PyNcclCommunicator`` on it; with vLLM 0.32
    (the pinned version) both are made by ``vllm.distributed.weight_transfer.nccl_common.
    stateless_init_process_group``, which also lifts the NCCL_* settings vLLM pins in its own
    workers (a peer whose NCCL settings differ can hang). vLLM must therefore be importable on
    learner rank 0 as well. Using vLLM's NCCL wrapper on both sides also keeps both on the same
    NCCL library.

    Ranks: 0 is learner rank 0; a vLLM worker with tensor-parallel rank ``t`` in engine ``e``
    (TP size ``T``) is ``1 + e * T + t``: every TP worker receives full tensors and its model's
    ``load_weights`` shards them. ``world_size = 1 + engines * T``. Every rank must construct its
    broadcaster concurrently (e.g. the driver issues the Ray calls on both sides, then waits),
    and engines must not generate while receiving. Under ZeRO-3 the caller gathers each
    parameter on learner rank 0 (all learner ranks take part in the gather) before ``send``.
    Broadcasts run on the current CUDA stream; ``send``/``receive`` synchronise it at the end.
    """

    def __init__(self, master_addr: str, master_port: int, world_size: int, rank: int,
                 device: torch.device | int | str | None = None):
        if not torch.cuda.is_available():
            raise RuntimeError("NcclBroadcaster needs CUDA, and this process sees no GPU; on "
                               "CPU use ObjectStoreSender or GlooBroadcaster")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.device = (torch.device("cuda", torch.cuda.current_device()) if device is None
                       else torch.device(device))
        if self.device.type != "cuda":
            raise ValueError(f"NcclBroadcaster needs a CUDA device, got {self.device}")
        try:
            from vllm.distributed.weight_transfer.nccl_common import (
                stateless_init_process_group,
            )
        except ImportError:  # older vLLM: the two documented pieces by hand
            try:
                from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
                from vllm.distributed.utils import StatelessProcessGroup
            except ImportError as exc:
                raise RuntimeError("NcclBroadcaster needs vLLM (its StatelessProcessGroup and "
                                   "PyNcclCommunicator) on every rank") from exc

            def stateless_init_process_group(master_address, master_port, rank, world_size,
                                             device):
                group = StatelessProcessGroup.create(host=master_address, port=master_port,
                                                     rank=rank, world_size=world_size)
                return PyNcclCommunicator(group, device=device)

        with torch.cuda.device(self.device):
            self._comm = stateless_init_process_group(master_addr, master_port, rank, world_size,
                                                      self.device)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self._comm.broadcast(tensor, src=src)

    def _synchronize(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        destroy = getattr(self._comm, "destroy", None)
        if callable(destroy):
            destroy()
        self._comm = None
