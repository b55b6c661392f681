"""Weight sync: the learners' trainable weights into every rollout engine, after each update.

One protocol, three byte paths. Both sides build the same ``BucketPlan`` once, at start, from
the learners' (name, full shape, dtype) list: tensors packed greedily, in the learners' order,
into buckets of about ``rl.weight_sync_bucket_mb``, each tensor at a 64-byte aligned offset (so
a slice of the flat ``uint8`` buffer can be viewed as any dtype, bfloat16 included). A sync is
then the plan's buckets in order, with nothing else on the wire: no per-sync header, no pickle.

    sender (learner rank 0)                         receivers (every rollout worker)
    for bucket k:                                   for bucket k:
        buffer k%2 <- free (bucket k-2 sent)            buffer <- bucket k arrives
        pack bucket k into it                           hand its tensors to the engine
        post bucket k (asynchronous)                    (bucket k+1 is already arriving)
    finish: everything delivered                    finish: everything loaded

So the sender packs bucket k+1 (under ZeRO-3: every learner rank gathers it) while bucket k is
in flight, and a receiver loads bucket k while bucket k+1 arrives. The byte paths
(``open_channel``), chosen by ``rl.weight_sync_transport``:

``nccl``  GPU clusters. A NCCL communicator of its own between learner rank 0 and every vLLM
          worker of every rollout actor (all tensor-parallel ranks: each receives full tensors
          and its model's ``load_weights`` shards them), made with vLLM's
          ``stateless_init_process_group`` (a private ``TCPStore`` and ``PyNcclCommunicator``,
          so neither side's default process group is touched, and vLLM's pinned NCCL settings
          are lifted as on its own workers). Broadcasts run on a side stream, ordered against
          the packing stream with events. NOT run on the CPU-only build machines.
``shm``   CPU, every receiver on the sender's node (the CPU default there): the bytes go
          through two shared-memory slots in ``/dev/shm``, one copy in, one copy out per
          receiver; a gloo group carries only one barrier per bucket.
``gloo``  CPU across nodes: the bytes ride a gloo broadcast.

A receiver that dies mid-stream breaks the gloo connection and the other ranks raise at once;
a hung peer is bounded by ``rl.weight_sync_timeout_s`` (the gloo timeout, and the driver's wait
on every side of the sync). NCCL reports no error for a missing peer: its broadcast just never
completes. So no rank ever blocks in ``synchronize()``: each waits by polling a CUDA event
against that same timeout (``wait_until``), aborts the communicator when it passes and raises
``TimeoutError``, and the actor is free again for the driver's recovery calls.
``Digest`` is the one fingerprint both sides compute, over the
plan's tensors in plan order, so the driver can prove the pools agree bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from umerl.data.dtypes import DTYPES, torch_dtype

ALIGN = 64  # byte alignment of every tensor inside a bucket (any dtype view is then legal)
TRANSPORTS = ("nccl", "shm", "gloo")


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"torch.bfloat16"`` -> ``"bfloat16"`` (checked against DTYPES)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} cannot be synced (known: {', '.join(DTYPES)})")
    return name


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives inside its bucket's flat buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # a DTYPES key
    offset: int  # bytes from the start of the bucket, a multiple of ALIGN
    nbytes: int


@dataclass(frozen=True)
class BucketPlan:
    """The layout of every sync of a run: buckets of tensors, and each bucket's byte size."""

    buckets: tuple[tuple[TensorMeta, ...], ...]
    sizes: tuple[int, ...]
    bucket_bytes: int  # ``build(plan.specs(), plan.bucket_bytes)`` is the same plan

    @classmethod
    def build(cls, specs: Iterable[tuple[str, Sequence[int], torch.dtype | str]],
              bucket_bytes: int) -> BucketPlan:
        """Greedy, in input order: a tensor that would overflow a non-empty bucket starts the
        next one (so a tensor larger than ``bucket_bytes`` sits alone in its bucket)."""
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        buckets: list[list[TensorMeta]] = [[]]
        sizes, seen, size = [0], set(), 0
        for name, shape, dtype in specs:
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice in one weight sync")
            seen.add(name)
            shape = tuple(int(d) for d in shape)
            dtype = dtype_name(dtype)
            nbytes = _numel(shape) * torch.empty((), dtype=torch_dtype(dtype)).element_size()
            start = _aligned(size)
            if buckets[-1] and start + nbytes > bucket_bytes:
                buckets.append([])
                sizes.append(0)
                start = 0
            buckets[-1].append(TensorMeta(name, shape, dtype, start, nbytes))
            size = sizes[-1] = start + nbytes
        if not buckets[-1]:
            return cls((), (), bucket_bytes)
        return cls(tuple(tuple(b) for b in buckets), tuple(sizes), bucket_bytes)

    @classmethod
    def of(cls, named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> BucketPlan:
        return cls.build(((n, t.shape, t.dtype) for n, t in named), bucket_bytes)

    def specs(self) -> list[tuple[str, list[int], str]]:
        """(name, shape, dtype) in plan order: picklable, and ``build`` gives the plan back."""
        return [(m.name, list(m.shape), m.dtype) for bucket in self.buckets for m in bucket]

    @property
    def names(self) -> list[str]:
        return [m.name for bucket in self.buckets for m in bucket]

    @property
    def bytes(self) -> int:
        return sum(m.nbytes for bucket in self.buckets for m in bucket)

    @property
    def largest(self) -> int:
        return max(self.sizes, default=0)

    def check_targets(self, targets: Mapping[str, torch.Tensor], who: str) -> None:
        """Every planned tensor exists in ``targets`` with the same shape and dtype; raises
        naming the first one that does not (before any byte moves: no partial load)."""
        for bucket in self.buckets:
            for meta in bucket:
                dst = targets.get(meta.name)
                if dst is None:
                    raise ValueError(f"weight sync: {who} has no parameter {meta.name!r}")
                if tuple(dst.shape) != meta.shape or dtype_name(dst.dtype) != meta.dtype:
                    raise ValueError(
                        f"weight sync: {who}'s {meta.name!r} is {tuple(dst.shape)} "
                        f"{dtype_name(dst.dtype)}, the learners send {meta.shape} {meta.dtype} "
                        "(rollout.dtype must be the learners' training dtype)")


def _numel(shape: Sequence[int]) -> int:
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (a view when it is contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def fill_bucket(flat: torch.Tensor, metas: Sequence[TensorMeta],
                tensors: Sequence[torch.Tensor]) -> None:
    """Copy each tensor's bytes into its slot of ``flat`` (any device to any device)."""
    if len(metas) != len(tensors):
        raise ValueError(f"a bucket of {len(metas)} tensors got {len(tensors)}")
    for meta, tensor in zip(metas, tensors, strict=True):
        if tensor.numel() * tensor.element_size() != meta.nbytes:
            raise ValueError(f"weight sync: {meta.name!r} has {tuple(tensor.shape)}, the plan "
                             f"says {meta.shape}")
        if meta.nbytes:
            flat[meta.offset:meta.offset + meta.nbytes].copy_(_raw(tensor))


def bucket_views(flat: torch.Tensor, metas: Sequence[TensorMeta]
                 ) -> list[tuple[str, torch.Tensor]]:
    """Typed, shaped views into a flat uint8 buffer (no copies)."""
    out = []
    for meta in metas:
        dtype = torch_dtype(meta.dtype)
        raw = flat[meta.offset:meta.offset + meta.nbytes]
        out.append((meta.name, raw.view(dtype).view(meta.shape) if meta.nbytes
                    else torch.empty(meta.shape, dtype=dtype, device=flat.device)))
    return out


class Digest:
    """sha256 over the plan's tensors in plan order: ``name|dtype|shape`` then the raw bytes.

    Equal on two sides iff every tensor is bit-for-bit equal. Fed bucket by bucket
    (``update``) while a sync streams, or all at once from a model (``of``).
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named:
            self._hash.update(f"{name}|{dtype_name(tensor.dtype)}|{tuple(tensor.shape)}\n"
                              .encode())
            self._hash.update(_raw(tensor).cpu().numpy().data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    @classmethod
    def of(cls, plan: BucketPlan, tensors: Mapping[str, torch.Tensor]) -> str:
        digest = cls()
        digest.update((name, tensors[name]) for name in plan.names)
        return digest.hexdigest()


@dataclass(frozen=True)
class SyncStats:
    bytes: int
    seconds: float
    digest: str | None = None  # only when asked for

    def as_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "seconds": self.seconds, "digest": self.digest}


# ---------------------------------------------------------------------------------------------
# Sender and receiver: the protocol, whatever the byte path


class WeightSender:
    """Learner rank 0: ``send`` one sync from an iterable of per-bucket tensor lists.

    The iterable is consumed lazily, one bucket ahead of the wire: a generator that gathers a
    bucket's ZeRO-3 shards inside ``with GatheredParameters(...)`` and yields inside it keeps
    the gathered tensors alive exactly while they are packed.
    """

    def __init__(self, channel: Any, plan: BucketPlan):
        self.channel, self.plan = channel, plan

    def send(self, buckets: Iterable[Sequence[torch.Tensor]], digest: bool = False
             ) -> SyncStats:
        try:
            return self._send(buckets, digest)
        except BaseException:
            self.channel.close()  # drop the connections: every peer fails now, not at timeout
            raise

    def _send(self, buckets: Iterable[Sequence[torch.Tensor]], digest: bool) -> SyncStats:
        start = time.perf_counter()
        hasher = Digest() if digest else None
        source = iter(buckets)
        for k, metas in enumerate(self.plan.buckets):
            tensors = next(source, None)
            if tensors is None:
                raise ValueError(f"weight sync: {len(self.plan.buckets)} buckets planned, "
                                 f"{k} given")
            flat = self.channel.send_buffer(k, self.plan.sizes[k])
            fill_bucket(flat, metas, tensors)
            if hasher is not None:
                hasher.update(bucket_views(flat, metas))
            self.channel.post(k)
        if next(source, None) is not None:  # also closes a gathering generator's last context
            raise ValueError(f"weight sync: more than {len(self.plan.buckets)} buckets given")
        self.channel.finish()
        return SyncStats(self.plan.bytes, time.perf_counter() - start,
                         hasher.hexdigest() if hasher else None)

    def close(self) -> None:
        self.channel.close()


class WeightReceiver:
    """A rollout worker: ``receive`` one sync, handing each bucket's (name, tensor) views to
    ``sink`` (views valid during the call unless the channel was opened with ``fresh``)."""

    def __init__(self, channel: Any, plan: BucketPlan,
                 sink: Callable[[list[tuple[str, torch.Tensor]]], Any]):
        self.channel, self.plan, self.sink = channel, plan, sink

    def receive(self, digest: bool = False) -> SyncStats:
        try:
            return self._receive(digest)
        except BaseException:
            self.channel.close()  # as the sender's: a broken sync fails every rank at once
            raise

    def _receive(self, digest: bool) -> SyncStats:
        start = time.perf_counter()
        hasher = Digest() if digest else None
        for k, metas in enumerate(self.plan.buckets):
            flat = self.channel.receive(k, self.plan.sizes)
            views = bucket_views(flat, metas)
            if hasher is not None:
                hasher.update(views)
            self.sink(views)
        self.channel.finish()
        return SyncStats(self.plan.bytes, time.perf_counter() - start,
                         hasher.hexdigest() if hasher else None)

    def close(self) -> None:
        self.channel.close()


def load_into(targets: Mapping[str, torch.Tensor]) -> Callable[[list[tuple[str, torch.Tensor]]],
                                                                None]:
    """A sink copying each received tensor into the target of its name (checked at start by
    ``BucketPlan.check_targets``; nothing is cast: the sync is bit-exact or it fails)."""

    @torch.no_grad()
    def sink(views: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in views:
            targets[name].copy_(tensor)

    return sink


# ---------------------------------------------------------------------------------------------
# Byte paths


@dataclass(frozen=True)
class ChannelSpec:
    """Everything a rank needs to join one sync group (picklable; the driver hands it out)."""

    transport: str
    address: str
    port: int
    world_size: int
    timeout_s: float
    largest_bucket: int
    shm_prefix: str = ""


def open_channel(spec: ChannelSpec, rank: int, device: torch.device | str = "cpu",
                 fresh: bool = False) -> Any:
    """Join the sync group as ``rank`` (0 sends). Every rank must call this concurrently: it
    blocks until all have joined. ``fresh``: each received bucket in its own memory (for
    engines that keep references to what they load, as vLLM's layerwise reload does)."""
    if spec.transport not in TRANSPORTS:
        raise ValueError(f"unknown weight-sync transport {spec.transport!r} ({TRANSPORTS})")
    if not 0 <= rank < spec.world_size:
        raise ValueError(f"rank {rank} is outside a sync group of {spec.world_size}")
    device = torch.device(device)
    if spec.transport == "nccl":
        return BroadcastChannel(_Nccl(spec, rank, device), rank, device, fresh)
    group = _gloo_group(spec, rank)
    if spec.transport == "gloo":
        return BroadcastChannel(_Gloo(group), rank, torch.device("cpu"), fresh)
    return SharedMemoryChannel(_Gloo(group), spec, rank, fresh)


def _gloo_group(spec: ChannelSpec, rank: int) -> Any:
    """A gloo group of its own (own ``TCPStore``, rank 0 listens): the learners' DeepSpeed
    group and vLLM's groups are neither needed nor touched. Gloo picks its network interface
    from the hostname; set ``GLOO_SOCKET_IFNAME`` on multi-homed nodes."""
    import torch.distributed as dist

    timeout = timedelta(seconds=spec.timeout_s)
    store = dist.TCPStore(spec.address, spec.port, spec.world_size, is_master=rank == 0,
                          timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore("umerl/weight_sync", store), rank,
                                 spec.world_size, timeout)


class _Gloo:
    """Broadcasts and barriers on a gloo group; both asynchronous, with ``.wait()``."""

    def __init__(self, group: Any):
        self.group = group

    def broadcast(self, tensor: torch.Tensor) -> Any:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        return self.group.broadcast([tensor], options)

    def barrier(self) -> None:
        self.group.allreduce([torch.zeros(1)]).wait()

    def synchronize(self) -> None:
        """Gloo's waits are complete when they return."""

    def close(self) -> None:
        self.group = None


def wait_until(done: Callable[[], bool], timeout_s: float, what: str,
               abort: Callable[[], None]) -> None:
    """Poll ``done()`` until it is true; past ``timeout_s``, ``abort()`` (drop this rank's
    connections and cancel its stuck work) and raise ``TimeoutError``.

    The wait NCCL lacks: a broadcast whose peer died or stopped reading never completes and
    never fails, and ``stream.synchronize()`` would block this process for ever."""
    deadline = time.monotonic() + timeout_s
    pause = 1e-4
    while not done():
        if time.monotonic() > deadline:
            abort()
            raise TimeoutError(f"weight sync: {what} not complete after "
                               f"rl.weight_sync_timeout_s={timeout_s:g} s (a peer died or stopped "
                               "reading); the sync group was aborted")
        time.sleep(pause)
        pause = min(2 * pause, 0.01)  # quick for a fast bucket, cheap for a slow one


@dataclass
class PolledWork:
    """One posted broadcast: ``wait()`` returns once ``done()`` is true (bounded by
    ``wait_until``), then runs ``then()`` (on GPU: order the current stream after it)."""

    done: Callable[[], bool]
    timeout_s: float
    what: str
    abort: Callable[[], None]
    then: Callable[[], None] = lambda: None

    def wait(self) -> None:
        wait_until(self.done, self.timeout_s, self.what, self.abort)
        self.then()


class _Nccl:
    """Broadcasts over vLLM's ``PyNcclCommunicator`` on a side stream (GPU only).

    ``broadcast`` enqueues on the side stream after the work already queued on the current
    stream (the packing), and returns a ``PolledWork`` on an event recorded after it; its
    ``wait()`` polls the event (bounded by ``rl.weight_sync_timeout_s``), then makes the current
    stream wait for it, so a buffer is refilled, or a received bucket read, only once its
    broadcast is done.
    """

    def __init__(self, spec: ChannelSpec, rank: int, device: torch.device):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"weight-sync transport 'nccl' needs a CUDA device, got {device}; "
                               "on CPU use rl.weight_sync_transport: shm or gloo")
        try:
            from vllm.distributed.weight_transfer.nccl_common import (
                stateless_init_process_group,
            )
        except ImportError as exc:
            raise RuntimeError("weight-sync transport 'nccl' needs vLLM (pip install "
                               "'umerl[gpu]') on learner rank 0 and every rollout worker") from exc
        self.device, self.timeout_s = device, spec.timeout_s
        with torch.cuda.device(device):
            self.comm = stateless_init_process_group(spec.address, spec.port, rank,
                                                     spec.world_size, device)
            self.stream = torch.cuda.Stream(device)

    def broadcast(self, tensor: torch.Tensor) -> PolledWork:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        self.comm.broadcast(tensor, src=0, stream=self.stream)
        tensor.record_stream(self.stream)
        event = torch.cuda.Event()
        event.record(self.stream)
        return PolledWork(event.query, self.timeout_s, "a NCCL broadcast", self.close,
                          lambda: torch.cuda.current_stream(self.device).wait_event(event))

    def synchronize(self) -> None:
        """Both streams drained, each polled against the timeout (never ``synchronize()``)."""
        for stream, what in ((self.stream, "the NCCL stream"),
                             (torch.cuda.current_stream(self.device), "the current CUDA stream")):
            event = torch.cuda.Event()
            event.record(stream)
            wait_until(event.query, self.timeout_s, what, self.close)

    def close(self) -> None:
        """vLLM's ``destroy`` calls ``ncclCommAbort`` (in a thread it waits 5 s for): unlike
        ``ncclCommDestroy`` it needs no peer, and it ends the broadcasts still in flight."""
        if self.comm is None:
            return
        destroy = getattr(self.comm, "destroy", None)
        if callable(destroy):
            destroy()
        self.comm = None


class BroadcastChannel:
    """Bucket bytes carried by a broadcast (NCCL on GPU, gloo on CPU), double-buffered within
    a sync; the buffers are freed at its end (``finish``)."""

    def __init__(self, collective: Any, rank: int, device: torch.device, fresh: bool):
        self.collective, self.rank, self.device, self.fresh = collective, rank, device, fresh
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._works: list[Any] = [None, None]
        self._received: dict[int, torch.Tensor] = {}
        self._pending: torch.Tensor | None = None

    def _buffer(self, slot: int, size: int) -> torch.Tensor:
        buf = self._buffers[slot]
        if self.fresh or buf is None or buf.numel() < size:
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            if not self.fresh:
                self._buffers[slot] = buf
        return buf[:size]

    def _wait(self, slot: int) -> None:
        if self._works[slot] is not None:
            self._works[slot].wait()
            self._works[slot] = None

    # sender
    def send_buffer(self, k: int, size: int) -> torch.Tensor:
        self._wait(k % 2)  # bucket k-2 has left this buffer
        buf = self._buffer(k % 2, size)
        self._pending = buf
        return buf

    def post(self, k: int) -> None:
        self._works[k % 2] = self.collective.broadcast(self._pending)

    # receiver: bucket k+1 is posted before bucket k is handed out
    def receive(self, k: int, sizes: Sequence[int]) -> torch.Tensor:
        if k == 0:
            self._post_receive(0, sizes[0])
        if k + 1 < len(sizes):
            self._post_receive(k + 1, sizes[k + 1])
        self._wait(k % 2)
        return self._received.pop(k)

    def _post_receive(self, k: int, size: int) -> None:
        buf = self._buffer(k % 2, size)
        self._received[k] = buf
        self._works[k % 2] = self.collective.broadcast(buf)

    def finish(self) -> None:
        """Every broadcast done; then the two bucket buffers are dropped, not kept for the
        next sync: on learner rank 0 they are 2 x the largest bucket (2 x 1.09 GB for 7B's
        vocabulary matrices) that the training step between syncs can use instead (the
        caching allocator hands the freed blocks to it). Allocating them again costs one
        allocation per buffer per sync, nothing beside the sync's bytes."""
        self._wait(0)
        self._wait(1)
        self.collective.synchronize()
        self._received.clear()
        self._buffers = [None, None]
        self._pending = None

    def close(self) -> None:
        self.collective.close()


class SharedMemoryChannel:
    """Bucket bytes through two shared-memory slots on one node; gloo carries the barriers.

    Per bucket k, every rank enters barrier k once the sender has packed bucket k into slot
    k%2 and each receiver has finished bucket k-1. After it, the receivers read slot k%2 while
    the sender packs bucket k+1 into the other slot (whose last reader, bucket k-1, is done).
    ``finish`` is one more barrier, so the next sync cannot overwrite a slot still being read.
    The slot files are unlinked as soon as every rank has mapped them: nothing is left behind.
    """

    def __init__(self, gloo: _Gloo, spec: ChannelSpec, rank: int, fresh: bool):
        self.gloo, self.rank, self.fresh = gloo, rank, fresh
        size = max(int(spec.largest_bucket), 1)
        paths = [f"{spec.shm_prefix}-{slot}" for slot in (0, 1)]
        if rank == 0:
            for path in paths:
                with open(path, "wb") as f:
                    f.truncate(size)
        self.gloo.barrier()  # the files exist
        self.slots = [torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
                      for path in paths]
        self.gloo.barrier()  # every rank has mapped them
        if rank == 0:
            for path in paths:
                os.unlink(path)

    def send_buffer(self, k: int, size: int) -> torch.Tensor:
        return self.slots[k % 2][:size]

    def post(self, k: int) -> None:
        self.gloo.barrier()

    def receive(self, k: int, sizes: Sequence[int]) -> torch.Tensor:
        self.gloo.barrier()
        view = self.slots[k % 2][:sizes[k]]
        return view.clone() if self.fresh else view

    def finish(self) -> None:
        self.gloo.barrier()

    def close(self) -> None:
        self.slots = []
        self.gloo.close()


def shm_free_bytes() -> int:
    """Free bytes in /dev/shm (0 where there is none): the ``shm`` transport needs two slots."""
    import shutil

    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return 0


def iter_named(tensors: Mapping[str, torch.Tensor], plan: BucketPlan
               ) -> Iterator[list[torch.Tensor]]:
    """The per-bucket tensor lists ``WeightSender.send`` takes, from tensors by name."""
    for bucket in plan.buckets:
        yield [tensors[m.name] for m in bucket]
