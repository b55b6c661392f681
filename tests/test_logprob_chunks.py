"""Completion log-probs in chunks of tokens (``learner.logprob_chunk_tokens``).

Values and gradients are checked against a plain full log-softmax written here (no umerl
code); the memory bound by tracking every vocabulary-sized tensor the computation creates,
forward and backward, and the most bytes of them alive at once.
"""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from umerl.config.recipe import ConfigError, load_recipe
from umerl.model.policy import PolicyModule, chunked_token_logprobs


def full_reference(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """log p(target) from the whole ``[N, V]`` logits at once."""
    logits = (hidden @ weight.T).float() / temperature
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(targets)), targets]


def head_and_inputs(n: int, d: int = 16, vocab: int = 300, seed: int = 0):
    """Logits of std ~1.2, as a trained head's order of magnitude."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(0.3 * torch.randn(vocab, d, generator=g))
    hidden = torch.randn(n, d, generator=g).requires_grad_(True)
    return head, hidden, torch.randint(0, vocab, (n,), generator=g)


@pytest.mark.parametrize("chunk", [1, 3, 7, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunks_equal_the_full_log_softmax_values_and_gradients(chunk, temperature):
    head, hidden, targets = head_and_inputs(37)
    weights = torch.randn(37, generator=torch.Generator().manual_seed(1))

    got = chunked_token_logprobs(head, hidden, targets, temperature, chunk)
    (got * weights).sum().backward()
    got_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    expected = full_reference(head.weight, hidden, targets, temperature)
    (expected * weights).sum().backward()

    assert got.dtype == torch.float32 and got.shape == (37,)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grads[0], hidden.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grads[1], head.weight.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_entropy_equals_the_categorical_entropy_values_and_gradients(chunk,
                                                                             temperature):
    """``with_entropy``: column 1 is the entropy of softmax(logits / T) (torch's Categorical
    here, -sum p log p), values and gradients; column 0 the log-probs as without it."""
    head, hidden, targets = head_and_inputs(37)
    weights = torch.randn(37, generator=torch.Generator().manual_seed(1))
    got = chunked_token_logprobs(head, hidden, targets, temperature, chunk, with_entropy=True)
    (got[:, 1] * weights).sum().backward()
    got_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    logits = (hidden @ head.weight.T).float() / temperature
    expected = torch.distributions.Categorical(logits=logits).entropy()
    (expected * weights).sum().backward()

    assert got.shape == (37, 2)
    torch.testing.assert_close(got[:, 0], full_reference(head.weight, hidden, targets,
                                                         temperature), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[:, 1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grads[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grads[1], head.weight.grad, atol=1e-5, rtol=1e-5)
    assert chunked_token_logprobs(head, hidden[:0], targets[:0], with_entropy=True).shape \
        == (0, 2)


def test_no_tokens_and_bad_chunks():
    head, hidden, targets = head_and_inputs(0)
    assert chunked_token_logprobs(head, hidden, targets, 1.0, 4).shape == (0,)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_token_logprobs(head, hidden, targets, 1.0, 0)


class VocabTensors(TorchDispatchMode):
    """Every tensor an op returns whose last dimension is the vocabulary: the largest one
    and the most bytes of them alive at once (storages tracked by weak reference, so a
    tensor autograd keeps for the backward counts until it is freed)."""

    def __init__(self, vocab: int, weight_numel: int):
        super().__init__()
        self.vocab, self.weight_numel = vocab, weight_numel
        self.live, self.peak_bytes, self.largest_rows = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            # Not the head's weight gradient ([d, V] transposed), a parameter's size anyway.
            if (isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab
                    and t.numel() != self.weight_numel):
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                self.largest_rows = max(self.largest_rows, t.numel() // self.vocab)
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak_bytes = max(self.peak_bytes, sum(n for _, n in self.live.values()))
        return out


def policy_batch(bundle, rows: int, completion: int):
    """Text prompts with completions of ``completion`` random tokens each."""
    from umerl.data.formats import Side

    g = torch.Generator().manual_seed(0)
    prompts = [bundle.encoder.encode(Side(text=f"query number {i}")) for i in range(rows)]
    completions = [torch.randint(10, 500, (completion,), generator=g).tolist()
                   for _ in range(rows)]
    return bundle.encoder.policy_inputs(prompts, completions), completions


def test_policy_logprobs_equal_full_logits_and_keep_one_chunk_of_vocab_logits(tiny_bundle):
    """Through ``PolicyModule`` (the learner's forward, then a backward as the GRPO loss's):
    log-probs and parameter gradients equal the HF model's full logits' log-softmax; the
    vocabulary-sized tensors never exceed one chunk's rows, and those alive at once stay
    within a few copies of one chunk (measured: 4.0 chunks' fp32 logits). The unchunked form
    makes 160-row logits (20 chunks); chunks without recomputation keep every chunk's logits
    for the backward (measured: 23 chunks alive at once)."""
    model, chunk, rows, completion = tiny_bundle.model, 8, 4, 40
    vocab = model.lm_head.out_features
    policy = PolicyModule(model, tiny_bundle.disc_id, tiny_bundle.gen_id,
                          logprob_chunk_tokens=chunk).train()
    batch, completions = policy_batch(tiny_bundle, rows, completion)
    weights = torch.randn(rows * completion, generator=torch.Generator().manual_seed(2))

    model.zero_grad()
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).last_hidden_state
    hidden.requires_grad_(True)
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    mask[:, -completion:] = True
    tracker = VocabTensors(vocab, model.lm_head.weight.numel())
    with tracker:
        got, _ = policy._completion_logprobs(hidden, batch["input_ids"], mask, 0.9)
        (got[mask] * weights).sum().backward()
    got_grads = hidden.grad.clone(), model.lm_head.weight.grad.clone()

    hidden.grad, model.lm_head.weight.grad = None, None
    logits = (hidden[:, :-1] @ model.lm_head.weight.T).float() / 0.9
    full = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    expected = full[:, -completion:]
    (expected.reshape(-1) * weights).sum().backward()

    assert expected.tolist()[0][0] != 0.0
    torch.testing.assert_close(got[mask].view(rows, completion), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grads[0], hidden.grad, atol=1e-6, rtol=1e-6)
    # The head's gradient sums over all 160 tokens: summation order alone moves it by ~3e-6
    # (the unchunked code differs from this reference by as much).
    torch.testing.assert_close(got_grads[1], model.lm_head.weight.grad, atol=1e-5, rtol=1e-5)
    one_chunk = chunk * vocab * 4  # bytes of one chunk's fp32 logits
    assert tracker.largest_rows <= chunk, tracker.largest_rows
    assert tracker.peak_bytes <= 6 * one_chunk, (tracker.peak_bytes, one_chunk)
    print(f"vocab-sized tensors: largest {tracker.largest_rows} rows, peak alive "
          f"{tracker.peak_bytes} B = {tracker.peak_bytes / one_chunk:.1f} chunks' fp32 logits")


def test_whole_forward_matches_the_model_logits_with_small_chunks(tiny_bundle):
    """The full ``PolicyModule`` forward with 3-token chunks against the HF model's logits."""
    model = tiny_bundle.model
    policy = PolicyModule(model, tiny_bundle.disc_id, tiny_bundle.gen_id,
                          logprob_chunk_tokens=3).eval()
    batch, completions = policy_batch(tiny_bundle, 2, 5)
    with torch.no_grad():
        out = policy(**batch)
        inputs = {k: v for k, v in batch.items() if k != "completion_lengths"}
        logits = model(**inputs).logits.float()
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])
    expected = full[:, -5:, 0]
    torch.testing.assert_close(out.logprobs[out.completion_mask].view(2, 5), expected,
                               atol=1e-6, rtol=1e-6)
    assert out.entropy is None
    # with_entropy (rl.entropy_coeff): the entropy of each completion token's distribution
    with torch.no_grad():
        hot = policy(**batch, temperature=0.7, with_entropy=True)
    entropy = torch.distributions.Categorical(logits=logits[:, :-1] / 0.7).entropy()[:, -5:]
    torch.testing.assert_close(hot.entropy[hot.completion_mask].view(2, 5), entropy,
                               atol=1e-5, rtol=1e-5)
    assert (hot.entropy[~hot.completion_mask] == 0).all()


