"""Evaluation: pools, the `umerl eval` command end to end, and recomputing its scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from umerl.cli import main
from umerl.data.formats import EvalQuery, Side
from umerl.eval.evaluate import build_pools, parse_modes
from umerl.model.embed import gen_embeddings
from umerl.model.sampling import SamplingParams


def test_local_pools_merge_duplicates_and_keep_grades_aligned() -> None:
    a, b, c = Side(text="a"), Side(text="b"), Side(text="c")
    items = [EvalQuery(Side(text="q1"), (a, b, c), (1.0, 0.0, 0.0)),
             EvalQuery(Side(text="q2"), (c, a), (2.0, 0.5))]
    pools = build_pools(items, "local")
    assert [s.text for s in pools.candidates] == ["a", "b", "c"]
    assert [p.tolist() for p in pools.pools] == [[0, 1, 2], [2, 0]]
    assert [r.tolist() for r in pools.relevance] == [[1.0, 0.0, 0.0], [2.0, 0.5]]


def test_global_pools_rank_against_every_unique_candidate() -> None:
    a, b, c = Side(text="a"), Side(text="b"), Side(text="c")
    items = [EvalQuery(Side(text="q1"), (a, b), (1.0, 0.0)),
             EvalQuery(Side(text="q2"), (c,), (3.0,))]
    pools = build_pools(items, "global")
    assert [p.tolist() for p in pools.pools] == [[0, 1, 2], [0, 1, 2]]
    assert [r.tolist() for r in pools.relevance] == [[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]]


def test_modes_are_validated() -> None:
    assert parse_modes(["disc:gen"]) == (("disc", "gen"),)
    with pytest.raises(ValueError, match="query:target"):
        parse_modes(["disc"])
    with pytest.raises(ValueError, match="query:target"):
        parse_modes(["gen:text"])


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory) -> Path:
    """A small local-pool task: colour patches against colour names."""
    root = tmp_path_factory.mktemp("toy")
    colours = {"red": (220, 20, 20), "green": (20, 180, 20), "blue": (20, 20, 220),
               "yellow": (230, 230, 0)}
    names = list(colours)
    lines = []
    for i, (name, rgb) in enumerate(colours.items()):
        Image.new("RGB", (40, 40), rgb).save(root / f"{name}.png")
        others = [n for n in names if n != name]
        lines.append(json.dumps({
            "qry_inst": "Represent the given image.", "qry_text": "", "qry_img_path": f"{name}.png",
            "tgt_inst": "Represent the colour name.", "tgt_text": [name, *others],
            "tgt_img_path": [""] * len(names), "rel_scores": [2, 1, 0, 0] if i == 0 else None,
        }))
    text = "\n".join(line.replace(', "rel_scores": null', "") for line in lines) + "\n"
    (root / "colours.jsonl").write_text(text, encoding="utf-8")
    return root / "colours.jsonl"


def test_umerl_eval_writes_scores_that_recompute_from_saved_embeddings(
    tiny_model_dir: Path, toy_task: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "eval"
    code = main(["eval", str(tiny_model_dir), str(toy_task), "--out", str(out),
                 "--pass-k", "1", "2", "--max-new-tokens", "6", "--save-embeddings"])
    assert code == 0
    printed = capsys.readouterr().out
    for column in ("disc", "gen", "oracle", "pass@1", "pass@2", "overall"):
        assert column in printed
    summary = json.loads((out / "summary.json").read_text())
    task = summary["tasks"]["colours"]
    assert task["num_queries"] == 4 and task["num_candidates"] == 4
    assert set(task["scores"]) == {"disc", "gen", "oracle"}
    assert task["scores"]["oracle"] >= max(task["scores"]["disc"], task["scores"]["gen"])
    assert 0.0 <= task["pass_at_k"]["pass@1"] <= task["pass_at_k"]["pass@2"] <= 1.0
    for key in ("pass@1", "pass@2"):  # per query too, for `umerl compare`'s intervals
        assert len(task["per_query"][key]) == 4
        assert np.mean(task["per_query"][key]) == pytest.approx(task["pass_at_k"][key])
    assert all(v in (0.0, 0.5, 1.0) for v in task["per_query"]["pass@1"])  # c / 2 samples
    for mode in ("disc", "gen", "oracle"):
        scores = json.loads((out / mode / "colours_score.json").read_text())
        assert {"hit@1", "ndcg_linear@5", "hit@5", "ndcg_linear@10"} <= set(scores)

    # Anyone can recompute the scores from the saved embeddings, without the model.
    arrays = np.load(out / "embeddings" / "colours.npz")
    layout = json.loads((out / "embeddings" / "colours.json").read_text())
    assert len(layout["candidate_ids"]) == 4
    for mode in ("disc", "gen"):
        q, c = arrays[f"query_{mode}"], arrays[f"candidate_{mode}"]
        hits, ndcgs = [], []
        for i, (pool, rel) in enumerate(zip(layout["pools"], layout["relevance"])):
            sims = c[pool] @ q[i]
            order = sorted(range(len(pool)), key=lambda j: (-sims[j], rel[j], j))
            hits.append(float(rel[order[0]] > 0))
            dcg = sum(rel[j] / np.log2(r + 2) for r, j in enumerate(order[:5]))
            ideal = sum(g / np.log2(r + 2) for r, g in enumerate(sorted(rel, reverse=True)[:5]))
            ndcgs.append(dcg / ideal)
        scores = json.loads((out / mode / "colours_score.json").read_text())
        assert scores["hit@1"] == pytest.approx(np.mean(hits), abs=1e-9)
        assert scores["ndcg_linear@5"] == pytest.approx(np.mean(ndcgs), abs=1e-6)
    completions = json.loads((out / "completions" / "colours.json").read_text())
    assert len(completions["query_gen"]) == 4


def test_eval_errors_name_the_problem(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", str(tiny_model_dir), str(tmp_path / "missing.jsonl")]) == 2
    assert "task file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qry_text": "x", "tgt_text": "oops"}\n')
    assert main(["eval", str(tiny_model_dir), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: field 'tgt_text' must be list" in capsys.readouterr().err


class _GenerateThenForward:
    """The evaluation's engine before gen embeddings came from the decoding: one batched
    ``generate`` per call, embeddings from a second forward over prompt and completion
    (``gen_embeddings`` takes that path for an engine without ``generate_embedded``)."""

    def __init__(self, bundle):
        self.bundle = bundle

    def generate(self, sides, n, sampling, seeds=None):
        from test_prefill_once import batched_generate_reference

        bundle = self.bundle
        prompts = [bundle.encoder.encode(s) for s in sides]
        return batched_generate_reference(bundle, prompts, n, sampling)


def test_greedy_scores_equal_those_of_generate_then_forward(tiny_bundle, toy_task) -> None:
    """The transformers engine reads gen embeddings from its decoding (dropping finished
    rows) and the greedy modes score exactly as generate + a second forward scored them."""
    from rollout.transformers_engine import TransformersEngine
    from umerl.data.tasks import TaskSpec
    from umerl.eval.evaluate import EvalSettings, Evaluator

    spec = TaskSpec("colours", toy_task, modality="image", pool="local")
    settings = EvalSettings(pass_k=(), batch_size=3, max_new_tokens=6)
    now, before = [Evaluator(tiny_bundle, engine, settings).run_task(spec, None) for engine
                   in (TransformersEngine(tiny_bundle, 3), _GenerateThenForward(tiny_bundle))]
    assert now.per_mode == before.per_mode and now.per_query == before.per_query
    assert set(now.per_mode) == {"disc", "gen", "oracle"}
    sides = [Side(text="red"), Side(text="a longer colour name query"), Side(text="blue")]
    greedy = SamplingParams(max_new_tokens=6, do_sample=False)
    decoded = gen_embeddings(tiny_bundle, TransformersEngine(tiny_bundle, 3), sides, 1, greedy)
    forward = gen_embeddings(tiny_bundle, _GenerateThenForward(tiny_bundle), sides, 1, greedy)
    assert decoded.completions == forward.completions
    assert torch.equal(decoded.gen_found, forward.gen_found)
    assert torch.allclose(decoded.embeddings, forward.embeddings, atol=1e-5, rtol=0)


def test_a_rerun_reuses_an_evaluation_of_the_same_checkpoint_and_settings(
        tiny_model_dir: Path, benchmark_manifest: Path, tmp_path: Path, monkeypatch) -> None:
    """A resumed run reuses the driver's evaluation of a stage's checkpoint when the
    checkpoint, the settings and the task files are those it scored (before: every rerun
    evaluated "before" and "sft" again, hours on GPUs at 512 new tokens). Another budget,
    another checkpoint, an evaluation stopped before its stamp, or a task file written since,
    evaluates again."""
    import os
    import shutil

    import umerl.eval.runner as runner
    from umerl.config.recipe import load_recipe

    evaluated: list[str] = []
    real = runner.run_eval_work
    monkeypatch.setattr(runner, "run_eval_work", lambda cfg, label, *a, **k: evaluated.append(
        label) or real(cfg, label, *a, **k))
    cfg = load_recipe(None, [f"output_dir={tmp_path}", "eval.tasks=[faces_cls]",
                             f"data.benchmark_dir={benchmark_manifest.parent}",
                             "eval.pass_k=[]", "eval.max_new_tokens=4", "wandb.mode=disabled"])
    first = runner.evaluate_checkpoint(cfg, str(tiny_model_dir), "before")
    again = runner.evaluate_checkpoint(cfg, str(tiny_model_dir), "before")
    assert len(evaluated) == 1 and again["tasks"] == first["tasks"]
    cfg.eval.max_new_tokens = 5
    runner.evaluate_checkpoint(cfg, str(tiny_model_dir), "before")
    assert len(evaluated) == 2
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    runner.evaluate_checkpoint(cfg, str(other), "before")
    assert len(evaluated) == 3
    (tmp_path / "eval" / "before" / runner.STAMP).unlink()  # stopped before the stamp
    runner.evaluate_checkpoint(cfg, str(other), "before")
    assert len(evaluated) == 4
    task = benchmark_manifest.parent / "faces_cls" / "test.jsonl"
    times = task.stat()
    os.utime(task, ns=(times.st_atime_ns, times.st_mtime_ns + 1))
    try:
        runner.evaluate_checkpoint(cfg, str(other), "before")
    finally:
        os.utime(task, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert len(evaluated) == 5
    runner.evaluate_checkpoint(cfg, str(other), "before")
    assert len(evaluated) == 6  # the stamp names the file's time when it was evaluated
