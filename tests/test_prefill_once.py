"""n samples of a prompt share its prefill (rollout.transformers_engine.decode_dropping_finished).

The reference is the path before: ``generate(..., num_return_sequences=n)``, which expands
every prompt n times before its prefill and decodes every row to the longest one's end, each
row drawing from the same generator (``_RowSampler``). With the same seeds both sample the
same completions; their log-probs agree to LOGPROB_TOL, not bit for bit: the shared path runs
all prompts in one left-padded batch and its rows leave as they stop, and matmuls and
attention over other row counts and padding sum in another order (about one float32 rounding
in the logits).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE
from transformers import LogitsProcessorList

from rollout.transformers_engine import (
    TransformersEngine,
    _RowSampler,
    _strip_after_stop,
    _TokenPicker,
    _without_checkpoint_defaults,
    decoding_config,
    row_seed,
)
from umerl.data.formats import Side
from umerl.model.sampling import SamplingParams

N = 3
LOGPROB_TOL = 1e-5  # measured: at most ~1e-6 on the tiny models (float32)
SAMPLING = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50)


def mixed_sides(benchmark_manifest: Path) -> list[Side]:
    """An image, a two-frame video and a text prompt, each of a different length."""
    images = sorted((benchmark_manifest.parent / "digits_cls" / "images").rglob("*.png"))[:2]
    return [Side(text="which digit is this", images=(str(images[0]),)),
            Side(text="two frames", video=tuple(str(p) for p in images)),
            Side(text="a plain text query that is longer than the others by some words")]


def on_model_device(bundle, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch as ``generate`` takes it: on the model's device, no prompt lengths."""
    batch.pop("prompt_lengths")
    return {k: v.to(bundle.model.device) for k, v in batch.items()}


@contextmanager
def stops_likely(bundle, budget: int) -> Iterator[None]:
    """Give the stop tokens the share of the top-k probability at every step that ends half
    the completions before ``budget`` tokens, so that they end at different lengths whatever
    the device's random stream (9 completions all ending alike: 2 in 2^9). A tiny random
    model almost never writes one of two stop tokens among 2,000, and a bias fixed in logit
    units gave no early stop in 9 completions on CUDA."""
    stops = list(bundle.stop_ids)
    share = 1 - 0.5 ** (1 / budget)

    def hook(_module, _inputs, logits: torch.Tensor) -> torch.Tensor:
        others = logits.detach().clone()
        others[..., stops] = float("-inf")
        top = others.topk(SAMPLING.top_k, dim=-1).values.logsumexp(-1)
        logits = logits.clone()
        logits[..., stops] = (top + math.log(share / (1 - share) / len(stops)))[..., None]
        return logits

    handle = bundle.model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def expanded_prefill_reference(bundle, sides, n, sampling, seeds):
    """The engine's old path: one ``generate`` per side, the prompt expanded n times before
    the prefill, row j drawing from the generator the engine seeds for sample j of the side;
    completions and their tokens' log-probs (softmax of the raw logits / T)."""
    ids, lps = [], []
    for side, seed in zip(sides, seeds):
        batch = on_model_device(bundle, bundle.encoder.collate([bundle.encoder.encode(side)]))
        config = decoding_config(sampling, n, bundle.stop_ids, bundle.tokenizer.pad_token_id,
                                 bundle.encoder.suppressed_token_ids(), logprobs=True)
        draws = _RowSampler(config, [row_seed(seed, j) for j in range(n)])
        with torch.no_grad(), _without_checkpoint_defaults(bundle.model):
            out = bundle.model.generate(**batch, generation_config=config,
                                        logits_processor=LogitsProcessorList([draws]))
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        rows = [_strip_after_stop(row, bundle.stop_ids) for row in new.tolist()]
        logits = torch.stack(out.logits, dim=1).float() / sampling.temperature  # [n, T, V]
        chosen = torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0]
        ids.append(rows)
        lps.append([chosen[i, :len(row)].tolist() for i, row in enumerate(rows)])
    return ids, lps


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def family_bundle(request, tmp_path_factory):
    from umerl.model.loading import load_policy
    from umerl.model.tiny import build_tiny_model

    family = request.param
    return load_policy(str(build_tiny_model(tmp_path_factory.mktemp(family) / family,
                                            family=family)), device=TEST_DEVICE)


