"""The CPU rollout engine: batched ``transformers`` generate with the KV cache on.

n samples of a prompt share its prefill (``generate_prefilled_once``): each distinct prompt, its
images and video through the vision tower, runs once, and its key/value cache is repeated n
times before sampling. ``generate(..., num_return_sequences=n)`` would instead expand the prompt
n times and prefill every copy.

Seeded calls (GRPO rollouts: one seed per side) decode all their sides in one batch
(``generate_sides_together``): each side samples from its own generator and attends over its
own keys, so a side's completions are those of its own call whatever else is in the batch;
its log-probs agree to float rounding (the matmuls' row count picks the CPU GEMM kernel).

Decoding depends on our ``SamplingParams`` only, as vLLM's does (``rollout.vllm_engine``):
``generate`` merges the model's ``generation_config`` (the checkpoint's generation_config.json,
e.g. a Qwen instruct release's ``repetition_penalty``, ``top_k`` or ``top_p``) into every unset
field of a passed config (transformers 5 ``_prepare_generation_config``), so each call runs
with the model's config swapped for an empty one: unset fields then take transformers' neutral
global defaults (no penalties, no n-gram blocking, no forced tokens).
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import Cache
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from umerl.data.formats import Side
from umerl.model.inputs import EncodedPrompt
from umerl.model.loading import PolicyBundle
from umerl.model.sampling import SamplingParams

# Rows (sides x samples) a seeded call decodes together (generate_sides_together).
SEEDED_BATCH_ROWS = 64


class TransformersEngine:
    """Samples from an in-process Hugging Face model, all prompts x samples in one batch.

    ``bundle`` is a ``PolicyBundle`` or anything with its ``model``, ``tokenizer``, ``encoder``
    (``collate``, ``suppressed_token_ids``) and ``stop_ids`` (e.g. a text-only teacher).
    ``share_prefill=False`` prefills each of a seeded call's (a rollout's) n copies
    (``generate``'s own expansion): the path before the shared prefill, kept as
    ``bench/bench_rollout_prefill.py``'s baseline. Unseeded calls (evaluation, serving,
    annotation) always prefill once and drop finished rows (``decode_dropping_finished``).
    """

    def __init__(self, bundle: PolicyBundle, batch_size: int = 16, share_prefill: bool = True):
        self.bundle = bundle
        self.batch_size = batch_size
        self.share_prefill = share_prefill
        # generate() swaps the model's generation_config for its duration: one call at a time.
        self._generate_lock = threading.Lock()

    def generate(
        self,
        sides: Sequence[Side],
        n: int,
        sampling: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[list[list[int]]]:
        prompts = [self.bundle.encoder.encode(side) for side in sides]
        if seeds is None:
            return self.generate_encoded(prompts, n, sampling)
        return self._generate_seeded(prompts, seeds, n, sampling, logprobs=False)[0]

    def generate_with_logprobs(
        self, sides: Sequence[Side], n: int, sampling: SamplingParams, seeds: Sequence[int]
    ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """``generate`` plus each sampled token's log-prob under this engine's weights, from
        the model's raw logits divided by the sampling temperature (no top-k): the policy
        log-prob the learners compute (at ``rl.temperature``), so an off-policy update's
        importance ratio needs no second forward."""
        prompts = [self.bundle.encoder.encode(side) for side in sides]
        return self._generate_seeded(prompts, seeds, n, sampling, logprobs=True)

    def _generate_seeded(
        self, prompts: Sequence[EncodedPrompt], seeds: Sequence[int], n: int,
        sampling: SamplingParams, logprobs: bool,
    ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} sides but {len(seeds)} seeds")
        ids, lps = [], []
        if n > 1 and self.share_prefill and sampling.do_sample and self._sides_together_ok():
            # All sides in one decoding batch, each under its own generator and keys.
            per_call = max(1, SEEDED_BATCH_ROWS // n)
            for start in range(0, len(prompts), per_call):
                chunk_ids, chunk_lps = self._generate_sides(
                    prompts[start:start + per_call], seeds[start:start + per_call], n, sampling,
                    logprobs)
                ids.extend(chunk_ids)
                lps.extend(chunk_lps)
            return ids, lps
        # Else one call per side, each under its own seed: the samples cannot depend on
        # batching.
        for prompt, seed in zip(prompts, seeds):
            torch.manual_seed(seed)
            chunk_ids, chunk_lps = self._generate_chunk([prompt], n, sampling, logprobs)
            ids.extend(chunk_ids)
            lps.extend(chunk_lps)
        return ids, lps

    def _sides_together_ok(self) -> bool:
        """Per-side attention replaces the text model's sdpa only: another kernel decodes
        one side at a time."""
        text = getattr(self.bundle.model.config, "text_config", self.bundle.model.config)
        return getattr(text, "_attn_implementation", None) == "sdpa"

    @torch.no_grad()
    def _generate_sides(
        self, prompts: Sequence[EncodedPrompt], seeds: Sequence[int], n: int,
        sampling: SamplingParams, logprobs: bool,
    ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        bundle = self.bundle
        batches = []
        for prompt in prompts:
            batch = bundle.encoder.collate([prompt])
            batch.pop("prompt_lengths")
            batches.append({k: v.to(bundle.model.device) for k, v in batch.items()})
        config = decoding_config(sampling, n, bundle.stop_ids, bundle.tokenizer.pad_token_id,
                                 bundle.encoder.suppressed_token_ids(), logprobs)
        with self._generate_lock, _without_checkpoint_defaults(bundle.model):
            generated, prompt_length = generate_sides_together(bundle.model, batches, config,
                                                               seeds)
        return self._split(generated, prompt_length, len(prompts), n, logprobs, sampling)

    def generate_encoded(
        self, prompts: Sequence[EncodedPrompt], n: int, sampling: SamplingParams
    ) -> list[list[list[int]]]:
        """Prompts already encoded (e.g. with a custom message); batched over prompts, each
        prompt prefilled once for its n samples, finished rows dropped from the decoding batch
        (``decode_dropping_finished``). Sample j of a prompt draws from its own generator,
        seeded from ``sampling.seed`` (else one draw of torch's global generator per call), j
        and the prompt's content: the same prompt samples the same completions in any batch."""
        return self._decode_all(prompts, n, sampling, embed=False)[0]

    def generate_embedded(
        self, sides: Sequence[Side], n: int, sampling: SamplingParams
    ) -> tuple[list[list[list[int]]], torch.Tensor]:
        """``generate`` (unseeded: ``generate_encoded``'s sampling) plus each completion's
        last-layer hidden state at its last token, [sides * n, d] side-major: what
        ``PolicyModule`` reads as the generative embedding, here from the decoding itself
        (``umerl.model.embed`` skips its second forward over prompt and completion)."""
        prompts = [self.bundle.encoder.encode(side) for side in sides]
        completions, states = self._decode_all(prompts, n, sampling, embed=True)
        return completions, states

    @torch.no_grad()
    def _decode_all(self, prompts: Sequence[EncodedPrompt], n: int, sampling: SamplingParams,
                    embed: bool) -> tuple[list[list[list[int]]], torch.Tensor]:
        base = sampling.seed
        if base is None and sampling.do_sample:
            base = int(torch.randint(2**62, ()).item())
        out: list[list[list[int]]] = []
        states = []
        per_call = max(1, self.batch_size // max(n, 1))
        for start in range(0, len(prompts), per_call):
            chunk, chunk_states = self._decode_chunk(prompts[start:start + per_call], n,
                                                     sampling, base, embed)
            out.extend(chunk)
            states.append(chunk_states)
        return out, torch.cat(states) if embed else torch.empty(0)

    def _decode_chunk(self, prompts: Sequence[EncodedPrompt], n: int, sampling: SamplingParams,
                      base_seed: int | None, embed: bool = False
                      ) -> tuple[list[list[list[int]]], torch.Tensor | None]:
        bundle = self.bundle
        batch = bundle.encoder.collate(prompts)
        batch.pop("prompt_lengths")
        batch = {k: v.to(bundle.model.device) for k, v in batch.items()}
        seeds = None
        if sampling.do_sample:
            seeds = [sample_seed(base_seed or 0, prompt, j) for prompt in prompts
                     for j in range(n)]
        config = decoding_config(sampling, n, bundle.stop_ids, bundle.tokenizer.pad_token_id,
                                 bundle.encoder.suppressed_token_ids())
        with self._generate_lock:
            rows, states = decode_dropping_finished(bundle.model, batch, config, seeds, embed)
        return [rows[i * n:(i + 1) * n] for i in range(len(prompts))], states

    @torch.no_grad()
    def _generate_chunk(
        self, prompts: Sequence[EncodedPrompt], n: int, sampling: SamplingParams,
        logprobs: bool = False,
    ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """[prompt][sample] completions and, with ``logprobs``, their tokens' log-probs."""
        bundle = self.bundle
        batch = bundle.encoder.collate(prompts)
        batch.pop("prompt_lengths")
        batch = {k: v.to(bundle.model.device) for k, v in batch.items()}
        config = decoding_config(sampling, n, bundle.stop_ids, bundle.tokenizer.pad_token_id,
                                 bundle.encoder.suppressed_token_ids(), logprobs)
        with self._generate_lock, _without_checkpoint_defaults(bundle.model):
            if n > 1 and self.share_prefill:
                generated = generate_prefilled_once(bundle.model, batch, config)
            else:  # single samples share nothing
                generated = bundle.model.generate(**batch, generation_config=config)
        return self._split(generated, batch["input_ids"].shape[1], len(prompts), n, logprobs,
                           sampling)

    def _split(
        self, generated: GenerateDecoderOnlyOutput, prompt_length: int, prompts: int, n: int,
        logprobs: bool, sampling: SamplingParams,
    ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """[prompt][sample] completions (cut after the first stop) and their log-probs at the
        sampling temperature."""
        new = generated.sequences[:, prompt_length:]
        completions = [_strip_after_stop(ids, self.bundle.stop_ids) for ids in new.tolist()]
        token_logprobs: list[list[float]] = [[] for _ in completions]
        if logprobs:
            # Step by step: a [rows, T, vocab] float copy would not fit for long completions
            # of a large vocabulary on a GPU.
            temperature = sampling.temperature if sampling.do_sample else 1.0
            chosen = torch.stack([
                torch.log_softmax(step.float() / temperature, dim=-1).gather(
                    -1, new[:, t, None])[:, 0]
                for t, step in enumerate(generated.logits)], dim=1)  # [rows, T]
            token_logprobs = [chosen[row, :len(ids)].tolist()
                              for row, ids in enumerate(completions)]
        return ([completions[i * n:(i + 1) * n] for i in range(prompts)],
                [token_logprobs[i * n:(i + 1) * n] for i in range(prompts)])


def generate_prefilled_once(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], config: GenerationConfig
) -> GenerateDecoderOnlyOutput:
    """``model.generate(**batch, generation_config=config)``, each prompt prefilled once for
    its ``config.num_return_sequences`` samples.

    Every prompt but its last token (all of its image and video tokens) runs through the model
    once; the cache is repeated n times, and ``generate`` continues the n copies from the last
    prompt token, sampling as it would have (the same rows in the same order, so the same
    random draws). The positions are the ones ``generate`` gives the whole prompts (Qwen-VL's
    M-RoPE positions come from the image and video grids): the prefix and its continuation
    must share them, and a continuation cannot recompute them without the grids.
    """
    n = config.num_return_sequences or 1
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    positions, cache = _prefill_prefix(model, batch)
    cache.batch_repeat_interleave(n)
    batch_dim = 1 if positions.ndim == 3 else 0  # M-RoPE positions are [4, batch, length]
    continued = copy.deepcopy(config)
    continued.num_return_sequences = 1
    return model.generate(
        input_ids=input_ids.repeat_interleave(n, dim=0),
        attention_mask=mask.repeat_interleave(n, dim=0),
        position_ids=positions.repeat_interleave(n, dim=batch_dim),
        past_key_values=cache, generation_config=continued,
    )


def sample_seed(base: int, prompt: EncodedPrompt, sample: int) -> int:
    """The seed of one sample of one prompt: a digest of ``base``, the sample's index and
    the prompt's tokens and media, so it does not depend on the batch the prompt is in."""
    digest = hashlib.blake2b(f"{base}:{sample}:{prompt.input_ids}".encode(), digest_size=8)
    for media in (prompt.pixel_values, prompt.image_grid_thw, prompt.pixel_values_videos,
                  prompt.video_grid_thw):
        if media is not None:
            digest.update(media.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


@torch.no_grad()
def decode_dropping_finished(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], config: GenerationConfig,
    seeds: Sequence[int] | None, embed: bool = False,
) -> tuple[list[list[int]], torch.Tensor | None]:
    """``config.num_return_sequences`` completions of each prompt of ``batch`` (greedy when
    ``seeds`` is None, else row i samples from a generator seeded ``seeds[i]``), rows in
    prompt-major order, each cut after its first stop token; with ``embed``, also each row's
    last-layer hidden state at its completion's last token ([rows, d]: the generative
    embedding before its normalisation, read from this decoding instead of a second forward
    over the prompt and completion).

    The prompts are prefilled once, as ``generate`` prefills them (the same positions, the
    same mask), and their caches repeated n times. Unlike ``generate``, a row that has stopped
    leaves the decoding batch (after one more step that feeds its last token, with
    ``embed``): ``generate`` computes every row to the longest one's end. Sampling is an
    inverse-CDF draw of one uniform number from the row's own generator per step, after the
    warpers ``generate`` uses (temperature, top-k, top-p)."""
    n = config.num_return_sequences or 1
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    positions = model._prepare_position_ids_for_generation(input_ids, dict(batch))
    out = model.model(input_ids=input_ids, position_ids=positions, use_cache=True,
                      # generate drops an all-ones mask: the same attention kernel as its prefill
                      attention_mask=None if bool((mask == 1).all()) else mask, **media)
    batch_dim = 1 if positions.ndim == 3 else 0  # M-RoPE positions are [4, batch, length]
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    logits = model.lm_head(out.last_hidden_state[:, -1]).repeat_interleave(n, dim=0)
    mask = mask.repeat_interleave(n, dim=0)
    position = positions[..., -1:].repeat_interleave(n, dim=batch_dim)
    pick = _TokenPicker(config, seeds)
    stops = torch.tensor(list(config.eos_token_id or []), device=logits.device)
    rows: list[list[int]] = [[] for _ in range(logits.shape[0])]
    states: list[torch.Tensor | None] = [None] * len(rows)
    active = torch.arange(len(rows), device=logits.device)
    for step in range(config.max_new_tokens):
        tokens = pick(logits, active)
        for row, token in zip(active.tolist(), tokens.tolist()):
            rows[row].append(token)
        done = torch.isin(tokens, stops) | (step + 1 == config.max_new_tokens)
        if not embed:  # a finished row leaves before the next step
            active, tokens, mask, position = _keep(~done, cache, batch_dim, active, tokens,
                                                   mask, position)
            if not len(active):
                break
        mask, position = F.pad(mask, (0, 1), value=1), position + 1
        hidden = model.model(input_ids=tokens[:, None], attention_mask=mask,
                             position_ids=position, past_key_values=cache,
                             use_cache=True).last_hidden_state[:, -1]
        if embed:  # a finished row leaves once its last token has been fed
            for row, state in zip(active[done].tolist(), hidden[done]):
                states[row] = state
            active, hidden, mask, position = _keep(~done, cache, batch_dim, active, hidden,
                                                   mask, position)
            if not len(active):
                break
        logits = model.lm_head(hidden)
    return rows, torch.stack(states) if embed else None  # type: ignore[arg-type]


def _keep(kept: torch.Tensor, cache: Cache, batch_dim: int, active: torch.Tensor,
          per_row: torch.Tensor, mask: torch.Tensor, position: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoding state of the rows ``kept`` (a bool per active row) only."""
    if bool(kept.all()):
        return active, per_row, mask, position
    index = kept.nonzero()[:, 0]
    cache.batch_select_indices(index)
    return (active[index], per_row[index], mask[index],
            position.index_select(batch_dim, index))


class _TokenPicker:
    """Each step's next token of every active row: the argmax (greedy) or a draw from the
    row's own generator, after the processors ``generate`` applies (suppressed tokens, then
    temperature, top-k and top-p when sampling)."""

    def __init__(self, config: GenerationConfig, seeds: Sequence[int] | None):
        self.suppressed = list(config.suppress_tokens or [])
        self.warpers: list[LogitsProcessor] = []
        if seeds is not None:
            self.warpers = _sampling_warpers(config)
        # CPU generators whatever the model's device: a sample does not depend on the device,
        # and a step's draws cost one host-to-device copy, not a kernel launch per row.
        self.generators = None if seeds is None else [
            torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        if self.suppressed:
            scores[:, self.suppressed] = float("-inf")
        if self.generators is None:
            return scores.argmax(dim=-1)
        for warper in self.warpers:
            scores = warper(None, scores)
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
        draws = torch.cat([torch.rand(1, generator=self.generators[row])
                           for row in active.tolist()]).to(scores.device)
        chosen = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)[:, 0]
        return chosen.clamp_(max=scores.shape[-1] - 1)


def _sampling_warpers(config: GenerationConfig) -> list[LogitsProcessor]:
    """The warpers ``generate`` appends in sampling mode, in its order."""
    warpers: list[LogitsProcessor] = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return warpers


def _prefill_prefix(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, Cache]:
    """The positions ``generate`` gives the whole prompts, and the cache of every prompt token
    but the last (images and video through the vision tower here, once)."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    if input_ids.shape[1] < 2:
        raise ValueError("a prompt needs at least two tokens to share its prefill")
    media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    positions = model._prepare_position_ids_for_generation(input_ids, dict(batch))
    prefix_mask = mask[:, :-1]
    if "mm_token_type_ids" in media:
        media["mm_token_type_ids"] = media["mm_token_type_ids"][:, :-1]
    prefix = model(
        input_ids=input_ids[:, :-1], position_ids=positions[..., :-1], use_cache=True,
        # generate drops an all-ones mask too: the same attention kernel as its prefill.
        attention_mask=None if bool((prefix_mask == 1).all()) else prefix_mask,
        logits_to_keep=1, **media,
    )
    return positions, prefix.past_key_values


def generate_sides_together(
    model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], config: GenerationConfig,
    seeds: Sequence[int],
) -> tuple[GenerateDecoderOnlyOutput, int]:
    """Each one-prompt ``batches[i]`` sampled ``config.num_return_sequences`` times under
    ``seeds[i]``, all decoded in one batch, each side's samples those of its own
    ``generate_prefilled_once`` call after ``torch.manual_seed(seeds[i])`` (its log-probs to
    float rounding: the matmuls' row count picks the CPU GEMM kernel).

    Each prompt's prefix is prefilled alone (``_prefill_prefix``) and the caches are
    left-padded to the longest and stacked. Two things keep the rows independent of each
    other: attention runs per side over that side's own keys, no padding (``_per_side``: a
    longer key range would sum in another order), and each side samples from its own
    generator, seeded as its own call seeds the global one (``_PerSideSampler``). Returns the
    sequences (and per-step logits) and the padded prompt length they start after."""
    n = config.num_return_sequences or 1
    prefilled = [_prefill_prefix(model, batch) for batch in batches]
    lengths = [batch["input_ids"].shape[1] for batch in batches]
    longest = max(lengths)
    pads = [longest - length for length in lengths]
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0

    def stack(parts: list[torch.Tensor], value: float, dim: int) -> torch.Tensor:
        """Left-pad each part's last dimension to the longest, stack along ``dim``, repeat
        each side's row n times."""
        padded = [F.pad(t, (pad, 0), value=value) for t, pad in zip(parts, pads)]
        return torch.cat(padded, dim=dim).repeat_interleave(n, dim=dim)

    input_ids = stack([b["input_ids"] for b in batches], pad_id, 0)
    mask = stack([b["attention_mask"] for b in batches], 0, 0)
    positions = [p for p, _ in prefilled]
    batch_dim = 1 if positions[0].ndim == 3 else 0  # M-RoPE positions are [4, batch, length]
    position_ids = stack(positions, 1, batch_dim)
    cache = prefilled[0][1]
    for index, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            parts = [getattr(c.layers[index], name) for _, c in prefilled]  # [1, heads, L, d]
            padded = [F.pad(t, (0, 0, pad, 0)) for t, pad in zip(parts, pads)]
            setattr(layer, name, torch.cat(padded).repeat_interleave(n, dim=0))
    sampler = _PerSideSampler(config, seeds, n)
    greedy = copy.deepcopy(config)  # the sampler picks each token; generate takes its argmax
    greedy.num_return_sequences, greedy.do_sample = 1, False
    greedy.temperature = greedy.top_k = greedy.top_p = None
    sides = [(i * n, (i + 1) * n, pad) for i, pad in enumerate(pads)]
    with _per_side(sides):
        out = model.generate(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             past_key_values=cache, generation_config=greedy,
                             logits_processor=LogitsProcessorList([sampler]))
    return out, longest


class _PerSideSampler(LogitsProcessor):
    """Samples each side's rows from its own generator and hands ``generate`` a one-hot
    choice. The warpers are the ones ``generate`` appends in sampling mode (after every other
    processor, in this order), the draw is its ``multinomial`` on the side's n rows: the
    same random numbers as a call of that side alone after ``torch.manual_seed(seed)``."""

    def __init__(self, config: GenerationConfig, seeds: Sequence[int], n: int):
        self.warpers = _sampling_warpers(config)
        self.seeds, self.n = list(seeds), n
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor
                 ) -> torch.FloatTensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(seed)
                               for seed in self.seeds]
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        chosen = torch.cat([
            torch.multinomial(torch.softmax(scores[i * self.n:(i + 1) * self.n], dim=-1), 1,
                              generator=generator)
            for i, generator in enumerate(self.generators)])
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter_(1, chosen, 0.0)