def test_chunk_key_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="learner.logprob_chunk_tokens"):
        load_recipe(None, ["learner.logprob_chunk_tokens=0"])
    assert load_recipe(None, []).learner.logprob_chunk_tokens == 1024


def test_agreed_chunks_add_empty_ones_and_change_no_value():
    """Under ZeRO-3 a rank runs as many chunks as the rank with the most tokens: the extra
    chunks call the head on no rows (its collectives happen) and every value and gradient
    stays that of the rank's own chunks."""
    head, hidden, targets = head_and_inputs(10)
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    agreed = chunked_token_logprobs(head, hidden, targets, 1.0, 4, agree_chunks=lambda n: n + 2)
    agreed.sum().backward()
    grad, hidden.grad = hidden.grad.clone(), None
    # 3 chunks of its own (4 + 4 + 2 rows), 2 empty ones; the backward recomputes all 5,
    # last first
    assert calls == [4, 4, 2, 0, 0] + [0, 0, 2, 4, 4]
    want = full_reference(head.weight.detach(), hidden.detach(), targets, 1.0)
    assert torch.allclose(agreed, want, atol=1e-6)
    full_reference(head.weight, hidden, targets, 1.0).sum().backward()
    assert torch.allclose(grad, hidden.grad, atol=1e-6)


