"""Issue 29's silent footguns, each now loud: every test here failed on the code before it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import umerl.driver
from umerl.cli import main
from umerl.config.origins import ConfigError, Sources
from umerl.config.recipe import RECIPES_DIR, load_recipe, load_recipe_with_sources
from umerl.train import checkpoint as ckpt

TINY = str(RECIPES_DIR / "cpu_tiny.yaml")


class RayStarted(Exception):
    """init_ray was reached: everything before the cluster passed."""


def no_ray(*_args, **_kwargs):
    raise RayStarted()


@pytest.fixture
def run_args(tiny_model_dir, benchmark_manifest, tmp_path, monkeypatch) -> list[str]:
    monkeypatch.setattr(umerl.driver, "init_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}",
            f"data.benchmark_dir={benchmark_manifest.parent}",
            "data.benchmark_rl_extra.digits_cls=0"]


def fake_checkpoint(root: Path, step: int, stage: str, source: Path,
                    recipe: dict | None = None) -> Path:
    """A complete checkpoint (the tiny model's files, a manifest with hashes) at ``step``."""
    staging = ckpt.begin(root, step)
    for file in source.iterdir():
        if file.is_file():
            shutil.copy(file, staging / file.name)
    return ckpt.commit(root, step, stage, {"recipe": recipe} if recipe else None)


# --- a GPU recipe without its data --------------------------------------------------------

@pytest.mark.parametrize(("name", "key"), [("qwen2vl_2b_sft.yaml", "sft.data"),
                                           ("qwen2vl_7b_grpo.yaml", "rl.data")])
def test_a_gpu_recipe_without_data_is_an_error_naming_the_key(name, key, tmp_path, capsys,
                                                              monkeypatch) -> None:
    monkeypatch.setattr(umerl.driver, "init_ray", no_ray)
    assert main(["train", str(RECIPES_DIR / name), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"'{key}' (from {RECIPES_DIR / 'base'}" in err
    assert f"no data given for a stage on GPUs: set {key}=[" in err and "[umerl-mini]" in err


def test_the_bundled_benchmark_by_name_on_gpus(benchmark_manifest) -> None:
    cfg, sources = load_recipe_with_sources(RECIPES_DIR / "qwen2vl_2b_train.yaml", [
        "sft.data=[umerl-mini]", "rl.data=[umerl-mini, extra.jsonl]",
        f"data.benchmark_dir={benchmark_manifest.parent}"])
    cfg = umerl.driver.absolute_paths(cfg, sources)
    tasks = json.loads(benchmark_manifest.read_text())["tasks"]
    assert cfg.sft.data == [str(benchmark_manifest.parent / t["sft"]) for t in tasks]
    assert cfg.rl.data == [str(benchmark_manifest.parent / t["rl_pairs"]) for t in tasks] + [
        str(Path("extra.jsonl").resolve())]
    assert len(tasks) > 1 and all(Path(p).is_file() for p in cfg.sft.data)


def test_one_bundled_task_by_name(benchmark_manifest) -> None:
    """rl.data=[umerl-mini/<task>] is that task's rl split alone; an unknown task names the key
    and the bundled tasks."""
    cfg, sources = load_recipe_with_sources(None, [
        "rl.enabled=true", "rl.data=[umerl-mini/digits_cls]",
        f"data.benchmark_dir={benchmark_manifest.parent}"])
    cfg = umerl.driver.absolute_paths(cfg, sources)
    assert cfg.rl.data == [str(benchmark_manifest.parent / "digits_cls" / "rl_pairs.jsonl")]
    cfg, sources = load_recipe_with_sources(None, [
        "rl.data=[umerl-mini/digits]", f"data.benchmark_dir={benchmark_manifest.parent}"])
    with pytest.raises(ConfigError, match=r"'rl.data'.*'umerl-mini/digits' names no bundled "
                       r"task \(known: digits_cls, "):
        umerl.driver.absolute_paths(cfg, sources)


# --- resume: nothing to do; another recipe ------------------------------------------------

def test_a_finished_run_with_fewer_steps_has_nothing_to_do(run_args, tmp_path, tiny_model_dir,
                                                           capsys) -> None:
    fake_checkpoint(tmp_path / "run" / "sft", 1000, "sft", tiny_model_dir)
    argv = ["train", TINY, *run_args, "rl.enabled=false", "sft.max_steps=100"]
    assert main(argv) == 0  # before: resumed at step 1000 of 100 and trained nothing, silently
    out = capsys.readouterr().out
    assert "[driver] nothing to do: sft: its checkpoint is at step 1000, sft.max_steps is 100 " \
           "(from command line 'sft.max_steps=100')" in out
    # RL not done yet: the run goes on (to the cluster, here stubbed out)
    with pytest.raises(RayStarted):
        main(["train", TINY, *run_args, "sft.max_steps=100"])


def test_a_rerun_with_sft_done_starts_no_sft_workers(run_args, tmp_path, tiny_model_dir,
                                                     monkeypatch) -> None:
    """SFT's checkpoint at or past sft.max_steps, RL not done: the rerun goes straight to RL
    from that checkpoint. (Before, it started the SFT stage's Ray Train workers, which loaded
    the model and optimizer state only to find nothing to train.)"""
    done = fake_checkpoint(tmp_path / "run" / "sft", 1000, "sft", tiny_model_dir)
    rl_starts = []

    def sft_stage(*_args):
        raise AssertionError("the SFT stage was started")

    def rl_stage(cfg, start, datasets=None):
        rl_starts.append(start)
        return done

    for name, stub in (("init_ray", lambda cfg: None), ("nodes_from_ray", lambda: []),
                       ("check_cluster", lambda *a: None),
                       ("check_shared_output_dir", lambda *a, **k: None),
                       ("run_sft_stage", sft_stage),
                       ("run_rl_stage", rl_stage)):
        monkeypatch.setattr(umerl.driver, name, stub)
    assert main(["train", TINY, *run_args, "sft.max_steps=100", "eval.enabled=false"]) == 0
    assert rl_starts == [str(done)]


def test_checkpoints_store_the_recipe_and_a_resume_refuses_another(tiny_model_dir, tmp_path):
    """A real SFT checkpoint records the run's recipe; a resume under another lr or data is
    refused, listing each difference, unless resume=force."""
    from umerl.preflight import check_resume
    from umerl.train import dist as udist
    from umerl.train.sft import SftRun

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({
        "id": str(i), "task": "toy", "query": {"text": f"q {i}", "completion":
            f"<think>r{i}</think><answer>a{i}</answer><gen_emb>"},
        "target": {"text": f"t {i}", "completion":
                   f"<think>r{i}</think><answer>a{i}</answer><gen_emb>"}}) + "\n"
        for i in range(8)))

    def config(*extra: str):
        return load_recipe(None, [f"output_dir={tmp_path / 'run'}", f"sft.data=['{data}']",
                                  "sft.enabled=true", "sft.max_steps=2", "sft.save_every=2",
                                  "sft.micro_batch_size=4", "sft.log_every=100",
                                  "wandb.mode=disabled", *extra])

    udist.init_single_process()
    SftRun(config(), str(tiny_model_dir)).train()
    stored = ckpt.stored_recipe(ckpt.latest(tmp_path / "run" / "sft"))
    assert stored is not None and stored["sft"]["lr"] == 1e-3 and stored["sft"]["max_steps"] == 2

    assert check_resume(config("sft.max_steps=4"), "sft", Sources()) == 2  # steps may grow
    other = tmp_path / "other.jsonl"
    with pytest.raises(ValueError) as err:
        check_resume(config("sft.lr=5e-4", f"sft.data=['{other}']"), "sft", Sources())
    message = str(err.value)
    assert "sft.lr: checkpoint 0.001, now 0.0005" in message
    assert f'sft.data: checkpoint ["{data}"], now ["{other}"]' in message
    assert "sft.resume=force" in message
    assert check_resume(config("sft.lr=5e-4", "sft.resume=force"), "sft", Sources()) == 2


# --- eval and serve decode as the run did --------------------------------------------------

def stored_run_checkpoint(tmp_path: Path, tiny: Path, *overrides: str) -> Path:
    recipe = load_recipe(TINY, ["eval.max_new_tokens=77", "eval.top_k=7", *overrides])
    from umerl.config.recipe import to_container

    return fake_checkpoint(tmp_path / "ckpt", 3, "rl", tiny, to_container(recipe))


def test_eval_reads_the_decoding_settings_stored_in_the_checkpoint(
        tiny_model_dir, benchmark_manifest, tmp_path, monkeypatch) -> None:
    import umerl.eval.runner

    step = stored_run_checkpoint(tmp_path, tiny_model_dir)
    seen = []
    monkeypatch.setattr(umerl.eval.runner, "run_eval_work",
                        lambda cfg, label, work, ckpt_, specs, settings, *a, **k:
                        seen.append((cfg, settings)))
    base = ["eval", str(step), "digits_cls", "--benchmark-dir", str(benchmark_manifest.parent),
            "--out", str(tmp_path / "e")]
    assert main(base) == 0
    cfg, settings = seen[-1]
    assert (settings.max_new_tokens, settings.top_k) == (77, 7)  # before: 32 and 50
    assert cfg.model.dtype == "float32"
    # the run's benchmark build (cpu_tiny's extra RL pools): bundled names resolve in the
    # folder the run used (before: the defaults', a second build)
    assert dict(cfg.data.benchmark_rl_extra) == {"digits_cls": 880}
    assert main([*base, "--recipe", TINY]) == 0
    assert (seen[-1][1].max_new_tokens, seen[-1][1].top_k) == (96, 50)  # cpu_tiny's own
    assert main([*base, "--max-new-tokens", "5"]) == 0
    assert seen[-1][1].max_new_tokens == 5


def test_serve_reads_the_decoding_settings_stored_in_the_checkpoint(
        tiny_model_dir, tmp_path, monkeypatch) -> None:
    import umerl.serve.service

    step = stored_run_checkpoint(tmp_path, tiny_model_dir)
    seen = []
    monkeypatch.setattr(umerl.serve.service, "run_service",
                        lambda checkpoint, cfg, router: seen.append(cfg))
    assert main(["serve", str(step)]) == 0
    assert (seen[-1].serve.max_new_tokens, seen[-1].serve.top_k) == (77, 7)
    assert main(["serve", str(step), "serve.max_new_tokens=9", "--recipe", TINY]) == 0
    assert (seen[-1].serve.max_new_tokens, seen[-1].serve.top_k) == (9, 50)


def test_a_checkpoint_without_a_stored_recipe_says_what_it_decodes_with(
        tiny_model_dir, benchmark_manifest, tmp_path, monkeypatch, capsys) -> None:
    """A downloaded model (no run recipe stored) is evaluated and served with umerl's defaults:
    not silently; a stored recipe or --recipe needs no such line."""
    import umerl.eval.runner
    import umerl.serve.service
    from umerl.config.stored import DECODING, unstored_note

    monkeypatch.setattr(umerl.eval.runner, "run_eval_work", lambda *a, **k: None)
    monkeypatch.setattr(umerl.serve.service, "run_service", lambda *a, **k: None)
    note = unstored_note(str(tiny_model_dir), load_recipe(None, ["eval.max_new_tokens=5"]),
                         DECODING)
    assert note == (f"[decoding] {tiny_model_dir} stores no run recipe: decoding with "
                    "eval.max_new_tokens 5, eval.temperature 1.0, eval.top_k 50, model.dtype "
                    "float32 (umerl's defaults, then any options); --recipe RECIPE decodes as "
                    "that recipe evaluates")
    tasks = ["digits_cls", "--benchmark-dir", str(benchmark_manifest.parent)]
    assert main(["eval", str(tiny_model_dir), *tasks, "--max-new-tokens", "5",
                 "--out", str(tmp_path / "e1")]) == 0
    assert note in capsys.readouterr().err  # before: nothing said
    assert main(["serve", str(tiny_model_dir)]) == 0
    assert "serve.max_new_tokens 32" in capsys.readouterr().err
    step = stored_run_checkpoint(tmp_path, tiny_model_dir)
    assert main(["eval", str(step), *tasks, "--out", str(tmp_path / "e2")]) == 0
    assert main(["eval", str(tiny_model_dir), *tasks, "--recipe", TINY,
                 "--out", str(tmp_path / "e3")]) == 0
    assert main(["serve", str(step)]) == 0
    assert "[decoding]" not in capsys.readouterr().err


# --- rewards ---------------------------------------------------------------------------------

def test_a_rewards_list_without_the_defaults_is_named_on_the_first_line(run_args, capsys):
    with pytest.raises(RayStarted):
        main(["train", TINY, *run_args, "rewards=[{name: format, weight: 2}]"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("[rewards] this run uses: format (weight 2); not the default embedding (a "
                     "rewards list replaces the defaults: list them too to keep them)")
    with pytest.raises(RayStarted):
        main(["train", TINY, *run_args])
    assert "[rewards]" not in capsys.readouterr().out


def test_reward_files_resolve_from_the_recipe_folder(tmp_path, monkeypatch) -> None:
    from umerl.preflight import check_rewards

    folder, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "mine.py").write_text("def short(ctx):\n    return [0.0] * ctx.num_rollouts\n")
    (folder / "recipe.yaml").write_text(
        "rl:\n  enabled: true\nrewards:\n  - {name: mine.py:short}\n")
    monkeypatch.chdir(elsewhere)
    cfg, sources = load_recipe_with_sources(folder / "recipe.yaml")
    assert check_rewards(cfg.rewards, sources).labels == ["short"]  # preflight
    resolved = umerl.driver.absolute_paths(cfg, sources)  # what the learners get
    assert resolved.rewards[0].name == f"{folder / 'mine.py'}:short"


def test_a_missing_reward_file_lists_each_place_tried_once(tmp_path, monkeypatch) -> None:
    from umerl.preflight import check_rewards

    (tmp_path / "recipe.yaml").write_text("rewards:\n  - {name: gone.py:fn}\n")
    monkeypatch.chdir(tmp_path)
    cfg, sources = load_recipe_with_sources("recipe.yaml")
    with pytest.raises(ValueError) as err:
        check_rewards(cfg.rewards, sources)
    assert str(err.value).count(str(tmp_path / "gone.py")) == 1, err.value


# --- a Hub id ------------------------------------------------------------------------------

def test_a_hub_id_says_how_to_download_it(run_args, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", TINY, *run_args, "model.path=Qwen/Qwen2-VL-2B-Instruct"]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint folder" in err
    assert "hf download Qwen/Qwen2-VL-2B-Instruct --local-dir models/Qwen2-VL-2B-Instruct" in err
    assert main(["eval", "Qwen/Qwen2-VL-7B-Instruct", "umerl-mini"]) == 2
    assert "hf download Qwen/Qwen2-VL-7B-Instruct" in capsys.readouterr().err
