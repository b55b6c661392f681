"""Discriminative and generative embeddings of sides, batched, for evaluation and serving.

Both come from ``PolicyModule``'s forward pass over prompt (+ completion): the discriminative one
at the last ``<disc_emb>`` of the prompt, the generative one at the last ``<gen_emb>`` of the
completion (or the completion's last token if the model never wrote it). The RL learner reads
generative embeddings through the same module, so evaluation and reward see the same quantity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from umerl.data.formats import Side
from umerl.model.inputs import EncodedPrompt
from umerl.model.loading import PolicyBundle
from umerl.model.policy import PolicyModule
from umerl.model.sampling import RolloutEngine, SamplingParams


@torch.no_grad()
def forward_embeddings(
    bundle: PolicyBundle,
    prompts: Sequence[EncodedPrompt],
    completions: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One forward pass: (disc, gen, gen_found); gen is None without completions. L2-normalised."""
    batch = bundle.encoder.policy_inputs(prompts, completions)
    device = bundle.model.device
    policy = PolicyModule(bundle.model, bundle.disc_id, bundle.gen_id)
    out = policy(**{k: v.to(device) for k, v in batch.items()}, with_logprobs=False)
    gen = out.gen.cpu() if out.gen is not None else None
    found = out.gen_found.cpu() if out.gen_found is not None else None
    return out.disc.cpu(), gen, found


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
    """Generate ``num_samples`` completions per side and read each one's <gen_emb> state:
    from the decoding itself where the engine offers it (``generate_embedded``: the
    transformers engine), else in one forward over prompt and completion each."""
    sampling = sampling or SamplingParams()
    embeddings, texts, found = [], [], []
    embedded = getattr(engine, "generate_embedded", None)
    for start in range(0, len(sides), batch_size):
        chunk = sides[start:start + batch_size]
        if embedded is not None:
            samples, states = embedded(chunk, num_samples, sampling)
            embeddings.append(F.normalize(states.float(), dim=-1).cpu())
            found.append(torch.tensor([bool(c) and c[-1] == bundle.gen_id
                                       for group in samples for c in group]))
        else:
            samples = engine.generate(chunk, num_samples, sampling)
            gen, hit = _forward_gen(bundle, chunk, samples, batch_size)
            embeddings.append(gen)
            found.append(hit)
        texts.extend(
            [bundle.tokenizer.decode(c, skip_special_tokens=True) for c in group]
            for group in samples
        )
        if progress:
            progress(len(chunk))
    stacked = torch.cat(embeddings).view(len(sides), num_samples, -1)
    return GenerativeEmbeddings(stacked, texts, torch.cat(found).view(len(sides), num_samples))


def _forward_gen(bundle: PolicyBundle, sides: Sequence[Side], samples: list[list[list[int]]],
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[sides * n, d] generative embeddings and gen_found of sampled completions, from
    forwards over prompt + completion."""
    prompts = [bundle.encoder.encode(s) for s in sides]
    flat_prompts = [p for p, group in zip(prompts, samples) for _ in group]
    flat_completions = [c for group in samples for c in group]
    gens, hits = [], []
    for sub in range(0, len(flat_prompts), batch_size):
        _, gen, hit = forward_embeddings(
            bundle, flat_prompts[sub:sub + batch_size], flat_completions[sub:sub + batch_size]
        )
        gens.append(gen)
        hits.append(hit)
    return torch.cat(gens), torch.cat(hits)
