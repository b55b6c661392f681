"""One step off-policy (rl.max_staleness: 1) and the single-forward learner.

The importance ratio of a stale rollout is checked against log-probs computed here with plain
Hugging Face forwards of the two weight versions (not umerl's policy code); the loop-level
tests run the real Ray pools on the tiny model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_rl import determined, rl_config, run_logged

from umerl.config.recipe import load_recipe
from umerl.runtime.tracking import MemoryTracker


def hf_token_logprobs(model, encoder, sides, completions,
                      temperature: float = 1.0) -> list[torch.Tensor]:
    """Each completion token's log-prob from a plain HF causal-LM forward over the batch, of
    softmax(logits / temperature)."""
    batch = encoder.policy_inputs([encoder.encode(s) for s in sides], completions)
    batch.pop("completion_lengths")
    with torch.no_grad():
        logits = model(**batch).logits.float()
    chosen = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(
        -1, batch["input_ids"][:, 1:, None])
    return [chosen[row, -len(c):, 0] for row, c in enumerate(completions)]


def hf_token_entropy(model, encoder, sides, completions, temperature: float) -> list[torch.Tensor]:
    """Each completion token's next-token entropy of softmax(logits / T), plain HF forward."""
    batch = encoder.policy_inputs([encoder.encode(s) for s in sides], completions)
    batch.pop("completion_lengths")
    with torch.no_grad():
        logits = model(**batch).logits.float()[:, :-1] / temperature
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    return [entropy[row, -len(c):] for row, c in enumerate(completions)]


def learner_config(tmp_path, *overrides: str):
    return load_recipe(None, [
        f"output_dir={tmp_path}", "rl.pairs_per_step=2", "rl.group_size=2",
        "rl.max_new_tokens=6", "learner.num_workers=1", "wandb.mode=disabled", *overrides,
    ])


def rl_pairs(benchmark_manifest, n: int = 2):
    from umerl.data.formats import read_rl_pairs

    pairs, _ = read_rl_pairs(benchmark_manifest.parent / "digits_cls" / "rl_pairs.jsonl")
    return pairs[:n]


def test_engine_logprobs_are_the_policy_logprobs_of_the_sampled_tokens(tiny_model_dir,
                                                                       benchmark_manifest):
    from rollout.transformers_engine import TransformersEngine
    from umerl.model.loading import load_policy
    from umerl.model.sampling import SamplingParams

    bundle = load_policy(str(tiny_model_dir))
    engine = TransformersEngine(bundle)
    sides = [p.query for p in rl_pairs(benchmark_manifest)]
    sampling = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=5)
    ids, lps = engine.generate_with_logprobs(sides, 3, sampling, seeds=[7, 8])
    assert ids == engine.generate(sides, 3, sampling, seeds=[7, 8])  # the same samples
    flat_sides = [s for s in sides for _ in range(3)]
    flat_ids = [c for group in ids for c in group]
    expected = hf_token_logprobs(bundle.model, bundle.encoder, flat_sides, flat_ids, 0.7)
    got = [torch.tensor(x) for group in lps for x in group]
    # The log-prob of the distribution that sampled (logits / 0.7); top-k shapes the sampling
    # only. Not the temperature-1 one, which differs here by far more than the tolerance.
    at_one = hf_token_logprobs(bundle.model, bundle.encoder, flat_sides, flat_ids)
    assert max(float((g - e).abs().max()) for g, e in zip(got, at_one)) > 1e-2
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and torch.allclose(g, e, atol=1e-5)
    assert all((g < 0).all() for g in got)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_stale_rollouts_ratio_is_exp_of_new_minus_old(tiny_model_dir, benchmark_manifest,
                                                      tmp_path, temperature):
    """Rollouts sampled by weights v0, learned from by a learner at v1: the logged ratio is
    exp(logp_v1 - logp_v0) averaged over tokens, with both log-probs computed independently;
    the clip fraction is no longer 0. The KL to the reference (v0) is the k3 of the same two.
    At rl.temperature 0.7 every log-prob (engine, learner, reference) is of logits / 0.7."""
    from rollout.transformers_engine import TransformersEngine
    from umerl.model.loading import load_policy
    from umerl.model.sampling import SamplingParams
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_single_process()
    learner = Learner(learner_config(tmp_path, "rl.lr=0.02", f"rl.temperature={temperature}"),
                      str(tiny_model_dir), str(tiny_model_dir))
    v0 = load_policy(str(tiny_model_dir))
    engine = TransformersEngine(v0)
    pairs = rl_pairs(benchmark_manifest)
    sampling = SamplingParams(max_new_tokens=6, temperature=temperature)

    def rollouts(seeds):
        q = engine.generate_with_logprobs([p.query for p in pairs], 2, sampling, seeds[:2])
        t = engine.generate_with_logprobs([p.target for p in pairs], 2, sampling, seeds[2:])
        return q, t

    (q1, _), (t1, _) = rollouts([1, 2, 3, 4])
    learner.step(StepShard(1, pairs, 0, q1, t1))  # on-policy: v0 -> v1
    (q2, q2_lp), (t2, t2_lp) = rollouts([5, 6, 7, 8])  # still sampled by v0
    v1 = copy.deepcopy(v0.model)
    v1.load_state_dict(learner.bundle.model.state_dict())
    expected, kl = [], []
    for side, ids in (("query", q2), ("target", t2)):
        sides = [getattr(p, side) for p in pairs for _ in range(2)]
        flat = [c for group in ids for c in group]
        new = torch.cat(hf_token_logprobs(v1, v0.encoder, sides, flat, temperature))
        old = torch.cat(hf_token_logprobs(v0.model, v0.encoder, sides, flat, temperature))
        expected.append(torch.exp(new - old).mean())
        kl.append((torch.exp(old - new) - (old - new) - 1).mean())  # k3, reference = v0
    metrics = learner.step(StepShard(2, pairs, 0, q2, t2, 1, q2_lp, t2_lp))
    assert metrics["actor/ratio_mean"] == pytest.approx(float(sum(expected) / 2), abs=1e-5)
    assert metrics["actor/kl"] == pytest.approx(float(sum(kl) / 2), abs=1e-6)
    assert abs(metrics["actor/ratio_mean"] - 1) > 1e-3  # the update moved the policy
    assert metrics["actor/clip_fraction"] > 0
    with pytest.raises(ValueError, match="without the log-probs"):
        learner.step(StepShard(3, pairs, 0, q2, t2, 1))


