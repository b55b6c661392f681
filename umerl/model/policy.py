"""One forward pass of the policy over prompt + completion, as training and RL need it.

``PolicyModule`` wraps a Hugging Face Qwen-VL model so a DeepSpeed engine can own it. One call
returns, per row of a left-padded batch (see ``InputEncoder.collate``):

- ``disc``: the hidden state at the last ``<disc_emb>`` of the prompt, L2-normalised;
- ``gen``: the hidden state at the last ``<gen_emb>`` of the completion (else its last token);
- ``logprobs``: log p(token) of every completion token (0 elsewhere) and ``completion_mask``;
- ``entropy`` (``with_entropy``): the entropy of the next-token distribution at every
  completion token (0 elsewhere), for ``rl.entropy_coeff``'s bonus.

Vocabulary logits are computed only at completion positions: on a 150k-token vocabulary the
full ``[B, T, V]`` tensor would dominate memory for nothing. Even those are computed in chunks
of ``logprob_chunk_tokens`` completion tokens (``chunked_token_logprobs``): 4 x 2048 tokens of
fp32 logits over 152k entries are 5 GB per copy, and the log-softmax makes several.

Given ``completion_ids`` (``InputEncoder.shared_prompt_inputs``), the batch holds each prompt
once and its G completions apart: the prompts run once, their keys and values are repeated G
times, and the completions run on top of them (GRPO's G samples of one prompt share it; the
prompt, with its image or video tokens, is most of each row). The outputs are the same, laid
out over the completion block: ``logprobs`` and ``completion_mask`` are ``[G * P, Tc]``, each
row's completion left-aligned.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# pyproject.toml's transformers requirement (tests/test_shared_media.py holds them equal).
TRANSFORMERS_REQUIREMENT = "transformers>=5.18,<5.20"

# learner.logprob_chunk_tokens' default (umerl/config/defaults.yaml): completion tokens whose
# fp32 vocabulary logits exist at once.
LOGPROB_CHUNK_TOKENS = 1024


class PolicyOutput(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 finds the tensors of a module's output
    (for its backward hooks) only inside tuples, lists and dicts."""

    disc: torch.Tensor  # [B, d], L2-normalised
    gen: torch.Tensor | None  # [B, d], L2-normalised; None without completions
    gen_found: torch.Tensor | None  # [B] bool: the completion wrote <gen_emb>
    logprobs: torch.Tensor | None  # [B, T]: log-prob of each completion token, 0 elsewhere
    completion_mask: torch.Tensor  # [B, T] bool
    entropy: torch.Tensor | None = None  # [B, T] like logprobs; with_entropy only


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True per row (-1 where a row has none)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values


def completion_mask_for(input_ids: torch.Tensor, completion_lengths: torch.Tensor) -> torch.Tensor:
    """Left-padded rows end with their completion: the last ``length`` positions of each row."""
    width = input_ids.shape[1]
    index = torch.arange(width, device=input_ids.device).expand_as(input_ids)
    return index >= (width - completion_lengths.to(input_ids.device))[:, None]


def completion_block_mask(completion_ids: torch.Tensor,
                          completion_lengths: torch.Tensor) -> torch.Tensor:
    """Shared-prompt layout: each row's completion left-aligned in ``completion_ids``."""
    width = completion_ids.shape[1]
    positions = torch.arange(width, device=completion_ids.device)[None, :]
    return positions < completion_lengths.to(completion_ids.device)[:, None]


def _chunk_logprobs(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    targets: torch.Tensor, temperature: float,
                    with_entropy: bool = False) -> torch.Tensor:
    """log p(target) of each row: logit[target] - logsumexp(logits), one fp32 ``[n, V]``;
    with ``with_entropy`` ``[n, 2]``: that and the entropy lse - sum(p * logits)."""
    logits = head(hidden).float() / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    if not with_entropy:
        return picked - lse
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return torch.stack([picked - lse, entropy], dim=-1)