_SIDES = threading.local()  # (first row, end row, left padding) per side while decoding


def _per_side_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    """transformers' sdpa, except inside ``_per_side`` on one-token steps: there each side's
    rows attend over that side's keys alone, without the padding and without a mask, as
    its own one-prompt call does (the same kernel on the same shapes: the same sums)."""
    sides = getattr(_SIDES, "sides", None)
    if sides is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs = [sdpa_attention_forward(module, query[a:b], key[a:b, :, pad:], value[a:b, :, pad:],
                                   None, **kwargs)[0] for a, b, pad in sides]
    return torch.cat(outs), None


AttentionInterface.register("sdpa", _per_side_sdpa)


@contextmanager
def _per_side(sides: list[tuple[int, int, int]]) -> Iterator[None]:
    _SIDES.sides = sides
    try:
        yield
    finally:
        _SIDES.sides = None


def decoding_config(
    sampling: SamplingParams, n: int, stop_ids: Sequence[int], pad_token_id: int | None,
    suppressed_ids: Sequence[int], logprobs: bool = False,
) -> GenerationConfig:
    """Every setting that changes what ``generate`` decodes, from ``sampling`` alone (the same
    settings ``rollout.vllm_engine.vllm_sampling_kwargs`` gives vLLM); transformers fills the
    rest with its neutral global defaults while ``_without_checkpoint_defaults`` holds."""
    sampled = sampling.do_sample
    return GenerationConfig(
        do_sample=sampled,
        # Greedy decoding reads none of the three (set, transformers warns they are ignored).
        temperature=sampling.temperature if sampled else None,
        top_k=sampling.top_k if sampled else None,
        top_p=sampling.top_p if sampled else None,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=n,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_token_id,
        suppress_tokens=list(suppressed_ids) or None,
        # Raw logits (before temperature, top-k and suppression) of every decoding step.
        output_logits=logprobs, return_dict_in_generate=True,
    )


@contextmanager
def _without_checkpoint_defaults(model: torch.nn.Module) -> Iterator[None]:
    """``model.generation_config`` empty for one ``generate`` call, restored afterwards (it
    is still what ``save_pretrained`` writes)."""
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


def _strip_after_stop(ids: list[int], stop_ids: Sequence[int]) -> list[int]:
    """Cut at the first stop token (kept), dropping the padding generate adds after it."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i + 1]
    return ids