def test_the_entropy_bonus_reads_the_policys_entropy_at_the_rollout_temperature(
        tiny_model_dir, benchmark_manifest, tmp_path):
    """rl.entropy_coeff: the logged entropy_loss is each side's mean over sequences of token
    entropy sums / max_new_tokens, the entropy of softmax(logits / rl.temperature) from a plain
    HF forward; the bonus changes the update, and 0 logs none."""
    from rollout.transformers_engine import TransformersEngine
    from umerl.model.loading import load_policy
    from umerl.model.sampling import SamplingParams
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_single_process()
    v0 = load_policy(str(tiny_model_dir))
    pairs = rl_pairs(benchmark_manifest)
    sampling = SamplingParams(max_new_tokens=6, temperature=0.7)
    engine = TransformersEngine(v0)
    q = engine.generate([p.query for p in pairs], 2, sampling, seeds=[1, 2])
    t = engine.generate([p.target for p in pairs], 2, sampling, seeds=[3, 4])
    expected = []
    for side, ids in (("query", q), ("target", t)):
        sides = [getattr(p, side) for p in pairs for _ in range(2)]
        flat = [c for group in ids for c in group]
        sums = [h.sum() for h in hf_token_entropy(v0.model, v0.encoder, sides, flat, 0.7)]
        expected.append(float(sum(sums)) / 6 / len(flat))
    weights, logged = {}, {}
    for coeff in (0.0, 0.5):
        learner = Learner(learner_config(tmp_path / str(coeff), "rl.lr=0.02",
                                         "rl.temperature=0.7", f"rl.entropy_coeff={coeff}"),
                          str(tiny_model_dir), str(tiny_model_dir))
        logged[coeff] = learner.step(StepShard(1, pairs, 0, q, t))
        weights[coeff] = learner.bundle.model.lm_head.weight.detach().clone()
    assert "actor/entropy_loss" not in logged[0.0]
    assert logged[0.5]["actor/entropy_loss"] == pytest.approx(sum(expected) / 2, abs=1e-5)
    assert not torch.allclose(weights[0.0], weights[0.5])


def test_single_forward_learner_matches_the_two_pass_one(tiny_model_dir, benchmark_manifest,
                                                         tmp_path):
    """Embeddings from the update's own forward give the same rewards, losses and updated
    weights as a separate no-grad scoring pass."""
    from rollout.transformers_engine import TransformersEngine
    from umerl.model.sampling import SamplingParams
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_single_process()
    results = {}
    for single in (True, False):
        learner = Learner(learner_config(tmp_path / str(single), "rl.lr=0.01",
                                         f"learner.single_forward={str(single).lower()}"),
                          str(tiny_model_dir), str(tiny_model_dir))
        assert learner.single_forward is single
        engine = TransformersEngine(learner.bundle)
        pairs = rl_pairs(benchmark_manifest)
        metrics = []
        for step in (1, 2):  # the second step's rollouts come from the updated weights
            sampling = SamplingParams(max_new_tokens=6)
            q = engine.generate([p.query for p in pairs], 2, sampling, seeds=[step, 9])
            t = engine.generate([p.target for p in pairs], 2, sampling, seeds=[step, 10])
            metrics.append(learner.step(StepShard(step, pairs, 0, q, t)))
        results[single] = (metrics, {n: p.detach().clone()
                                     for n, p in learner.bundle.model.named_parameters()})
    for one, two in zip(results[True][0], results[False][0]):
        for key in ("reward/total", "reward/embedding", "actor/loss", "actor/kl"):
            assert one[key] == pytest.approx(two[key], abs=1e-6), key
    weights_single, weights_two = results[True][1], results[False][1]
    assert all(torch.allclose(weights_single[n], weights_two[n], atol=1e-6)
               for n in weights_single)