def chunked_token_logprobs(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                           targets: torch.Tensor, temperature: float = 1.0,
                           chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
                           agree_chunks: Callable[[int], int] | None = None,
                           with_entropy: bool = False) -> torch.Tensor:
    """log p(``targets[i]``) under ``head(hidden[i])`` / ``temperature`` for ``hidden [N, d]``,
    ``chunk_tokens`` rows at a time, fp32 ``[N]``; with ``with_entropy`` ``[N, 2]``: column 1
    is the entropy of that distribution (from the same chunk's logits).

    At most one chunk's ``[chunk, V]`` fp32 logits exist at a time, forward and backward: with
    gradients on, each chunk runs under activation checkpointing, so autograd keeps only its
    ``[chunk, d]`` input and recomputes the logits when the backward reaches it (without it,
    the backward would hold every chunk's logits and softmax, as the unchunked form does).

    ``agree_chunks`` (ZeRO-3): maps this rank's number of chunks to the number every rank
    runs (the largest); the missing ones run on no rows. Each chunk calls ``head``, which under
    ZeRO-3 gathers its weights from all ranks, forward and in the backward's recompute: ranks
    with more completion tokens than others would otherwise make more collectives.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    chunks = -(-hidden.shape[0] // chunk_tokens)
    if agree_chunks is not None:
        chunks = agree_chunks(chunks)
    parts = []
    for start in range(0, chunks * chunk_tokens, chunk_tokens):
        rows, wanted = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if recompute:
            parts.append(checkpoint(_chunk_logprobs, head, rows, wanted, temperature,
                                    with_entropy, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, rows, wanted, temperature, with_entropy))
    if not parts:
        return hidden.new_zeros((0, 2) if with_entropy else 0, dtype=torch.float32)
    return torch.cat(parts)


def _spread(values: torch.Tensor, mask: torch.Tensor, with_entropy: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``[n]`` (or ``[n, 2]`` with the entropy) values into ``mask``'s True cells of
    a zero ``[B, T]`` tensor each: (log-probs, entropy or None)."""
    columns = values.unbind(-1) if with_entropy else (values,)
    out = []
    for column in columns:
        full = torch.zeros(mask.shape, dtype=column.dtype, device=column.device)
        full[mask] = column
        out.append(full)
    return out[0], (out[1] if with_entropy else None)