def _unequal_lengths_main(rank: int, port: int, model: str, root: str,
                          media: dict[str, list[str]]) -> None:
    """A ZeRO-3 learner step where rank 1's completions are longer than rank 0's, with chunks
    of 1 token (so rank 1 runs more chunks), then the same step with one chunk per forward."""
    import os
    from pathlib import Path

    from test_zero3 import _completions, _rank_pairs

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from umerl.train import dist as udist
    from umerl.train.learner import Learner, StepShard

    udist.init_process_group(rank, 2, "127.0.0.1", port, backend="gloo")
    for chunk in (1, 4096):
        cfg = load_recipe(None, [
            f"output_dir={Path(root) / str(chunk)}", "rl.pairs_per_step=4", "rl.group_size=2",
            "rl.lr=0.01", "learner.num_workers=2", "learner.zero_stage=3",
            f"learner.logprob_chunk_tokens={chunk}", "wandb.mode=disabled"])
        learner = Learner(cfg, model, model)
        pairs = _rank_pairs(media, 1)
        longer = " longer" * (5 * rank)
        rollouts = [[_completions(learner.bundle.tokenizer, f"{side} {p.id}{longer}")
                     for p in pairs] for side in "qt"]
        metrics = learner.step(StepShard(1, pairs, 2 * rank, *rollouts))
        torch.save(metrics, Path(root) / f"rank{rank}_chunk{chunk}.pt")
    udist.barrier()


def test_zero3_ranks_with_unequal_completion_tokens_run_the_same_chunks(tmp_path,
                                                                        tiny_model_dir):
    """Without agreeing on the number of chunks, the rank with more completion tokens gathers
    the head's weights more often than the other: gloo aborted ("Received data size doesn't
    match expected size"), NCCL would hang. The step's metrics equal one chunk per forward."""
    from test_zero3 import _media, _spawn_bounded

    from umerl.train.dist import free_port

    _spawn_bounded(_unequal_lengths_main,
                   (free_port(), str(tiny_model_dir), str(tmp_path), _media(tmp_path)))
    for rank in (0, 1):
        small = torch.load(tmp_path / f"rank{rank}_chunk1.pt")
        whole = torch.load(tmp_path / f"rank{rank}_chunk4096.pt")
        for key in [k for k in whole if k.startswith(("actor/", "reward/"))]:
            assert small[key] == pytest.approx(whole[key], abs=1e-5), key
