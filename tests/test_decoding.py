"""One decoder: evaluation, the embedding service and both rollout engines decode from our
SamplingParams alone, never from the checkpoint's generation_config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rollout.transformers_engine import TransformersEngine, decoding_config
from rollout.vllm_engine import vllm_sampling_kwargs
from umerl.data.formats import Side
from umerl.model.loading import load_policy
from umerl.model.sampling import SamplingParams

# What Qwen instruct releases put in generation_config.json, made strong enough that a tiny
# random model's greedy completions change under it.
CHECKPOINT_DEFAULTS = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 1, "top_k": 3,
                       "top_p": 0.5, "temperature": 0.3, "do_sample": True,
                       "min_new_tokens": 8}

SIDES = [Side(text="a blue square"), Side(text="Describe a red circle in many words."),
         Side(text="one two one two one two")]


@pytest.fixture(scope="module")
def penalised_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint, its generation_config.json carrying CHECKPOINT_DEFAULTS."""
    out = tmp_path_factory.mktemp("penalised") / "qwen2_vl"
    shutil.copytree(tiny_model_dir, out)
    path = out / "generation_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **CHECKPOINT_DEFAULTS}))
    return out


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path, penalised_dir: Path) -> tuple[TransformersEngine, ...]:
    return tuple(TransformersEngine(load_policy(d)) for d in (tiny_model_dir, penalised_dir))


def test_checkpoint_generation_config_does_not_change_greedy_completions(engines):
    plain, penalised = engines
    assert penalised.bundle.model.generation_config.repetition_penalty == 1.5
    greedy = SamplingParams(max_new_tokens=16, do_sample=False)
    assert penalised.generate(SIDES, 1, greedy) == plain.generate(SIDES, 1, greedy)


def test_checkpoint_generation_config_does_not_change_sampled_completions(engines):
    plain, penalised = engines
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50)
    seeds = [3, 4, 5]
    assert (penalised.generate_with_logprobs(SIDES, 2, sampling, seeds)
            == plain.generate_with_logprobs(SIDES, 2, sampling, seeds))
    # The model keeps its own config (what save_pretrained writes).
    assert penalised.bundle.model.generation_config.top_k == 3


def test_evaluation_and_service_decode_without_checkpoint_defaults(tiny_model_dir: Path,
                                                                   penalised_dir: Path):
    from umerl.eval.evaluate import EvalSettings, Evaluator
    from umerl.eval.runner import policy_and_engine
    from umerl.serve.service import Embedder, ServeOptions

    evaluated, served = [], []
    for checkpoint in (tiny_model_dir, penalised_dir):
        bundle, engine, _ = policy_and_engine(checkpoint, "float32", "cpu", 4)
        evaluator = Evaluator(bundle, engine, EvalSettings(max_new_tokens=16))
        evaluated.append(evaluator.embed(SIDES, "gen", "test")[1])
        embedder = Embedder(str(checkpoint), ServeOptions(max_new_tokens=16))
        served.append([r.completions for r in embedder.gen(SIDES, None)])
    assert evaluated[0] == evaluated[1]
    assert served[0] == served[1]


@pytest.mark.parametrize("sampling", [
    SamplingParams(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9),
    SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0),
    SamplingParams(max_new_tokens=12, do_sample=False),
])
def test_transformers_and_vllm_get_the_same_decoding_settings(sampling: SamplingParams):
    stop_ids, n = (7, 9), 1 if not sampling.do_sample else 3
    hf = decoding_config(sampling, n, stop_ids, 0, [4, 5])
    vllm = vllm_sampling_kwargs(sampling, n, 11, stop_ids, ["<a>", "<b>"])
    assert (hf.repetition_penalty, vllm["repetition_penalty"]) == (1.0, 1.0)
    assert (vllm["presence_penalty"], vllm["frequency_penalty"]) == (0.0, 0.0)
    assert hf.no_repeat_ngram_size == 0 and hf.num_beams == 1
    assert hf.min_new_tokens == vllm["min_tokens"] == 0
    assert hf.max_new_tokens == vllm["max_tokens"] == sampling.max_new_tokens
    assert list(hf.eos_token_id) == vllm["stop_token_ids"] == list(stop_ids)
    assert vllm["ignore_eos"] is True  # vLLM stops at stop_ids only, as generate does
    if sampling.do_sample:
        assert hf.do_sample and vllm["n"] == hf.num_return_sequences == n
        assert hf.temperature == vllm["temperature"] == sampling.temperature
        assert hf.top_k == vllm["top_k"] == sampling.top_k  # 0: off in both
        assert hf.top_p == vllm["top_p"] == sampling.top_p
    else:
        assert not hf.do_sample and vllm["temperature"] == 0.0  # vLLM's greedy
