"""The router of mode auto: fitting, the file, and `umerl eval --modes auto` on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from umerl.cli import main
from umerl.data.formats import Side
from umerl.eval.evaluate import AUTO, parse_modes
from umerl.eval.router import CHEAP_FEATURES, Router, RoutingData, fit_router, routed

HIDDEN = 8


def _synthetic(n: int = 120, seed: int = 0) -> RoutingData:
    """Gen wins on text-only inputs, disc on inputs with an image, a third tie."""
    rng = np.random.default_rng(seed)
    sides, disc_scores, gen_scores = [], [], []
    for i in range(n):
        text_only = i % 2 == 0
        sides.append(Side(text=f"query {i}") if text_only else
                     Side(text=f"query {i}", images=(f"/img/{i}.png",)))
        tie = i % 3 == 0
        disc_scores.append(1.0 if tie or not text_only else 0.0)
        gen_scores.append(1.0 if tie or text_only else 0.0)
    disc = rng.normal(size=(n, HIDDEN))
    disc /= np.linalg.norm(disc, axis=1, keepdims=True)
    return RoutingData(sides, disc, np.array(disc_scores), np.array(gen_scores), ["t"] * n)


def test_fit_learns_who_wins_from_features() -> None:
    data = _synthetic()
    router = fit_router(data, folds=4)
    to_gen = router.route(data.sides, data.disc)
    assert to_gen.tolist() == [s.is_text_only for s in data.sides]
    # On fresh inputs too, and the routed score reaches the oracle (computed by hand).
    fresh = _synthetic(seed=1)
    fresh_routes = router.route(fresh.sides, fresh.disc)
    auto = np.where(fresh_routes, fresh.gen_scores, fresh.disc_scores).mean()
    assert auto == pytest.approx(np.maximum(fresh.gen_scores, fresh.disc_scores).mean())
    assert router.meta["gen_better"] == 40 and router.meta["disc_better"] == 40
    assert router.meta["tied"] == 40


def test_a_mode_that_never_loses_gets_everything() -> None:
    data = _synthetic()
    data.gen_scores = np.minimum(data.gen_scores, data.disc_scores)  # gen never wins
    assert not fit_router(data).route(data.sides, data.disc).any()
    data = _synthetic()
    data.disc_scores = np.minimum(data.gen_scores, data.disc_scores)  # disc never wins
    assert fit_router(data).route(data.sides, data.disc).all()


def test_overall_gain_weights_queries_by_their_task_share() -> None:
    data = RoutingData([Side(text="x")] * 4, np.zeros((4, HIDDEN)), np.zeros(4),
                       np.array([1.0, 1.0, 0.0, 0.0]), ["small", "big", "big", "big"])
    # overall = mean of task means: the small task's query is worth 1/2, each big one 1/6;
    # scaled by N = 4 queries: 2 and 2/3.
    np.testing.assert_allclose(data.overall_gain, [2.0, 2 / 3, 0.0, 0.0])
    assert data.overall_gain.mean() == pytest.approx((1.0 + 1 / 3) / 2)


def test_router_file_round_trip_and_errors(tmp_path: Path) -> None:
    data = _synthetic()
    router = fit_router(data, folds=4)
    path = router.save(tmp_path / "r.json")
    loaded = Router.load(path)
    np.testing.assert_allclose(loaded.gen_probability(data.sides, data.disc),
                               router.gen_probability(data.sides, data.disc))
    with pytest.raises(ValueError, match="fitted on 8-d"):
        loaded.route(data.sides, np.zeros((len(data.sides), 4)))
    (tmp_path / "other.json").write_text(json.dumps({"weights": [1]}))
    with pytest.raises(ValueError, match="not a router file"):
        Router.load(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable router file"):
        Router.load(tmp_path / "broken.json")


def test_routed_takes_each_query_from_its_mode() -> None:
    per_query = {"disc": {"hit@1": np.array([1.0, 0.0, 1.0])},
                 "gen": {"hit@1": np.array([0.0, 1.0, 0.0])}}
    assert routed(per_query, np.array([False, True, True]))["hit@1"].tolist() == [1, 1, 0]


def test_parse_modes_auto_brings_disc_and_gen() -> None:
    assert parse_modes(["auto"]) == (("disc", "disc"), ("gen", "gen"), AUTO)
    assert parse_modes(["gen:gen", "auto"]) == (("gen", "gen"), ("disc", "disc"), AUTO)


@pytest.fixture(scope="module")
def mixed_task(tmp_path_factory) -> Path:
    """Six queries, three text-only and three with an image, against colour names."""
    root = tmp_path_factory.mktemp("mixed")
    colours = {"red": (220, 20, 20), "green": (20, 180, 20), "blue": (20, 20, 220)}
    lines = []
    for name, rgb in colours.items():
        Image.new("RGB", (40, 40), rgb).save(root / f"{name}.png")
        names = [name, *(n for n in colours if n != name)]
        for text, image in ((f"the colour {name}", ""), ("", f"{name}.png")):
            lines.append(json.dumps({"qry_inst": "Represent it.", "qry_text": text,
                                     "qry_img_path": image, "tgt_inst": "A colour name.",
                                     "tgt_text": names, "tgt_img_path": [""] * 3}))
    (root / "mixed.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "mixed.jsonl"


def _text_only_router(hidden: int, path: Path) -> Path:
    width = hidden + len(CHEAP_FEATURES)
    weights = [0.0] * width
    weights[hidden + CHEAP_FEATURES.index("text_only")] = 10.0
    return Router(hidden, [0.0] * width, [1.0] * width, weights, -5.0, 0.5).save(path)


def test_eval_auto_scores_routed_queries_and_reports_the_share(
    tiny_model_dir: Path, tiny_bundle, mixed_task: Path, tmp_path: Path, capsys
) -> None:
    router = _text_only_router(tiny_bundle.hidden_size, tmp_path / "router.json")
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_model_dir), str(mixed_task), "--modes", "auto", "--router",
                 str(router), "--pass-k", "--max-new-tokens", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "auto->gen" in printed
    summary = json.loads((out / "summary.json").read_text())
    task = summary["tasks"]["mixed"]
    assert list(task["scores"]) == ["disc", "gen", "auto", "oracle"]
    per = task["per_query"]
    text_only = [i % 2 == 0 for i in range(6)]  # the file alternates text, image
    assert per["auto"] == [g if t else d for d, g, t in zip(per["disc"], per["gen"], text_only)]
    assert task["auto_gen_share"] == 0.5
    assert summary["auto"]["routed_to_gen"] == 3 and summary["auto"]["gen_share"] == 0.5


def test_eval_auto_needs_a_router(tiny_model_dir: Path, mixed_task: Path, capsys) -> None:
    assert main(["eval", str(tiny_model_dir), str(mixed_task), "--modes", "auto"]) == 2
    assert "--modes auto needs --router" in capsys.readouterr().err


def test_route_fit_writes_a_router_the_evaluator_reads(
    tiny_model_dir: Path, tiny_bundle, mixed_task: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "fitted.json"
    assert main(["route", "fit", str(tiny_model_dir), str(mixed_task), "--out", str(out),
                 "--max-new-tokens", "6", "--folds", "2"]) == 0
    assert "router written to" in capsys.readouterr().out
    router = Router.load(out)
    assert router.hidden_size == tiny_bundle.hidden_size
    assert router.meta["num_queries"] == 6 and router.meta["max_new_tokens"] == 6


def test_route_fit_decodes_and_resolves_tasks_as_the_run_did(
    tiny_model_dir: Path, mixed_task: Path, tmp_path: Path, monkeypatch
) -> None:
    """The router learns from the gen outcomes serving will have: ``umerl route fit`` decodes
    with the budget stored in the checkpoint by its run, as ``umerl eval`` and ``umerl serve``
    do (77 here; before: umerl's default 32 whatever the run, so a cpu_tiny router learned
    from 32-token decodes of 40-90-token answers that serving decodes with 96), and names its
    tasks in the run's benchmark build (seed and extra RL pools)."""
    from test_footguns import stored_run_checkpoint

    import umerl.data.tasks

    step = stored_run_checkpoint(tmp_path, tiny_model_dir, "data.benchmark_seed=3")
    seen = []
    real = umerl.data.tasks.recipe_tasks
    monkeypatch.setattr(umerl.data.tasks, "recipe_tasks",
                        lambda names, split, data, *a: seen.append(data) or real(
                            names, split, data, *a))
    out = tmp_path / "fitted.json"
    assert main(["route", "fit", str(step), str(mixed_task), "--out", str(out),
                 "--folds", "2"]) == 0
    assert Router.load(out).meta["max_new_tokens"] == 77
    assert seen[-1].benchmark_seed == 3
    assert dict(seen[-1].benchmark_rl_extra) == {"digits_cls": 880}
    assert main(["route", "fit", str(step), str(mixed_task), "--out", str(out), "--folds", "2",
                 "--max-new-tokens", "5"]) == 0  # an option still wins
    assert Router.load(out).meta["max_new_tokens"] == 5