def test_shared_prefill_samples_what_the_expanded_prefill_samples(family_bundle,
                                                                  benchmark_manifest):
    bundle, sides, seeds = family_bundle, mixed_sides(benchmark_manifest), [11, 12, 13]
    lengths = {len(bundle.encoder.encode(s).input_ids) for s in sides}
    assert len(lengths) == 3  # prompts of three different lengths
    engine = TransformersEngine(bundle)
    with stops_likely(bundle, SAMPLING.max_new_tokens):
        ids, lps = engine.generate_with_logprobs(sides, N, SAMPLING, seeds)
        ref_ids, ref_lps = expanded_prefill_reference(bundle, sides, N, SAMPLING, seeds)
    assert ids == ref_ids
    # Stop handling exercised: some completions stop early, some run to the budget.
    ends = {len(c) for side in ids for c in side}
    assert min(ends) < SAMPLING.max_new_tokens == max(ends)
    for got, want in zip((lp for side in lps for lp in side),
                         (lp for side in ref_lps for lp in side)):
        assert len(got) == len(want)
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=LOGPROB_TOL, rtol=0)


def batched_generate_reference(bundle, prompts, n, sampling):
    """The unseeded path before rows were dropped: one ``generate`` over the left-padded
    prompts; [prompt][sample] completions."""
    batch = on_model_device(bundle, bundle.encoder.collate(prompts))
    config = decoding_config(sampling, n, bundle.stop_ids, bundle.tokenizer.pad_token_id,
                             bundle.encoder.suppressed_token_ids())
    with torch.no_grad(), _without_checkpoint_defaults(bundle.model):
        out = bundle.model.generate(**batch, generation_config=config)
    rows = [_strip_after_stop(r, bundle.stop_ids)
            for r in out.sequences[:, batch["input_ids"].shape[1]:].tolist()]
    return [rows[i * n:(i + 1) * n] for i in range(len(prompts))]


def test_unseeded_greedy_equals_the_batched_generate(family_bundle, benchmark_manifest):
    """generate_encoded (evaluation's gen mode, serving) decodes greedily what one batched
    ``generate`` over the same left-padded prompts decoded, token for token. (A tiny random
    model writes the same token at every step, so rows leaving the batch early are exercised
    by the sampled test below.)"""
    bundle, sides = family_bundle, mixed_sides(benchmark_manifest)
    prompts = [bundle.encoder.encode(s) for s in sides]
    greedy = SamplingParams(max_new_tokens=8, do_sample=False)
    got = TransformersEngine(bundle, batch_size=len(sides)).generate_encoded(prompts, 1, greedy)
    assert got == batched_generate_reference(bundle, prompts, 1, greedy)


def test_unseeded_samples_depend_on_the_seed_and_prompt_only(tiny_bundle, benchmark_manifest):
    """Evaluation's pass@k samples: k rows from one prefill, each from its own generator
    seeded by the call's seed, its index and its prompt, so the same prompt samples the same
    completions alone, in a batch, in any order; another seed samples others."""
    bundle, sides = tiny_bundle, mixed_sides(benchmark_manifest)
    prompts = [bundle.encoder.encode(s) for s in sides]
    sampling = SamplingParams(max_new_tokens=12, seed=2)
    engine = TransformersEngine(bundle, batch_size=N * len(sides))
    with stops_likely(bundle, sampling.max_new_tokens):
        together = engine.generate_encoded(prompts, N, sampling)
        alone = [TransformersEngine(bundle, batch_size=N).generate_encoded([p], N, sampling)[0]
                 for p in prompts]
        reversed_ = engine.generate_encoded(prompts[::-1], N, sampling)[::-1]
        other = engine.generate_encoded(prompts, N, SamplingParams(max_new_tokens=12, seed=3))
    assert together == alone == reversed_
    assert other != together
    assert all(len({tuple(c) for c in side}) > 1 for side in together)  # k distinct draws
    ends = {len(c) for side in together for c in side}  # rows left the batch at several steps
    assert len(ends) > 1 and max(ends) == sampling.max_new_tokens


def test_each_prompt_is_prefilled_and_seen_by_the_vision_tower_once(tiny_bundle,
                                                                    benchmark_manifest):
    """Spies on the real modules: the vision tower sees each prompt's patches once, and the
    language model runs each prompt's tokens in one row, not N."""
    bundle, sides = tiny_bundle, mixed_sides(benchmark_manifest)
    prompts = [bundle.encoder.encode(s) for s in sides]
    patches, token_rows = [], []
    base = bundle.model.model
    hooks = [
        base.visual.register_forward_pre_hook(
            lambda _m, args, kwargs: patches.append((args or (kwargs["hidden_states"],))[0]
                                                    .shape[0]), with_kwargs=True),
        base.language_model.register_forward_pre_hook(
            lambda _m, _a, kwargs: token_rows.append(tuple(kwargs["inputs_embeds"].shape[:2])),
            with_kwargs=True),
    ]
    try:
        TransformersEngine(bundle).generate(sides, N, SAMPLING, seeds=[1, 2, 3])
    finally:
        for hook in hooks:
            hook.remove()
    media_rows = sum(p.shape[0] for prompt in prompts
                     for p in (prompt.pixel_values, prompt.pixel_values_videos) if p is not None)
    assert sum(patches) == media_rows
    prefills = [shape for shape in token_rows if shape[1] > 1]
    longest = max(len(p.input_ids) for p in prompts)
    assert prefills == [(len(prompts), longest)]  # once, one row a prompt
    # Every other forward is one decoding step of the sides' N samples still decoding.
    steps = [rows for rows, length in token_rows if length == 1]
    assert steps[0] == len(prompts) * N and steps == sorted(steps, reverse=True)