def embedding_positions(
    input_ids: torch.Tensor, completion_mask: torch.Tensor, disc_id: int, gen_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(disc position, gen position, gen found) per row."""
    disc = last_index((input_ids == disc_id) & ~completion_mask)
    if (disc < 0).any():
        row = int((disc < 0).nonzero()[0])
        raise ValueError(f"batch row {row} has no <disc_emb> token in its prompt")
    gen = last_index((input_ids == gen_id) & completion_mask)
    found = gen >= 0
    gen = torch.where(found, gen, torch.full_like(gen, input_ids.shape[1] - 1))
    return disc, gen, found


def require_encoder_outputs(base: nn.Module | type) -> None:
    """PolicyModule runs the vision tower itself (lockstep media, shared media) and hands its
    outputs to the Qwen-VL base model (``base``: an instance or its class) as
    ``mm_encoder_outputs``, a keyword of transformers' Qwen-VL models from 5.18 on. Older ones
    take it into ``**kwargs`` and ignore it: the image placeholders are embedded as text and
    the images are lost without an error (seen with 5.17 on an H200: the ZeRO-3 reference's
    log-probs off the full copy's by 1.5e-2)."""
    if "mm_encoder_outputs" not in inspect.signature(base.forward).parameters:
        import transformers

        name = base.__name__ if isinstance(base, type) else type(base).__name__
        raise RuntimeError(
            f"transformers {transformers.__version__}: {name}.forward takes no "
            "mm_encoder_outputs, so the learners' forwards would drop every image; umerl "
            f"needs {TRANSFORMERS_REQUIREMENT} (pip install '{TRANSFORMERS_REQUIREMENT}')")


class PolicyModule(nn.Module):
    """The HF model plus the embedding-token ids: the unit DeepSpeed trains.

    ``lockstep_media`` (``InputEncoder.blank_media``; given under ZeRO-3) makes every forward
    make the same vision-tower call, whatever its batch holds. Qwen-VL calls the tower once
    per modality present; under ZeRO-3 every call gathers parameters from all ranks, so a
    micro-batch with a video on one rank and none on another leaves collectives unmatched: a
    hang (NCCL), an abort (gloo) or DeepSpeed's "Detected a disagreement". With
    ``lockstep_media`` the tower runs here, before the model's token embedding, once, on all
    the batch's images and video together (the tower treats a video's temporal patches as an
    image's, each medium on its own), and its per-medium outputs are split back into the two
    modalities the model takes (``mm_encoder_outputs``). Every batch holds a medium (a
    text-only side carries the blank image in its prompt), so every rank makes one call per
    forward, its output reaching the result the same way, and its backward runs the same
    modules in the same order. Only a batch with no media at all runs the blank image, its
    output times 0. Chosen over keeping the tower out of ZeRO-3 partitioning: the projector is
    part of the tower and trains by default, so its parameters would stay partitioned and
    gathered anyway.

    Why one call and not one per modality with a blank one for the missing modality (the
    previous design): the two calls' backwards then ran in an order that depends on which
    call was blank (the blank output entered the result as a zero term, the real one through
    the placeholder tokens), so a rank running a blank image and one running a blank video
    ran the tower's modules in different orders. DeepSpeed records the module order once and
    keeps or releases gathered parameters by it: with gradient checkpointing, the rank whose
    order left the record dropped it, released the projector after the first call's backward
    and all-gathered it again for the second, while the other rank, still on the record, kept
    it and went on to reduce-scatter its gradients: a hang (issue 24;
    ``scripts/zero3_trace.py`` logs both ranks' gathers). Where the orders differed while the
    record was being taken, DeepSpeed aborted with "Detected a disagreement".
    (Not applied to the shared-prompt forward, which ZeRO-3 does not run.)

    ``image_index`` / ``video_index`` (``InputEncoder.shared_media_inputs``) mean the batch's
    media are each given once for the rows that share them (GRPO's G rows of one prompt): the
    tower runs here, once per medium, and its per-medium outputs are indexed out to the rows,
    in the same calls as without them (one per modality present; one under lockstep).
    """

    def __init__(self, model: nn.Module, disc_id: int, gen_id: int,
                 lockstep_media: dict[str, torch.Tensor] | None = None,
                 logprob_chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
                 agree_chunks: Callable[[int], int] | None = None):
        super().__init__()
        require_encoder_outputs(model.model)  # the base model under the generation head
        self.model = model
        self.disc_id = disc_id
        self.gen_id = gen_id
        self.lockstep_media = lockstep_media  # a plain dict: no buffers in the state dict
        self.logprob_chunk_tokens = int(logprob_chunk_tokens)
        # ZeRO-3: every rank runs as many log-prob chunks (see chunked_token_logprobs).
        self.agree_chunks = agree_chunks

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_lengths: torch.Tensor,
        with_logprobs: bool = True,
        temperature: float = 1.0,
        completion_ids: torch.Tensor | None = None,
        with_entropy: bool = False,
        **vision: torch.Tensor,
    ) -> PolicyOutput:
        if completion_ids is not None:
            return self._shared_prompt_forward(input_ids, attention_mask, completion_ids,
                                               completion_lengths, with_logprobs, temperature,
                                               vision, with_entropy)
        completion_mask = completion_mask_for(input_ids, completion_lengths)
        disc_pos, gen_pos, found = embedding_positions(
            input_ids, completion_mask, self.disc_id, self.gen_id
        )
        vision, blank_zero = self._run_vision(vision, input_ids.device)
        hidden = self.model.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **vision
        ).last_hidden_state
        if blank_zero is not None:
            hidden = hidden + blank_zero.to(hidden.dtype)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        disc = F.normalize(hidden[rows, disc_pos].float(), dim=-1)
        has_completion = bool(completion_mask.any())
        gen = F.normalize(hidden[rows, gen_pos].float(), dim=-1) if has_completion else None
        logprobs = entropy = None
        # Under agree_chunks even a batch without completion tokens runs the (empty) chunks:
        # the other ranks' forwards make their collectives whatever this batch holds.
        if with_logprobs and (has_completion or self.agree_chunks is not None):
            logprobs, entropy = self._completion_logprobs(
                hidden, input_ids, completion_mask, temperature, with_entropy)
            logprobs, entropy = (logprobs, entropy) if has_completion else (None, None)
        return PolicyOutput(disc, gen, found if has_completion else None, logprobs,
                            completion_mask, entropy)

    def _shared_prompt_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        completion_ids: torch.Tensor, completion_lengths: torch.Tensor, with_logprobs: bool,
        temperature: float, vision: dict[str, torch.Tensor], with_entropy: bool = False,
    ) -> PolicyOutput:
        """The forward of ``P`` prompts (left-padded) with ``G`` completions each."""
        P, G = input_ids.shape[0], completion_ids.shape[0] // input_ids.shape[0]
        no_completion = torch.zeros_like(input_ids, dtype=torch.bool)
        disc_pos, _, _ = embedding_positions(input_ids, no_completion, self.disc_id, self.gen_id)
        text = self.model.model
        # Explicit positions, so the completions can continue from the prompts' (M-RoPE:
        # vision tokens take 3D positions; the text after them counts on from the largest).
        positions, _ = text.get_rope_index(
            input_ids=input_ids, attention_mask=attention_mask, **_rope_kwargs(vision))
        prompt = text(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      use_cache=True, **vision)
        prompt_hidden = prompt.last_hidden_state  # [P, Tp, d]; the prompt's end is column -1
        cache = prompt.past_key_values
        cache.batch_repeat_interleave(G)
        width = completion_ids.shape[1]
        completion_mask = completion_block_mask(completion_ids, completion_lengths)
        after = positions[:, :, -1:].amax(dim=0).repeat_interleave(G, dim=0)  # [G * P, 1]
        continued = (after + 1 + torch.arange(width, device=after.device)).expand(3, -1, -1)
        hidden = text(input_ids=completion_ids, position_ids=continued, past_key_values=cache,
                      attention_mask=torch.cat([attention_mask.repeat_interleave(G, dim=0),
                                                completion_mask.long()], dim=1),
                      use_cache=True).last_hidden_state  # [G * P, Tc, d]
        # The state before completion token j: the prompt's last one for j = 0.
        before = torch.cat([prompt_hidden[:, -1:].repeat_interleave(G, dim=0), hidden], dim=1)
        rows = torch.arange(before.shape[0], device=before.device)
        prompts = torch.arange(P, device=prompt_hidden.device)
        disc = F.normalize(prompt_hidden[prompts, disc_pos].float(), dim=-1)
        gen_pos = last_index((completion_ids == self.gen_id) & completion_mask)
        found = gen_pos >= 0
        # Without <gen_emb>: the row's last token (the prompt's end for an empty completion).
        last = torch.where(found, gen_pos, completion_lengths.to(gen_pos.device) - 1)
        gen = F.normalize(before[rows, last + 1].float(), dim=-1)
        logprobs = entropy = None
        if with_logprobs:
            picked = chunked_token_logprobs(
                self.model.lm_head, before[:, :-1][completion_mask],
                completion_ids[completion_mask], temperature, self.logprob_chunk_tokens,
                self.agree_chunks, with_entropy)
            logprobs, entropy = _spread(picked, completion_mask, with_entropy)
        return PolicyOutput(disc.repeat_interleave(G, dim=0), gen, found, logprobs,
                            completion_mask, entropy)

    def _run_vision(self, vision: dict[str, torch.Tensor], device: torch.device
                    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The model kwargs with the tower already run here when the batch shares media
        (``image_index`` / ``video_index``: each medium once, its outputs indexed out to the
        rows that hold it) or under lockstep media (one call for all the batch's media; see
        the class docstring); and a zero that carries a blank call into the graph (None
        without lockstep media). Else the model runs the tower itself, once per modality
        present, as does the shared-media path without lockstep."""
        index = {m: vision.pop(f"{m}_index") for m in ("image", "video")
                 if f"{m}_index" in vision}
        if self.lockstep_media is None and not index:
            return vision, None
        kwargs: dict[str, Any] = dict(vision)
        if self.lockstep_media is not None:
            encoded, zero = self._one_tower_call(kwargs, device)
        else:
            encoded, zero = self._tower_call_per_modality(kwargs), None
        for modality, picks in index.items():  # the rows' grids too: M-RoPE reads them
            encoded[modality] = _pick_media(encoded[modality], picks.tolist())
            grid_key = f"{modality}_grid_thw"
            kwargs[grid_key] = kwargs[grid_key][picks.to(device)]
        return kwargs | {"mm_encoder_outputs": encoded}, zero

    def _tower_call_per_modality(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The tower on the images, then on the video, of the batch (as the model would)."""
        text = self.model.model
        features = {"image": text.get_image_features, "video": text.get_video_features}
        encoded: dict[str, Any] = {}
        for modality, pixels_key, grid_key in _MODALITIES:
            if pixels_key in kwargs:
                encoded[modality] = features[modality](
                    kwargs.pop(pixels_key), kwargs[grid_key], return_dict=True)
        return encoded

    def _one_tower_call(self, kwargs: dict[str, Any], device: torch.device
                        ) -> tuple[dict[str, Any], torch.Tensor]:
        """Lockstep (ZeRO-3): the batch's images and video through the tower in one call,
        its per-medium outputs split back into the two modalities; the blank image when the
        batch has no media, its output times 0 (the returned zero)."""
        text = self.model.model
        present = [(m, p, g) for m, p, g in _MODALITIES if p in kwargs]
        zero = torch.zeros((), device=device)
        if not present:
            blank = text.get_image_features(self.lockstep_media["pixel_values"].to(device),
                                            self.lockstep_media["image_grid_thw"].to(device),
                                            return_dict=True)
            # (t * 0).sum(), not t.sum() * 0: a large sum cannot overflow into inf * 0.
            return {}, zero + sum((t * 0).sum() for t in _float_tensors(blank))
        pixels = torch.cat([kwargs.pop(p) for _, p, _ in present])
        grids = [kwargs[g] for _, _, g in present]
        out = text.get_image_features(pixels, torch.cat(grids), return_dict=True)
        encoded, start = {}, 0
        for (modality, _, _), grid in zip(present, grids):
            encoded[modality] = _pick_media(out, list(range(start, start + len(grid))))
            start += len(grid)
        return encoded, zero

    def _completion_logprobs(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor,
        temperature: float, with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs, entropy or None), each ``[B, T]``, 0 outside the completion."""
        # The state at t-1 predicts the token at t.
        predicts = completion_mask[:, 1:]
        values = chunked_token_logprobs(
            self.model.lm_head, hidden[:, :-1][predicts], input_ids[:, 1:][predicts],
            temperature, self.logprob_chunk_tokens, self.agree_chunks, with_entropy)
        shifted = torch.zeros_like(completion_mask)
        shifted[:, 1:] = predicts
        return _spread(values, shifted, with_entropy)


# (modality, pixels key, grid key). Every Qwen-VL family's tower treats a video's temporal
# patches as it does an image's (its ``get_video_features`` is ``get_image_features``'s code
# or a call of it), so one call can run both.
_MODALITIES = (("image", "pixel_values", "image_grid_thw"),
               ("video", "pixel_values_videos", "video_grid_thw"))


def _rope_kwargs(vision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision kwargs ``get_rope_index`` reads (every Qwen-VL family names them so)."""
    keys = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    return {k: vision[k] for k in keys if k in vision}


def _pick_media(out: Any, picks: list[int]) -> Any:
    """The tower's output for media ``picks`` (indices, with repeats), a new output object:
    every Qwen-VL family splits its merged features per medium (``pooler_output``; Qwen3-VL's
    ``deepstack_features`` per layer), which is all the model reads. Picking from a tuple
    reuses the medium's tensor, so each row's gradient flows back into it and sums there, as
    over separate copies."""
    fields = dict(out.items())
    fields["pooler_output"] = tuple(out.pooler_output[i] for i in picks)
    if fields.get("deepstack_features") is not None:
        fields["deepstack_features"] = [tuple(layer[i] for i in picks)
                                        for layer in out.deepstack_features]
    return type(out)(**fields)


def _float_tensors(value: object) -> list[torch.Tensor]:
    """Every floating-point tensor in a model output (tensors, tuples, lists, ModelOutputs):
    the tower's features, pooled features and, in Qwen3-VL, its deepstack features."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):  # transformers' ModelOutput is an OrderedDict
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _float_tensors(item)]
    return []
