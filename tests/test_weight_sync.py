"""Weight sync protocol: the bucket plan, the digest (against hashlib by hand), and the shm and
gloo byte paths between real ranks (threads, and a killed process mid-stream). The loop's own
use (learner actors -> rollout actors) is in test_rl.py; vLLM workers in test_vllm_engine.py."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import socket
import threading
import time

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from rollout.weight_sync import (
    ALIGN,
    BroadcastChannel,
    BucketPlan,
    ChannelSpec,
    Digest,
    PolledWork,
    WeightReceiver,
    WeightSender,
    bucket_views,
    fill_bucket,
    iter_named,
    load_into,
    open_channel,
)


def mixed_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(10, generator=g),                                # float32, 40 B
        "b": torch.randn(3, 4, generator=g).to(torch.bfloat16),           # bfloat16, 24 B
        "c": torch.tensor(float("nan"), dtype=torch.float16),             # 0-d, 2 B
        "big": torch.randn(300_000, generator=g),                         # 1.2 MB, alone
        "d": torch.arange(5, dtype=torch.int64) - 2**40,                  # int64, 40 B
        "e": torch.empty(0, 7),                                           # empty
        "f": torch.randn(1000, generator=g).to(torch.bfloat16),
    }


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plan_packs_greedily_aligned_and_rebuilds_from_its_specs():
    tensors = mixed_tensors()
    plan = BucketPlan.of(tensors.items(), bucket_bytes=4096)
    assert [[m.name for m in b] for b in plan.buckets] == [["a", "b", "c"], ["big"],
                                                           ["d", "e", "f"]]
    for bucket, size in zip(plan.buckets, plan.sizes, strict=True):
        assert all(m.offset % ALIGN == 0 for m in bucket)
        assert size == bucket[-1].offset + bucket[-1].nbytes
    assert plan.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert BucketPlan.build(plan.specs(), plan.bucket_bytes) == plan
    with pytest.raises(ValueError, match="twice"):
        BucketPlan.build([("x", [2], "float32"), ("x", [2], "float32")], 64)
    with pytest.raises(ValueError, match="cannot be synced"):
        BucketPlan.build([("x", [2], "complex64")], 64)


def test_fill_and_views_are_bit_exact_for_every_dtype():
    tensors = mixed_tensors()
    plan = BucketPlan.of(tensors.items(), bucket_bytes=4096)
    for metas, size, group in zip(plan.buckets, plan.sizes, iter_named(tensors, plan),
                                  strict=True):
        flat = torch.zeros(size, dtype=torch.uint8)
        fill_bucket(flat, metas, group)
        for name, view in bucket_views(flat, metas):
            assert view.dtype == tensors[name].dtype and view.shape == tensors[name].shape
            assert raw(view) == raw(tensors[name])  # NaN and int64 included: bytes, not values


def test_digest_matches_hashlib_by_hand_and_is_dtype_and_order_sensitive():
    tensors = mixed_tensors()
    plan = BucketPlan.of(tensors.items(), bucket_bytes=4096)
    by_hand = hashlib.sha256()
    for name in plan.names:
        t = tensors[name]
        by_hand.update(f"{name}|{str(t.dtype)[6:]}|{tuple(t.shape)}\n".encode() + raw(t))
    assert Digest.of(plan, tensors) == by_hand.hexdigest()
    streamed = Digest()
    for metas, group in zip(plan.buckets, iter_named(tensors, plan), strict=True):
        streamed.update(zip([m.name for m in metas], group, strict=True))
    assert streamed.hexdigest() == by_hand.hexdigest()
    as_half = dict(tensors, a=tensors["a"].half().float())  # rounded: other bytes
    assert Digest.of(plan, as_half) != by_hand.hexdigest()
    reordered = BucketPlan.of(reversed(list(tensors.items())), bucket_bytes=4096)
    assert Digest.of(reordered, tensors) != by_hand.hexdigest()


def run_group(transport: str, syncs: list[dict[str, torch.Tensor]], receivers: int,
              bucket_bytes: int, slow: bool = False) -> tuple[list[str], list[list[dict]]]:
    """Sender + ``receivers`` receiver ranks in threads; every sync's weights into every
    receiver's own tensors. Returns the sender's digests and each receiver's copies."""
    plan = BucketPlan.of(syncs[0].items(), bucket_bytes)
    spec = ChannelSpec(transport, "127.0.0.1", free_port(), 1 + receivers, 30.0, plan.largest,
                       shm_prefix=f"/dev/shm/umerl-test-{free_port()}")
    sent: list[str] = []
    got: list[list[dict]] = [[] for _ in range(receivers)]
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            s = WeightSender(open_channel(spec, 0), plan)
            for weights in syncs:
                sent.append(s.send(iter_named(weights, plan), digest=True).digest)
            s.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def receiver(i: int) -> None:
        try:
            mine = {n: torch.zeros_like(t) for n, t in syncs[0].items()}
            copy = load_into(mine)

            def sink(views):
                if slow and i == 0:
                    time.sleep(0.01)  # the sender runs ahead: slots must not be overwritten
                copy(views)

            r = WeightReceiver(open_channel(spec, 1 + i), plan, sink)
            for _ in syncs:
                stats = r.receive(digest=True)
                assert stats.digest == Digest.of(plan, mine)
                got[i].append({n: t.clone() for n, t in mine.items()})
            r.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=sender)] + [
        threading.Thread(target=receiver, args=(i,)) for i in range(receivers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return sent, got


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_two_receivers_get_every_sync_bit_exact(transport):
    """Three syncs of different weights, buckets of 4 KB (odd and even bucket counts use both
    slots), one receiver slow: each receiver ends each sync with exactly the sender's bytes."""
    syncs = [mixed_tensors(seed) for seed in (1, 2, 3)]
    sent, got = run_group(transport, syncs, receivers=2, bucket_bytes=4096, slow=True)
    for k, weights in enumerate(syncs):
        plan = BucketPlan.of(weights.items(), 4096)
        assert sent[k] == Digest.of(plan, weights)
        for copies in got:
            assert all(raw(copies[k][n]) == raw(weights[n]) for n in weights)
    assert len(set(sent)) == 3


def _dying_receiver(spec: ChannelSpec, specs, bucket_bytes: int) -> None:
    import os

    plan = BucketPlan.build(specs, bucket_bytes)
    count = [0]

    def sink(views):
        count[0] += 1
        if count[0] == 2:
            os._exit(3)  # killed mid-stream, after one bucket

    WeightReceiver(open_channel(spec, 1), plan, sink).receive()


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_a_receiver_killed_mid_stream_fails_the_sender_fast(transport):
    weights = {f"w{i}": torch.randn(50_000) for i in range(8)}  # 8 buckets of 200 KB
    plan = BucketPlan.of(weights.items(), 200_000)
    spec = ChannelSpec(transport, "127.0.0.1", free_port(), 2, 20.0, plan.largest,
                       shm_prefix=f"/dev/shm/umerl-test-{free_port()}")
    child = mp.get_context("spawn").Process(target=_dying_receiver,
                                            args=(spec, plan.specs(), plan.bucket_bytes))
    child.start()
    sender = WeightSender(open_channel(spec, 0), plan)
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        for _ in range(3):
            sender.send(iter_named(weights, plan))
    assert time.monotonic() - start < 20.0  # the broken connection, not the timeout
    child.join(timeout=30)
    assert child.exitcode == 3


class StandInNcclGroup:
    """Stand-in for NCCL's missing error (the real one needs a GPU per rank): a broadcast is
    complete only once every rank has posted it, and a rank that stops posting makes nobody
    fail, the others' broadcasts just stay incomplete for ever, as NCCL's do. Each rank's
    waits are the ``PolledWork`` that ``_Nccl`` returns, on a "done?" callable here instead of
    ``torch.cuda.Event.query``; ``close`` records the abort (``_Nccl.close``: ncclCommAbort)."""

    def __init__(self, world: int, timeout_s: float):
        self.world, self.timeout_s = world, timeout_s
        self.posted: dict[int, dict[int, torch.Tensor]] = {}
        self.lock = threading.Lock()
        self.aborted: list[int] = []

    def rank(self, rank: int) -> StandInNcclRank:
        return StandInNcclRank(self, rank)


class StandInNcclRank:
    def __init__(self, group: StandInNcclGroup, rank: int):
        self.group, self.rank, self.posts = group, rank, 0

    def broadcast(self, tensor: torch.Tensor) -> PolledWork:
        seq, self.posts = self.posts, self.posts + 1
        with self.group.lock:
            self.group.posted.setdefault(seq, {})[self.rank] = tensor

        def done() -> bool:
            return len(self.group.posted[seq]) == self.group.world

        def deliver() -> None:
            if self.rank:
                tensor.copy_(self.group.posted[seq][0])

        return PolledWork(done, self.group.timeout_s, "a stand-in broadcast", self.close,
                          deliver)

    def synchronize(self) -> None:
        """Every wait already went through ``PolledWork``."""

    def close(self) -> None:
        self.group.aborted.append(self.rank)


@pytest.mark.parametrize("who_stops", ["receiver", "sender"])
def test_a_peer_that_stops_mid_sync_is_a_timeout_not_a_hang(who_stops):
    """A receiver that stops reading after the first bucket (or a sender that stops sending
    after it): the other side's broadcast never completes and, with NCCL, never errors. Its
    wait ends in a TimeoutError naming rl.weight_sync_timeout_s within the timeout plus a
    little, and aborts its communicator."""
    weights = {f"w{i}": torch.randn(1000) for i in range(6)}  # 6 buckets of 4 KB
    plan = BucketPlan.of(weights.items(), 4096)
    timeout_s = 2.0
    group = StandInNcclGroup(2, timeout_s)
    stop = threading.Event()  # the stopped side waits here for ever (until the test ends)
    outcome: dict[str, BaseException | float] = {}

    def buckets():
        for k, tensors in enumerate(iter_named(weights, plan)):
            if who_stops == "sender" and k == 2:
                stop.wait()
            yield tensors

    def sink(views):
        if who_stops == "receiver":
            stop.wait()  # the first bucket's load never returns: no further bucket is read

    def run(side: str, work) -> None:
        start = time.monotonic()
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - the test's subject
            outcome[side] = exc
            outcome[f"{side}_s"] = time.monotonic() - start

    sender = WeightSender(BroadcastChannel(group.rank(0), 0, torch.device("cpu"), False), plan)
    receiver = WeightReceiver(BroadcastChannel(group.rank(1), 1, torch.device("cpu"), False),
                              plan, sink)
    waiting = "receiver" if who_stops == "sender" else "sender"
    threads = {"sender": threading.Thread(target=run, daemon=True,
                                          args=("sender", lambda: sender.send(buckets()))),
               "receiver": threading.Thread(target=run, daemon=True,
                                            args=("receiver", receiver.receive))}
    for t in threads.values():
        t.start()
    threads[waiting].join(timeout=timeout_s + 5)
    stop.set()
    assert not threads[waiting].is_alive(), f"the {waiting} hangs"
    assert isinstance(outcome[waiting], TimeoutError), outcome
    assert "rl.weight_sync_timeout_s=2" in str(outcome[waiting])
    assert timeout_s <= outcome[f"{waiting}_s"] < timeout_s + 3
    assert group.aborted[0] == (0 if waiting == "sender" else 1)  # the waiting side aborted


def test_a_plan_that_does_not_match_the_model_fails_before_any_byte_moves():
    model = torch.nn.Linear(4, 3)
    targets = dict(model.named_parameters())
    good = BucketPlan.of(targets.items(), 1024)
    good.check_targets(targets, "the rollout model")
    wrong = BucketPlan.build([("weight", [3, 4], "bfloat16"), ("bias", [3], "float32")], 1024)
    with pytest.raises(ValueError, match=r"'weight' is \(3, 4\) float32.*bfloat16"):
        wrong.check_targets(targets, "the rollout model")
    with pytest.raises(ValueError, match="has no parameter 'extra'"):
        BucketPlan.build([("extra", [1], "float32")], 64).check_targets(targets, "it")


def test_unknown_transport_and_nccl_without_cuda_are_clear_errors():
    spec = ChannelSpec("rdma", "127.0.0.1", 1, 2, 1.0, 64)
    with pytest.raises(ValueError, match="unknown weight-sync transport 'rdma'"):
        open_channel(spec, 0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            open_channel(ChannelSpec("nccl", "127.0.0.1", 1, 2, 1.0, 64), 0)


def test_the_transport_follows_the_learners_device_and_the_rollout_nodes(monkeypatch):
    """The loop's choice (umerl.rl.choose_transport), including the GPU branch, on CPU."""
    from umerl import rl

    monkeypatch.setattr(rl, "shm_free_bytes", lambda: 10 << 30)
    here, there = "10.0.0.1", "10.0.0.2"
    assert rl.choose_transport("auto", "cuda:0", here, [here, there], 1 << 20) == "nccl"
    assert rl.choose_transport("auto", "cpu", here, [here, here], 1 << 20) == "shm"
    assert rl.choose_transport("auto", "cpu", here, [here, there], 1 << 20) == "gloo"
    assert rl.choose_transport("gloo", "cuda:1", here, [here], 1 << 20) == "gloo"
    with pytest.raises(ValueError, match="nccl needs learners on CUDA"):
        rl.choose_transport("nccl", "cpu", here, [here], 1 << 20)
    with pytest.raises(ValueError, match="shm needs every rollout actor"):
        rl.choose_transport("shm", "cpu", here, [there], 1 << 20)
    monkeypatch.setattr(rl, "shm_free_bytes", lambda: 0)  # a tiny /dev/shm: gloo, or an error
    assert rl.choose_transport("auto", "cpu", here, [here], 1 << 20) == "gloo"
    with pytest.raises(ValueError, match="free in /dev/shm"):
        rl.choose_transport("shm", "cpu", here, [here], 1 << 20)


class LoopbackCollective:
    """One rank's broadcast as a stand-in: the sender's buckets are recorded, a receiver's
    filled from them; each buffer's storage is tracked by weak reference."""

    def __init__(self, sent: list[bytes] | None = None):
        self.sent: list[bytes] = [] if sent is None else sent
        self.buffers: list[StorageWeakRef] = []
        self.receiving = sent is not None

    def broadcast(self, tensor: torch.Tensor) -> PolledWork:
        self.buffers.append(StorageWeakRef(tensor.untyped_storage()))
        if self.receiving:
            data = self.sent[len(self.buffers) - 1]
            tensor.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        else:
            self.sent.append(raw(tensor))
        return PolledWork(lambda: True, 1.0, "a loopback broadcast", lambda: None)

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_broadcast_buffers_are_freed_between_syncs():
    """After a sync the channel holds no bucket buffer, on the sender and on a receiver: every
    buffer's storage is gone once the sync returns (learner rank 0 kept two, up to 2 x 1.09 GB
    on 7B, for the whole run); the next sync allocates again and still carries every byte."""
    weights = {f"w{i}": torch.randn(1000) for i in range(5)}  # 5 buckets of 4 KB
    plan = BucketPlan.of(weights.items(), 4096)
    send_side = LoopbackCollective()
    sender = WeightSender(BroadcastChannel(send_side, 0, torch.device("cpu"), False), plan)
    for sync in range(2):
        send_side.buffers.clear()
        sender.send(iter_named(weights, plan))
        assert len(send_side.buffers) == len(plan.buckets) == 5
        assert all(ref.expired() for ref in send_side.buffers), f"sync {sync}: buffers kept"
    received: dict[str, torch.Tensor] = {}
    receive_side = LoopbackCollective(send_side.sent[-5:])
    receiver = WeightReceiver(BroadcastChannel(receive_side, 1, torch.device("cpu"), False),
                              plan, lambda views: received.update(
                                  {name: t.clone() for name, t in views}))
    receiver.receive()
    assert all(ref.expired() for ref in receive_side.buffers)
    assert received.keys() == weights.keys()
    assert all(torch.equal(received[k], weights[k]) for k in weights)