def test_seeded_sides_sample_the_same_in_any_batch(family_bundle, benchmark_manifest):
    """Seeded sides (rollouts) decode in one batch, each row from the generator of its side's
    seed and its index: the completions equal those of each side decoded alone, whatever the
    other sides and their order; the log-probs to LOGPROB_TOL (other row counts and padding
    sum in another order)."""
    bundle, sides, seeds = family_bundle, mixed_sides(benchmark_manifest), [11, 12, 13]
    engine = TransformersEngine(bundle)
    with stops_likely(bundle, SAMPLING.max_new_tokens):
        ids, lps = engine.generate_with_logprobs(sides, N, SAMPLING, seeds)
        back_ids, back_lps = engine.generate_with_logprobs(sides[::-1], N, SAMPLING, seeds[::-1])
        alone = [engine.generate_with_logprobs([side], N, SAMPLING, [seed])
                 for side, seed in zip(sides, seeds)]
        other_seeds = engine.generate(sides, N, SAMPLING, [21, 22, 23])
    assert ids == [a[0][0] for a in alone] == back_ids[::-1]
    assert other_seeds != ids
    ends = {len(c) for side in ids for c in side}
    assert min(ends) < SAMPLING.max_new_tokens == max(ends)
    for other in ([a[1][0] for a in alone], back_lps[::-1]):
        for got, want in zip((lp for side in lps for lp in side),
                             (lp for side in other for lp in side)):
            assert len(got) == len(want)
            assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=LOGPROB_TOL,
                                  rtol=0)


@pytest.mark.parametrize("share", [True, False])
def test_the_rollout_actor_follows_rollout_share_prefill(tiny_model_dir, benchmark_manifest,
                                                         share):
    """``rollout.share_prefill`` reaches the actor's engine (the benches' before/after switch):
    off, each prompt's prefill runs in N rows (generate's own expansion), on, in one; the
    completions are the same either way."""
    from rollout.pool import RolloutActor
    from umerl.config.recipe import load_recipe

    assert load_recipe(None, []).rollout.share_prefill is True  # the default
    actor = RolloutActor(str(tiny_model_dir), "transformers", share_prefill=share)
    sides = mixed_sides(benchmark_manifest)[:1]
    prompt_len = len(actor.engine.bundle.encoder.encode(sides[0]).input_ids)
    rows: list[tuple[int, int]] = []
    hook = actor.model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: rows.append(tuple(kwargs["inputs_embeds"].shape[:2])),
        with_kwargs=True)
    try:
        got, _ = actor.generate(sides, [4], N, SAMPLING)
    finally:
        hook.remove()
    assert rows[0] == ((1, prompt_len) if share else (N, prompt_len))
    other = TransformersEngine(actor.engine.bundle, share_prefill=not share)
    assert got == other.generate(sides, N, SAMPLING, seeds=[4])


def test_unseeded_sampling_draws_from_the_warped_distribution() -> None:
    """The rows' own generators sample softmax(top-k(logits) / T) with the suppressed tokens
    removed first, as ``generate``'s processors define it: 20,000 rows over fixed logits,
    each token's share within 4.5 standard errors of the probability computed here."""
    from transformers import GenerationConfig

    logits = torch.tensor([2.0, 3.0, 1.5, 0.2, -1.0, 1.9])
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=3, suppress_tokens=[1])
    rows = 20_000
    picker = _TokenPicker(config, seeds=range(rows))
    drawn = picker(logits.expand(rows, -1).clone(), torch.arange(rows))
    kept = torch.tensor([0, 2, 5])  # the 3 largest once token 1 is suppressed
    want = torch.zeros(6)
    want[kept] = torch.softmax(logits[kept] / 0.7, dim=0)
    share = torch.bincount(drawn, minlength=6).double() / rows
    error = (want * (1 - want) / rows).sqrt()
    assert torch.all((share - want).abs() <= 4.5 * error + 1e-12), (share, want)
