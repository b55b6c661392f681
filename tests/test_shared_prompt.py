"""The shared-prompt learner forward (learner.shared_prompt): each prompt once, its G
completions on its keys and values.

Its outputs are checked against plain Hugging Face forwards over the whole rows (prompt +
completion, each row on its own: no umerl policy code), for images, video and text prompts in
every supported Qwen-VL family; gradients against the whole-row forward; a learner step
against a learner that runs whole rows.
"""

from __future__ import annotations

import pytest
import torch
from test_off_policy import learner_config, rl_pairs

from umerl.config.recipe import ConfigError, load_recipe

G = 3


def sides_and_completions(benchmark_manifest, gen_id: int):
    """An image prompt, a two-frame video prompt and a text prompt, G completions each, of
    different lengths (one of length 1), two of them writing <gen_emb> mid-way."""
    from umerl.data.formats import Side

    images = sorted((benchmark_manifest.parent / "digits_cls" / "images").rglob("*.png"))[:2]
    sides = [Side(text="which digit is this", images=(str(images[0]),)),
             Side(text="two frames", video=tuple(str(p) for p in images)),
             Side(text="a plain text query that is longer than the others")]
    lengths = [5, 9, 1, 7, 3, 8, 2, 6, 4]
    generator = torch.Generator().manual_seed(0)
    completions = []
    for i, n in enumerate(lengths):
        ids = torch.randint(10, 500, (n,), generator=generator).tolist()
        if i in (1, 4):
            ids[n // 2] = gen_id
        completions.append(ids)
    return sides, completions


def whole_row_reference(bundle, side, completion: list[int]) -> dict[str, torch.Tensor]:
    """One row alone through the HF model: completion log-probs, and the hidden states at the
    prompt's last <disc_emb> and at the completion's last <gen_emb> (else its last token)."""
    encoder = bundle.encoder
    prompt = encoder.encode(side)
    batch = encoder.policy_inputs([prompt], [completion])
    batch.pop("completion_lengths")
    with torch.no_grad():
        out = bundle.model(**batch, output_hidden_states=True)
    ids, n = batch["input_ids"][0].tolist(), len(prompt.input_ids)
    logprobs = torch.log_softmax(out.logits[0, :-1].float(), -1)
    chosen = logprobs[n - 1:].gather(-1, torch.tensor(completion)[:, None])[:, 0]
    # The entropy bonus's (rl.entropy_coeff): of each completion token's distribution.
    entropy = torch.distributions.Categorical(logits=out.logits[0, n - 1:-1].float()).entropy()
    hidden = out.hidden_states[-1][0].float()
    disc_at = max(i for i in range(n) if ids[i] == bundle.disc_id)
    gen_at = max((i for i in range(n, len(ids)) if ids[i] == bundle.gen_id), default=len(ids) - 1)
    return {"logprobs": chosen, "entropy": entropy,
            "disc": torch.nn.functional.normalize(hidden[disc_at], dim=-1),
            "gen": torch.nn.functional.normalize(hidden[gen_at], dim=-1),
            "found": torch.tensor(bundle.gen_id in completion)}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_shared_prompt_forward_equals_each_row_on_its_own(family, benchmark_manifest, tmp_path):
    from umerl.model.loading import load_policy
    from umerl.model.policy import PolicyModule
    from umerl.model.tiny import build_tiny_model

    bundle = load_policy(str(build_tiny_model(tmp_path / family, family=family)))
    policy = PolicyModule(bundle.model, bundle.disc_id, bundle.gen_id).eval()
    sides, completions = sides_and_completions(benchmark_manifest, bundle.gen_id)
    inputs = bundle.encoder.shared_prompt_inputs([bundle.encoder.encode(s) for s in sides],
                                                 completions)
    assert inputs["input_ids"].shape[0] == len(sides)  # each prompt once
    with torch.no_grad():
        out = policy(**inputs, with_entropy=True)
    for row, completion in enumerate(completions):
        expected = whole_row_reference(bundle, sides[row // G], completion)
        got = out.logprobs[row][out.completion_mask[row]]
        assert got.shape == expected["logprobs"].shape
        assert torch.allclose(got, expected["logprobs"], atol=1e-5)
        assert torch.allclose(out.entropy[row][out.completion_mask[row]], expected["entropy"],
                              atol=1e-5)
        assert torch.allclose(out.disc[row], expected["disc"], atol=1e-5)
        assert torch.allclose(out.gen[row], expected["gen"], atol=1e-5)
        assert bool(out.gen_found[row]) == bool(expected["found"])


def test_shared_prompt_gradients_equal_the_whole_rows(tiny_model_dir, benchmark_manifest):
    """The prompt's gradient is the sum over its G completions, as with G copies of it."""
    from umerl.model.loading import load_policy
    from umerl.model.policy import PolicyModule

    bundle = load_policy(str(tiny_model_dir))
    policy = PolicyModule(bundle.model, bundle.disc_id, bundle.gen_id).train()
    sides, completions = sides_and_completions(benchmark_manifest, bundle.gen_id)
    prompts = [bundle.encoder.encode(s) for s in sides]
    whole = bundle.encoder.policy_inputs([p for p in prompts for _ in range(G)], completions)
    shared = bundle.encoder.shared_prompt_inputs(prompts, completions)
    generator = torch.Generator().manual_seed(1)
    token_weights = torch.randn(sum(map(len, completions)), generator=generator)
    embedding_weights = torch.randn(len(completions), bundle.model.config.text_config.hidden_size,
                                    generator=generator)

    def gradients(inputs) -> dict[str, torch.Tensor]:
        policy.zero_grad()
        out = policy(**inputs)
        loss = ((out.logprobs[out.completion_mask] * token_weights).sum()
                + (out.gen * embedding_weights).sum() + (out.disc * embedding_weights).sum())
        loss.backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    expected, got = gradients(whole), gradients(shared)
    assert got.keys() == expected.keys() and len(got) > 10
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-4, rtol=1e-4), name


def test_a_learner_step_with_a_shared_prompt_equals_whole_rows(tiny_model_dir,
                                                               benchmark_manifest, tmp_path):
    from rollout.transformers_engine import TransformersEngine
    from umerl.model.sampling import SamplingParams
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_single_process()
    learners = {}
    for shared in (True, False):
        cfg = learner_config(tmp_path / str(shared), f"learner.shared_prompt={shared}")
        learners[shared] = Learner(cfg, str(tiny_model_dir), str(tiny_model_dir))
    assert learners[True].shared_prompt and not learners[False].shared_prompt
    pairs = rl_pairs(benchmark_manifest)
    engine = TransformersEngine(learners[False].bundle)
    sampling = SamplingParams(max_new_tokens=6, seed=0)
    shard = StepShard(1, pairs, 0, engine.generate([p.query for p in pairs], 2, sampling, [1, 2]),
                      engine.generate([p.target for p in pairs], 2, sampling, [3, 4]))
    metrics = {shared: learner.step(shard) for shared, learner in learners.items()}
    for key in ("reward/total", "reward/embedding", "reward/format", "actor/loss"):
        assert metrics[True][key] == pytest.approx(metrics[False][key], abs=1e-5), key
    params = {shared: dict(learner.bundle.model.named_parameters())
              for shared, learner in learners.items()}
    moved = 0
    for name, param in params[False].items():
        assert torch.allclose(params[True][name], param, atol=1e-5), name
        moved += int(not torch.equal(param, learners[False].reference.model.get_parameter(name)))
    assert moved > 10  # the step did update the weights both compared


@pytest.mark.parametrize("overrides, named", [
    (["learner.micro_batch_size=4", "rl.group_size=8"], "learner.micro_batch_size"),
    (["learner.gradient_checkpointing=true"], "learner.gradient_checkpointing"),
    (["learner.zero_stage=3"], "learner.zero_stage"),
])
def test_shared_prompt_true_where_it_cannot_run_is_a_recipe_error(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_recipe(None, ["learner.shared_prompt=true", *overrides])
    load_recipe(None, ["learner.shared_prompt=auto", *overrides])  # auto falls back


def test_a_learner_refuses_what_the_schema_refuses(tmp_path):
    """A Learner built from a config load_recipe never checked runs the schema's rule itself,
    before it loads anything."""
    from umerl.train.learner import Learner

    cfg = learner_config(tmp_path)
    cfg.learner.shared_prompt = True
    cfg.learner.gradient_checkpointing = True
    with pytest.raises(ConfigError, match="'learner.gradient_checkpointing'"):
        Learner(cfg, str(tmp_path / "no-policy"), str(tmp_path / "no-reference"))


def test_auto_takes_the_shared_prompt_only_where_it_can_run():
    from umerl.train.learner import shared_prompt_mode

    assert shared_prompt_mode("auto", True, False, 2)
    assert not shared_prompt_mode("auto", False, False, 2)
    assert not shared_prompt_mode("auto", True, True, 2)
    assert not shared_prompt_mode("auto", True, False, 3)
    assert not shared_prompt_mode(False, True, False, 2)