def test_single_forward_is_auto_only_for_one_micro_batch_below_zero3():
    from umerl.train.learner import single_forward_mode

    assert single_forward_mode("auto", 1, 2) is True
    assert single_forward_mode("auto", 4, 2) is False  # micro-batched: two passes
    assert single_forward_mode("auto", 1, 3) is False
    assert single_forward_mode(False, 1, 2) is False


def test_the_schema_names_the_keys_of_an_impossible_single_forward(tmp_path):
    from umerl.config.origins import ConfigError
    from umerl.config.schema import validate

    with pytest.raises(ConfigError, match="learner.single_forward.*learner.zero_stage"):
        validate(load_recipe(None, ["learner.single_forward=true", "learner.zero_stage=3"]))
    with pytest.raises(ConfigError, match="rl.max_staleness"):
        validate(load_recipe(None, ["rl.max_staleness=2"]))
    with pytest.raises(ConfigError, match="rl.entropy_coeff"):
        validate(load_recipe(None, ["rl.entropy_coeff=-0.01"]))


def test_the_schema_refuses_stale_vllm_rollouts_at_another_temperature():
    """vLLM reports temperature-1 log-probs; off-policy learners read them at rl.temperature."""
    from umerl.config.origins import ConfigError
    from umerl.config.schema import validate

    vllm = ["rollout.engine=vllm", "rollout.gpus_per_worker=1", "rl.max_staleness=1"]
    with pytest.raises(ConfigError, match="rl.max_staleness.*rl.temperature"):
        validate(load_recipe(None, [*vllm, "rl.temperature=0.7"]))
    validate(load_recipe(None, [*vllm, "rl.temperature=1.0"]))
    validate(load_recipe(None, [*vllm[:2], "rl.temperature=0.7"]))  # on-policy: no engine lps
    validate(load_recipe(None, ["rl.max_staleness=1", "rl.temperature=0.7"]))  # transformers


def test_one_step_off_policy_runs_deterministically_and_resumes_exactly(
        local_ray, tiny_model_dir, benchmark_manifest, tmp_path):
    def run(name: str, *overrides: str) -> MemoryTracker:
        cfg = rl_config(tmp_path / name, benchmark_manifest.parent, "rl.max_staleness=1",
                        "rl.lr=0.02", "rl.max_steps=3", *overrides)
        return run_logged(cfg, tiny_model_dir)[0]

    first = run("a")
    assert [step for step, _ in first.logged] == [1, 2, 3]
    steps = [m for _, m in first.logged]
    # step 1 samples with the starting weights and learns from them; steps 2 and 3 learn from
    # rollouts sampled one update earlier, and the ratio shows it
    assert [m["rollout/staleness"] for m in steps] == [0.0, 1.0, 1.0]
    assert steps[0]["actor/ratio_mean"] == 1.0
    assert abs(steps[2]["actor/ratio_mean"] - 1) > 1e-3
    assert all(0 <= m[f"{pool}/idle_ratio"] <= 1 for m in steps for pool in ("rollout", "learner"))
    assert determined(run("b")) == determined(first)
    # A learner killed in step 3's update: the stage restarts from step 2's checkpoint, which
    # holds the rollouts generated ahead for step 3 (with their log-probs).
    restarted = run("c", "faults.kill=[learner/0/3/update]")
    assert [step for step, _ in restarted.logged] == [1, 2, 3]
    assert determined(restarted) == determined(first)


def test_synchronous_loop_is_unchanged_by_the_single_forward(
        local_ray, tiny_model_dir, benchmark_manifest, tmp_path):
    """max_staleness 0 with either learner mode: on-policy every step (ratio 1, staleness 0)
    and the same rewards step by step as the two-pass loop this replaced."""
    logged = {}
    for single in ("true", "false"):
        cfg = rl_config(tmp_path / single, benchmark_manifest.parent, "rl.max_steps=3",
                        f"learner.single_forward={single}")
        logged[single] = determined(run_logged(cfg, tiny_model_dir)[0])
    assert [step for step, _ in logged["true"]] == [1, 2, 3]
    assert all(m["rollout/staleness"] == 0.0 and m["actor/ratio_mean"] == 1.0
               for _, m in logged["true"])
    assert logged["true"] == logged["false"]
