"""The CPU rollout engine: batched ``transformers`` generate with the KV cache on.

n samples of a prompt share its prefill (``decode_dropping_finished``): each distinct prompt,
its images and video through the vision tower, runs once in one batch with the call's other
prompts, and its key/value cache is repeated n times before sampling; a row that has stopped
leaves the decoding batch. ``generate(..., num_return_sequences=n)`` would instead expand the
prompt n times, prefill every copy and decode every row to the longest one's end
(``rollout.share_prefill: false`` keeps that path, the benches' baseline).

Each row samples from its own generator (seeded per side and sample for a rollout, per call,
prompt and sample otherwise) by one inverse-CDF draw per token, so a row's completion does not
depend on the other rows of its batch, nor on which path decoded it; its log-probs agree
across batches and paths to float rounding (the matmuls' row count and the prompts' padding
pick the CPU kernels' summation order).

Decoding depends on our ``SamplingParams`` only, as vLLM's does (``rollout.vllm_engine``):
``generate`` merges the model's ``generation_config`` (the checkpoint's generation_config.json,
e.g. a Qwen instruct release's ``repetition_penalty``, ``top_k`` or ``top_p``) into every unset
field of a passed config (transformers 5 ``_prepare_generation_config``), so each call runs
with the model's config swapped for an empty one: unset fields then take transformers' neutral
global defaults (no penalties, no n-gram blocking, no forced tokens).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import Cache
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from umerl.data.formats import Side
from umerl.model.inputs import EncodedPrompt
from umerl.model.loading import PolicyBundle
from umerl.model.sampling import SamplingParams

# Rows (sides x samples) a seeded call (a rollout) decodes together.
SEEDED_BATCH_ROWS = 128


class TransformersEngine:
    """Samples from an in-process Hugging Face model, all prompts x samples in one batch.

    ``bundle`` is a ``PolicyBundle`` or anything with its ``model``, ``tokenizer``, ``encoder``
    (``collate``, ``suppressed_token_ids``) and ``stop_ids`` (e.g. a text-only teacher).
    Every call prefills each prompt once and drops finished rows (``decode_dropping_finished``),
    but for ``share_prefill=False``: there a seeded call (a rollout) prefills each of a side's
    n copies and decodes them to the longest one's end (``generate``'s own expansion), the
    path before the shared prefill, kept as the benches' baseline.
    """

    def __init__(self, bundle: PolicyBundle, batch_size: int = 16, share_prefill: bool = True):
        self.bundle = bundle
        self.batch_size = batch_size
        self.share_prefill = share_prefill
        # One decoding at a time on the shared model (the per-sample path also swaps the
        # model's generation_config for its generate call).
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
        rows = [row_seed(seed, j) for seed in seeds for j in range(n)]
        if self.share_prefill:
            ids, _, lps = self._decode_all(prompts, n, sampling, rows, SEEDED_BATCH_ROWS,
                                           logprobs=logprobs)
            return ids, lps
        # The path before the shared prefill, one generate call per side, the prompt expanded
        # n times and prefilled n times; each row samples from the same generator as above.
        ids, lps = [], []
        for i, prompt in enumerate(prompts):
            chunk_ids, chunk_lps = self._generate_expanded(prompt, rows[i * n:(i + 1) * n],
                                                           sampling, logprobs)
            ids.append(chunk_ids)
            lps.append(chunk_lps)
        return ids, lps

    def generate_encoded(
        self, prompts: Sequence[EncodedPrompt], n: int, sampling: SamplingParams
    ) -> list[list[list[int]]]:
        """Prompts already encoded (e.g. with a custom message); batched over prompts, each
        prompt prefilled once for its n samples, finished rows dropped from the decoding batch
        (``decode_dropping_finished``). Sample j of a prompt draws from its own generator,
        seeded from ``sampling.seed`` (else one draw of torch's global generator per call), j
        and the prompt's content: the same prompt samples the same completions in any batch."""
        return self._decode_all(prompts, n, sampling, self._unseeded_rows(prompts, n, sampling),
                                self.batch_size)[0]

    def generate_embedded(
        self, sides: Sequence[Side], n: int, sampling: SamplingParams
    ) -> tuple[list[list[list[int]]], torch.Tensor]:
        """``generate`` (unseeded: ``generate_encoded``'s sampling) plus each completion's
        last-layer hidden state at its last token, [sides * n, d] side-major: what
        ``PolicyModule`` reads as the generative embedding, here from the decoding itself
        (``umerl.model.embed`` skips its second forward over prompt and completion)."""
        prompts = [self.bundle.encoder.encode(side) for side in sides]
        completions, states, _ = self._decode_all(
            prompts, n, sampling, self._unseeded_rows(prompts, n, sampling), self.batch_size,
            embed=True)
        return completions, states

    @staticmethod
    def _unseeded_rows(prompts: Sequence[EncodedPrompt], n: int, sampling: SamplingParams
                       ) -> list[int] | None:
        """Each row's seed for a call without per-side seeds (None: greedy)."""
        if not sampling.do_sample:
            return None
        base = sampling.seed
        if base is None:
            base = int(torch.randint(2**62, ()).item())
        return [sample_seed(base, prompt, j) for prompt in prompts for j in range(n)]

    @torch.no_grad()
    def _decode_all(
        self, prompts: Sequence[EncodedPrompt], n: int, sampling: SamplingParams,
        row_seeds: Sequence[int] | None, rows_per_call: int, embed: bool = False,
        logprobs: bool = False,
    ) -> tuple[list[list[list[int]]], torch.Tensor, list[list[list[float]]]]:
        """[prompt][sample] completions, with ``embed`` their last hidden states, with
        ``logprobs`` their tokens' log-probs; ``rows_per_call`` rows (prompts x n) a batch."""
        bundle = self.bundle
        config = decoding_config(sampling, n, bundle.stop_ids, bundle.tokenizer.pad_token_id,
                                 bundle.encoder.suppressed_token_ids())
        temperature = (sampling.temperature if sampling.do_sample else 1.0) if logprobs else None
        ids: list[list[list[int]]] = []
        lps: list[list[list[float]]] = []
        states = []
        per_call = max(1, rows_per_call // max(n, 1))
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            batch = bundle.encoder.collate(chunk)
            batch.pop("prompt_lengths")
            batch = {k: v.to(bundle.model.device) for k, v in batch.items()}
            seeds = (None if row_seeds is None
                     else row_seeds[start * n:(start + len(chunk)) * n])
            with self._generate_lock:
                decoded = decode_dropping_finished(bundle.model, batch, config, seeds, embed,
                                                   temperature)
            ids.extend(decoded.rows[i * n:(i + 1) * n] for i in range(len(chunk)))
            lps.extend(decoded.logprobs[i * n:(i + 1) * n] for i in range(len(chunk)))
            if embed:
                states.append(decoded.states)
        return ids, torch.cat(states) if embed else torch.empty(0), lps

    @torch.no_grad()
    def _generate_expanded(
        self, prompt: EncodedPrompt, seeds: Sequence[int], sampling: SamplingParams,
        logprobs: bool,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """One prompt's ``len(seeds)`` completions from ``generate(...,
        num_return_sequences=n)``, which expands the prompt n times and prefills every copy,
        row j drawing as ``decode_dropping_finished`` draws under ``seeds[j]``; with
        ``logprobs``, their tokens' log-probs at the sampling temperature."""
        bundle, n = self.bundle, len(seeds)
        batch = bundle.encoder.collate([prompt])
        batch.pop("prompt_lengths")
        batch = {k: v.to(bundle.model.device) for k, v in batch.items()}
        config = decoding_config(sampling, n, bundle.stop_ids, bundle.tokenizer.pad_token_id,
                                 bundle.encoder.suppressed_token_ids(), logprobs)
        # The rows' own draws, a one-hot choice that generate's sampling (its warpers come
        # after the passed processors) then takes.
        processors = LogitsProcessorList([_RowSampler(config, seeds)] if sampling.do_sample
                                         else [])
        with self._generate_lock, _without_checkpoint_defaults(bundle.model):
            generated = bundle.model.generate(**batch, generation_config=config,
                                              logits_processor=processors)
        new = generated.sequences[:, batch["input_ids"].shape[1]:]
        completions = [_strip_after_stop(ids, bundle.stop_ids) for ids in new.tolist()]
        if not logprobs:
            return completions, [[] for _ in completions]
        # Step by step: a [rows, T, vocab] float copy would not fit for long completions of a
        # large vocabulary on a GPU.
        temperature = sampling.temperature if sampling.do_sample else 1.0
        chosen = torch.stack([_chosen_logprobs(step, new[:, t], temperature)
                              for t, step in enumerate(generated.logits)], dim=1)  # [n, T]
        return completions, [chosen[row, :len(ids)].tolist()
                             for row, ids in enumerate(completions)]


def row_seed(side_seed: int, sample: int) -> int:
    """The seed of sample ``sample`` of a side seeded ``side_seed`` (a rollout's)."""
    digest = hashlib.blake2b(f"{side_seed}:{sample}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def sample_seed(base: int, prompt: EncodedPrompt, sample: int) -> int:
    """The seed of one sample of one prompt: a digest of ``base``, the sample's index and
    the prompt's tokens and media, so it does not depend on the batch the prompt is in."""
    digest = hashlib.blake2b(f"{base}:{sample}:{prompt.input_ids}".encode(), digest_size=8)
    for media in (prompt.pixel_values, prompt.image_grid_thw, prompt.pixel_values_videos,
                  prompt.video_grid_thw):
        if media is not None:
            digest.update(media.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def _chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float
                     ) -> torch.Tensor:
    """Each row's log-prob of its token under softmax(raw logits / temperature): the policy
    log-prob the learners compute at ``rl.temperature``."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(
        -1, tokens[:, None])[:, 0]


@dataclass
class Decoded:
    """``decode_dropping_finished``'s rows, prompt-major: their completion tokens, their
    tokens' log-probs (empty lists unless asked) and their last hidden states (or None)."""

    rows: list[list[int]]
    logprobs: list[list[float]]
    states: torch.Tensor | None


@torch.no_grad()
def decode_dropping_finished(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], config: GenerationConfig,
    seeds: Sequence[int] | None, embed: bool = False, logprob_temperature: float | None = None,
) -> Decoded:
    """``config.num_return_sequences`` completions of each prompt of ``batch`` (greedy when
    ``seeds`` is None, else row i samples from a generator seeded ``seeds[i]``), rows in
    prompt-major order, each cut after its first stop token; with ``embed``, also each row's
    last-layer hidden state at its completion's last token ([rows, d]: the generative
    embedding before its normalisation, read from this decoding instead of a second forward
    over the prompt and completion); with ``logprob_temperature``, each token's log-prob
    under softmax(raw logits / that temperature).

    The prompts are prefilled once, as ``generate`` prefills them (the same positions, the
    same mask), and their caches repeated n times. Unlike ``generate``, a row that has stopped
    leaves the decoding batch (after one more step that feeds its last token, with
    ``embed``): ``generate`` computes every row to the longest one's end. Sampling is an
    inverse-CDF draw of one uniform number from the row's own generator per step, after the
    warpers ``generate`` uses (temperature, top-k, top-p): a row's draws do not depend on
    the other rows, so its completion depends on the batch only through float rounding (the
    matmuls' row count and the prompts' padding pick the kernels' summation order)."""
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
    lps: list[list[float]] = [[] for _ in rows]
    states: list[torch.Tensor | None] = [None] * len(rows)
    active = torch.arange(len(rows), device=logits.device)
    for step in range(config.max_new_tokens):
        tokens = pick(logits, active)
        for row, token in zip(active.tolist(), tokens.tolist()):
            rows[row].append(token)
        if logprob_temperature is not None:
            for row, lp in zip(active.tolist(), _chosen_logprobs(
                    logits, tokens, logprob_temperature).tolist()):
                lps[row].append(lp)
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
    return Decoded(rows, lps, torch.stack(states) if embed else None)  # type: ignore[arg-type]


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
        self.suppressed = torch.tensor(list(config.suppress_tokens or []), dtype=torch.long)
        self.warpers: list[LogitsProcessor] = []
        if seeds is not None:
            self.warpers = _sampling_warpers(config)
        # CPU generators whatever the model's device: a sample does not depend on the device,
        # and a step's draws cost one host-to-device copy, not a kernel launch per row.
        self.generators = None if seeds is None else [
            torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        if len(self.suppressed):  # out of place: the caller's logits stay raw (its log-probs)
            scores = scores.index_fill(1, self.suppressed.to(scores.device), float("-inf"))
        if self.generators is None:
            return scores.argmax(dim=-1)
        for warper in self.warpers:
            scores = warper(None, scores)
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
        draws = torch.cat([torch.rand(1, generator=self.generators[row])
                           for row in active.tolist()]).to(scores.device)
        chosen = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)[:, 0]
        return chosen.clamp_(max=scores.shape[-1] - 1)


class _RowSampler(LogitsProcessor):
    """``_TokenPicker``'s draws inside ``generate``: every row from its own generator, handed
    on as a one-hot choice (0 for the chosen token, -inf elsewhere) that ``generate``'s
    sampling warpers keep and its draw takes. The picker warps the scores as those warpers
    would, after ``generate``'s own suppression."""

    def __init__(self, config: GenerationConfig, seeds: Sequence[int]):
        self.picker = _TokenPicker(config, seeds)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor
                 ) -> torch.FloatTensor:
        chosen = self.picker(scores, torch.arange(scores.shape[0]))
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter_(1, chosen[:, None].to(scores.device), 0.0)


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
