"""Weight sync: bucketing, bit-exact loading, the object-store path on a real local Ray, and the
gloo broadcaster between two real processes (the protocol the GPU NCCL path shares)."""

from __future__ import annotations

import os
import socket
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rollout.weight_sync import (
    GlooBroadcaster,
    NcclBroadcaster,
    ObjectStoreSender,
    load_weights,
    pack_buckets,
    receive,
    unpack_bucket,
    weights_digest,
)


class TinyNet(nn.Module):
    """A 2-layer MLP on top of a (frozen, bfloat16) embedding, plus a buffer."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 16).to(torch.bfloat16)
        self.embed.weight.requires_grad_(False)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8).to(torch.float16)
        self.register_buffer("scale", torch.full((8,), float(seed)))


def trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad]


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(10, generator=g)),                                # float32, 40 B
        ("b", torch.randn(3, 4, generator=g).to(torch.bfloat16)),           # bfloat16, 24 B
        ("c", torch.tensor(float("nan"), dtype=torch.float16)),             # 0-d, 2 B
        ("big", torch.randn(300_000, generator=g)),                         # 1.2 MB
        ("d", torch.arange(5, dtype=torch.int64) - 2**40),                  # int64, 40 B
        ("e", torch.empty(0, 7)),                                           # empty
    ]


# Hand-computed with 64-byte aligned offsets, e.g. bucket_bytes=256: [a@0 b@64 c@128] | [big]
# | [d@0 e@64]; bucket_bytes=64: [a] [b] [c] [big] [d e@64].
@pytest.mark.parametrize("bucket_bytes,expected", [(64, 5), (256, 3), (1 << 20, 3), (64 << 20, 1)])
def test_pack_unpack_round_trip(bucket_bytes: int, expected: int) -> None:
    tensors = mixed_tensors()
    buckets = pack_buckets(tensors, bucket_bytes)
    assert len(buckets) == expected
    for bucket in buckets:
        buf = bucket.buffer
        assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.ndim == 1
        assert buf.flags.c_contiguous
        assert buf.nbytes <= bucket_bytes or len(bucket.metas) == 1
        assert all(m.offset % 64 == 0 for m in bucket.metas)
    big = next(b for b in buckets if any(m.name == "big" for m in b.metas))
    assert len(big.metas) == 1 or bucket_bytes > 1_200_000
    out = [pair for bucket in buckets for pair in unpack_bucket(bucket)]
    assert [n for n, _ in out] == [n for n, _ in tensors]
    for (_, src), (_, dst) in zip(tensors, out, strict=True):
        assert dst.dtype == src.dtype and dst.shape == src.shape
        assert raw(dst) == raw(src)  # bit for bit, NaN included


def test_unpacked_tensors_view_the_buffer_and_pack_copies_noncontiguous() -> None:
    src = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()  # non-contiguous
    (bucket,) = pack_buckets([("t", src)])
    (_, view), = unpack_bucket(bucket)
    assert torch.equal(view, src)
    start = bucket.buffer.ctypes.data
    assert start <= view.data_ptr() < start + bucket.buffer.nbytes  # a view, not a copy


def test_pack_rejects_duplicates_and_bad_bucket_size() -> None:
    with pytest.raises(ValueError, match="'x'"):
        pack_buckets([("x", torch.ones(2)), ("x", torch.ones(2))])
    with pytest.raises(ValueError):
        pack_buckets([("x", torch.ones(2))], bucket_bytes=0)


def test_load_weights_is_bit_exact_and_names_bad_parameters() -> None:
    src, dst = TinyNet(0), TinyNet(1)
    assert weights_digest(src) != weights_digest(dst)
    names = [n for n, _ in src.named_parameters()] + ["scale"]
    tensors = [(n, t) for n, t in list(src.named_parameters()) + list(src.named_buffers())]
    loaded = load_weights(dst, tensors)
    assert loaded == sum(t.numel() * t.element_size() for _, t in tensors)
    assert weights_digest(dst, names) == weights_digest(src, names)
    assert isinstance(dst.fc1.weight, nn.Parameter) and dst.fc1.weight.requires_grad

    other = TinyNet(2)
    before = weights_digest(other)
    good = ("fc1.bias", src.fc1.bias.detach())
    with pytest.raises(ValueError, match="fc9.weight"):
        load_weights(other, [good, ("fc9.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"fc2\.weight.*shape"):
        load_weights(other, [good, ("fc2.weight", torch.zeros(8, 31, dtype=torch.float16))])
    with pytest.raises(ValueError, match=r"fc2\.weight.*dtype"):
        load_weights(other, [good, ("fc2.weight", torch.zeros(8, 32))])
    assert weights_digest(other) == before  # checked before the first copy: nothing loaded
    assert load_weights(other, [good, ("fc9.weight", torch.zeros(3))], strict=False) == 32 * 4
    assert torch.equal(other.fc1.bias, src.fc1.bias)
    with pytest.raises(ValueError, match="nope"):
        weights_digest(other, ["nope"])


def test_nccl_broadcaster_refuses_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        NcclBroadcaster("127.0.0.1", 1, 2, 0)


# --- object store, real local Ray ------------------------------------------------------------


class Holder:
    """A rollout-actor stand-in holding its own copy of the model."""

    def __init__(self, seed: int):
        torch.set_num_threads(1)
        self.model = TinyNet(seed)

    def digest(self, names: list[str]) -> str:
        return weights_digest(self.model, names)

    def receive(self, payload) -> tuple[int, int]:
        stats = receive(payload, self.model)
        return stats.bytes, stats.tensors


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 << 20, log_to_driver=False)
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_object_store_sync_of_trainable_subset(local_ray) -> None:
    ray = local_ray
    src = TinyNet(0)
    with torch.no_grad():  # a "training update" on the trainable parameters
        for _, p in trainable(src):
            p.add_(0.5)
    actor = ray.remote(Holder).options(num_cpus=1).remote(seed=1)
    train_names = [n for n, _ in trainable(src)]
    frozen = ["embed.weight", "scale"]
    frozen_before = ray.get(actor.digest.remote(frozen))
    assert ray.get(actor.digest.remote(train_names)) != weights_digest(src, train_names)

    payload = ObjectStoreSender(bucket_bytes=1024).publish(trainable(src))
    assert len(payload.refs) > 1 and payload.tensors == 4
    assert payload.bytes == sum(t.numel() * t.element_size() for _, t in trainable(src))
    fetched = ray.get(payload.refs[0])  # zero-copy: a read-only view of shared memory
    assert not fetched.buffer.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(unpack_bucket(fetched))) == len(fetched.metas)
    del fetched

    assert ray.get(actor.receive.remote(payload)) == (payload.bytes, payload.tensors)
    assert ray.get(actor.digest.remote(train_names)) == weights_digest(src, train_names)
    assert ray.get(actor.digest.remote(frozen)) == frozen_before != weights_digest(src, frozen)

    bad = ObjectStoreSender().publish([("fc1.weight", torch.zeros(3, 3))])
    with pytest.raises(ray.exceptions.RayTaskError, match="fc1.weight"):
        ray.get(actor.receive.remote(bad))
    assert ray.get(actor.digest.remote(train_names)) == weights_digest(src, train_names)
    ray.kill(actor)


# --- gloo broadcaster between two processes --------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_receiver(port: int, results) -> None:
    """Rank 1: has a default process group of its own (like a learner's), receives 3 syncs."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        model = TinyNet(1)
        names = [n for n, _ in trainable(model)]
        bcast = GlooBroadcaster("127.0.0.1", port, world_size=2, rank=1, timeout_s=60)
        for _ in range(4):
            try:
                stats = bcast.receive(model)
                results.put(("ok", weights_digest(model, names), stats.bytes,
                             weights_digest(model, ["embed.weight"])))
            except (ValueError, RuntimeError) as exc:
                results.put(("error", type(exc).__name__, str(exc)))
        results.put(("default_group", dist.get_world_size()))
        bcast.close()
        dist.destroy_process_group()
    except Exception as exc:  # surface anything else to the test instead of a timeout
        results.put(("crash", repr(exc)))


def test_gloo_broadcast_between_processes() -> None:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    had_default_group = dist.is_initialized()  # earlier tests in this process may have one
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    child = ctx.Process(target=gloo_receiver, args=(port, results), daemon=True)
    child.start()
    try:
        src = TinyNet(0)
        names = [n for n, _ in trainable(src)]
        frozen_child = weights_digest(TinyNet(1), ["embed.weight"])
        bcast = GlooBroadcaster("127.0.0.1", port, world_size=2, rank=0, timeout_s=60)
        sent = bcast.send(trainable(src), bucket_bytes=1500)  # several buckets
        first = results.get(timeout=60)
        assert first == ("ok", weights_digest(src, names), sent.bytes, frozen_child), first

        # A bad entry in the first of several buckets: the receiver drains the rest of the
        # stream, then raises naming the parameter ...
        bcast.send([("ghost", torch.ones(4)), *trainable(src)], bucket_bytes=1500)
        kind, error, message = results.get(timeout=60)
        assert (kind, error) == ("error", "ValueError") and "ghost" in message
        # A sender that fails after its first bucket went out tells the receivers so.
        duplicate = [*trainable(src)[:2], ("fc1.weight", src.fc1.weight.detach())]
        with pytest.raises(ValueError, match="twice"):
            bcast.send(duplicate, bucket_bytes=1500)
        kind, error, message = results.get(timeout=60)
        assert (kind, error) == ("error", "RuntimeError") and "sender failed" in message
        # ... and the group stays usable: the next sync lands bit for bit.
        with torch.no_grad():
            src.fc2.weight.mul_(-3)
        bcast.send(trainable(src), bucket_bytes=1 << 20)
        assert results.get(timeout=60)[:2] == ("ok", weights_digest(src, names))
        assert results.get(timeout=60) == ("default_group", 1)
        # the broadcaster neither created nor replaced a default group here
        assert dist.is_initialized() == had_default_group
        bcast.close()
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
