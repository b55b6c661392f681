"""Discriminative and generative embeddings: hidden states at <disc_emb> and <gen_emb>.

Both embeddings come from a forward pass over prompt (+ completion): the discriminative one at the
last ``<disc_emb>`` of the prompt, the generative one at the last ``<gen_emb>`` of the completion
(or the completion's last token if the model never wrote it). The RL learner reads generative
embeddings the same way, so evaluation and reward see the same quantity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rollout.engine import RolloutEngine, SamplingParams
from umerl.data import Side
from umerl.inputs import EncodedPrompt
from umerl.model import PolicyBundle


@dataclass
class EmbeddingPositions:
    """Per row of a collated batch: where each embedding is read."""

    disc: torch.Tensor  # [B] index of the last <disc_emb> inside the prompt
    gen: torch.Tensor  # [B] index of the last <gen_emb> in the completion, else its last token
    gen_found: torch.Tensor  # [B] bool: the completion contains <gen_emb>


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True per row (-1 where a row has none)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values


def collate_with_lengths(
    bundle: PolicyBundle,
    prompts: Sequence[EncodedPrompt],
    completions: Sequence[Sequence[int]] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Collate and also return prompt and completion lengths per row."""
    batch = bundle.encoder.collate(prompts, completions)
    prompt_lengths = batch.pop("prompt_lengths")
    if completions is None:
        completion_lengths = torch.zeros_like(prompt_lengths)
    else:
        completion_lengths = torch.tensor([len(c) for c in completions])
    return batch, prompt_lengths, completion_lengths


def positions_for(
    bundle: PolicyBundle, input_ids: torch.Tensor, completion_lengths: torch.Tensor
) -> EmbeddingPositions:
    width = input_ids.shape[1]
    index = torch.arange(width).expand_as(input_ids)
    in_prompt = index < (width - completion_lengths)[:, None]
    disc = last_index((input_ids == bundle.disc_id) & in_prompt)
    if (disc < 0).any():
        row = int((disc < 0).nonzero()[0])
        raise ValueError(f"batch row {row} has no <disc_emb> token in its prompt")
    completion_gen = (input_ids == bundle.gen_id) & ~in_prompt
    gen = last_index(completion_gen)
    found = gen >= 0
    gen = torch.where(found, gen, torch.full_like(gen, width - 1))
    return EmbeddingPositions(disc=disc, gen=gen, gen_found=found)


def last_hidden_state(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final-layer (post-norm) hidden states, without computing vocabulary logits."""
    return model.model(**batch, use_cache=False).last_hidden_state


def gather_rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]


@torch.no_grad()
def forward_embeddings(
    bundle: PolicyBundle,
    prompts: Sequence[EncodedPrompt],
    completions: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One forward pass: (disc, gen, gen_found); gen is None without completions. L2-normalised."""
    batch, _, completion_lengths = collate_with_lengths(bundle, prompts, completions)
    positions = positions_for(bundle, batch["input_ids"], completion_lengths)
    device = bundle.model.device
    hidden = last_hidden_state(bundle.model, {k: v.to(device) for k, v in batch.items()})
    disc = F.normalize(gather_rows(hidden, positions.disc).float(), dim=-1)
    if completions is None:
        return disc.cpu(), None, None
    gen = F.normalize(gather_rows(hidden, positions.gen).float(), dim=-1)
    return disc.cpu(), gen.cpu(), positions.gen_found


def disc_embeddings(
    bundle: PolicyBundle,
    sides: Sequence[Side],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[N, hidden] L2-normalised discriminative embeddings, batched; no generation."""
    out = []
    for start in range(0, len(sides), batch_size):
        chunk = [bundle.encoder.encode(s) for s in sides[start:start + batch_size]]
        out.append(forward_embeddings(bundle, chunk)[0])
        if progress:
            progress(len(chunk))
    return torch.cat(out)


@dataclass
class GenerativeEmbeddings:
    embeddings: torch.Tensor  # [N, k, hidden], L2-normalised
    completions: list[list[str]]  # [N][k] decoded, special tokens kept out
    gen_found: torch.Tensor  # [N, k] bool


def gen_embeddings(
    bundle: PolicyBundle,
    engine: RolloutEngine,
    sides: Sequence[Side],
    num_samples: int = 1,
    sampling: SamplingParams | None = None,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> GenerativeEmbeddings:
    """Generate ``num_samples`` completions per side, then read <gen_emb> in one forward each."""
    sampling = sampling or SamplingParams()
    embeddings, texts, found = [], [], []
    for start in range(0, len(sides), batch_size):
        prompts = [bundle.encoder.encode(s) for s in sides[start:start + batch_size]]
        samples = engine.generate(prompts, num_samples, sampling)
        flat_prompts = [p for p in prompts for _ in range(num_samples)]
        flat_completions = [c for group in samples for c in group]
        for sub in range(0, len(flat_prompts), batch_size):
            _, gen, hit = forward_embeddings(
                bundle, flat_prompts[sub:sub + batch_size], flat_completions[sub:sub + batch_size]
            )
            embeddings.append(gen)
            found.append(hit)
        texts.extend(
            [bundle.tokenizer.decode(c, skip_special_tokens=True) for c in group]
            for group in samples
        )
        if progress:
            progress(len(prompts))
    stacked = torch.cat(embeddings).view(len(sides), num_samples, -1)
    return GenerativeEmbeddings(stacked, texts, torch.cat(found).view(len(sides), num_samples))
