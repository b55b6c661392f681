"""Common mistakes fail fast: exit status 2, one line naming the key or file:line, no traceback.

Every case runs the real ``umerl`` command in a subprocess. Recipe and data errors must be
found before Ray starts: ``RAY_TMPDIR`` points at an empty folder, and a started Ray would
leave a ``session_*`` folder there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "cpu_tiny.yaml")
COMPLETION = "<think>a short trace</think><answer>a word</answer><gen_emb>"


@pytest.fixture(scope="module")
def world(tiny_model_dir: Path, benchmark_manifest: Path, tmp_path_factory) -> dict:
    """A tiny model, the bundled benchmark and a folder of small files to break."""
    root = tmp_path_factory.mktemp("bad")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "red.png")
    Image.new("RGB", (48, 32), (10, 200, 10)).save(root / "wide.png")
    (root / "not_an_image.png").write_text("this is text, not a PNG\n")
    return {"model": str(tiny_model_dir), "bench": str(benchmark_manifest.parent), "root": root}


def base(world: dict, tmp_path: Path) -> list[str]:
    return [f"output_dir={tmp_path / 'out'}", f"model.path={world['model']}",
            f"data.benchmark_dir={world['bench']}",
            "data.benchmark_rl_extra.digits_cls=0", "wandb.mode=disabled"]


def umerl(*args: str) -> tuple[int, str, bool]:
    """Run the CLI; returns (exit status, stdout + stderr, whether a Ray session started)."""
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths are capped
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-m", "umerl.cli", *args], capture_output=True,
                              text=True, env=env, timeout=120, cwd=REPO)
        started = any(p.name.startswith("session") for p in Path(ray_tmp).rglob("*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return done.returncode, done.stdout + done.stderr, started


def assert_fails(args: list[str], pattern: str, ray: bool = False) -> str:
    code, output, started = umerl(*args)
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("umerl: error:")]
    assert len(errors) == 1, output
    assert re.search(pattern, errors[0]), errors[0]
    if not ray:
        assert not started, "a Ray session was started before the error"
    return errors[0]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def rl_pair(i: int, query: dict | None = None) -> dict:
    return {"id": f"p{i}", "task": "t", "query": query or {"text": f"query {i}"},
            "target": {"text": f"target {i}"}}


# -- recipes: types, ranges, rules between keys ------------------------------------------------

@pytest.mark.parametrize(("override", "pattern"), [
    ("rl.group_size=abc", r"'rl\.group_size' \(from command line 'rl\.group_size=abc'\): "
                          r"expected an integer, got 'abc'; allowed: an integer >= 2"),
    ("rl.group_size=0", r"'rl\.group_size' .*0 is below the minimum 2"),
    ("rl.pairs_per_step=3", r"'rl\.pairs_per_step' .* = 3 must be a multiple of "
                            r"'learner\.num_workers' \(from .*cpu_tiny\.yaml:\d+\) = 2"),
    ("rollout.num_workers=0", r"'rollout\.num_workers' .*0 is below the minimum 1"),
    ("rollout.tensor_parallel_size=2", r"tensor_parallel_size.* needs the vLLM engine"),
    ("learner.micro_batch_size=5", r"'learner\.micro_batch_size' .* = 5 must divide the 64"),
    ("eval.modes=[disc:gen:x]", r"'eval\.modes' .*entry \[0\]: 'disc:gen:x' is not allowed"),
    ("sft.lr=-0.1", r"'sft\.lr' .*-0\.1 is not > 0\.0"),
    ("model.dtype=float64", r"'model\.dtype' .*'float64' is not allowed; allowed: one of "
                            r"'float32'"),
    ("ray.object_store_memory=1000", r"'ray\.object_store_memory' .*below the minimum"),
])
def test_recipe_value_errors(override: str, pattern: str) -> None:
    assert_fails(["train", RECIPE, override], pattern)


def test_vllm_tensor_parallel_must_match_gpus_per_worker() -> None:
    assert_fails(["train", RECIPE, "rollout.engine=vllm", "rollout.gpus_per_worker=1",
                  "rollout.tensor_parallel_size=2"],
                 r"'rollout\.gpus_per_worker' .* = 1 must equal 'rollout\.tensor_parallel_size'")


def test_nothing_to_train_is_an_error() -> None:
    assert_fails(["train", RECIPE, "sft.train.llm=false", "sft.train.projector=false",
                  "sft.train.vision=false"], r"'sft\.train' .*nothing would train")


def test_recipe_file_errors_name_file_and_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 1\nrl:\n  group_size: 8\n  pairs_per_step: two\n")
    assert_fails(["train", str(recipe)],
                 rf"'rl\.pairs_per_step' \(from {re.escape(str(recipe))}:4\): expected an integer")
    recipe.write_text("seed: 1\nrl:\n  groupsize: 8\n")
    assert_fails(["train", str(recipe)], r"r\.yaml:3: unknown config key 'rl\.groupsize'")
    recipe.write_text("rl: [unclosed\n")
    assert_fails(["train", str(recipe)], r"r\.yaml: invalid YAML")
    assert_fails(["train", str(tmp_path / "none.yaml")], r"recipe file not found")


# -- preflight: rewards, checkpoints, output_dir, data ----------------------------------------

def test_unknown_reward_and_missing_reward_file(world, tmp_path: Path) -> None:
    args = ["train", RECIPE, *base(world, tmp_path)]
    assert_fails([*args, "rewards=[{name: nope}]"],
                 r"rewards\[0\]: reward 'nope' .*unknown reward: built-ins are answer, embedding, "
                 r"format, margin, rank;.*from command line")
    missing = tmp_path / "missing.py"
    assert_fails([*args, f"rewards=[{{name: '{missing}:fn'}}]"],
                 rf"rewards\[0\]: .*file not found \(tried {re.escape(str(missing))}\)")


def test_reward_plugin_that_cannot_load(world, tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text("import not_a_module_anywhere\n")
    args = ["train", RECIPE, *base(world, tmp_path)]
    assert_fails([*args, f"rewards=[{{name: '{plugin}:fn'}}]"],
                 r"import failed: ModuleNotFoundError")
    plugin.write_text("def fn(ctx, scale):\n    return [0.0] * ctx.num_rollouts\n")
    assert_fails([*args, f"rewards=[{{name: '{plugin}:fn', kwargs: {{scael: 2}}}}]"],
                 r"do not fit its signature")


def test_output_dir_not_writable(world, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"output_dir={blocker}/run"],
                 r"'output_dir' \(from command line.*\): cannot write to .*a_file/run")


def test_missing_data_file_is_named_by_key(world, tmp_path: Path) -> None:
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"sft.data=[{tmp_path}/nope.jsonl]"],
                 r"'sft\.data\[0\]' \(from command line.*\): data file not found: .*nope\.jsonl")


# -- one run per folder (issue 24): the train cases also name a missing data file, which the code
# before the fix reported instead (it checked neither) --------------------------------------

def hold(folder: Path) -> Path:
    """``folder`` with a lock held by this (live) test process."""
    import socket
    import time

    folder.mkdir()
    (folder / ".umerl.lock").write_text(json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
        "heartbeat": time.time()}))
    return folder


def test_a_second_run_on_a_held_output_dir(world, tmp_path: Path) -> None:
    out = hold(tmp_path / "out")
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"sft.data=[{tmp_path}/nope.jsonl]"],
                 rf"{re.escape(str(out))} is in use by another umerl run \(pid {os.getpid()} on ")


def test_an_evaluation_into_a_held_folder(world, tmp_path: Path) -> None:
    out = hold(tmp_path / "eval")
    assert_fails(["eval", world["model"], "digits_cls", "--benchmark-dir", world["bench"],
                  "--out", str(out)],
                 rf"{re.escape(str(out))} is in use by another umerl run \(pid {os.getpid()} on ")


def committed_checkpoint(world: dict, root: Path, step: int) -> Path:
    from umerl.train import checkpoint as ckpt

    staging = ckpt.begin(root, step)
    shutil.copytree(world["model"], staging, dirs_exist_ok=True)
    return ckpt.commit(root, step, "sft")


def test_a_fresh_run_into_another_runs_checkpoints(world, tmp_path: Path) -> None:
    committed_checkpoint(world, tmp_path / "out" / "sft", 40)
    assert_fails(["train", RECIPE, *base(world, tmp_path), "sft.resume=null",
                  f"sft.data=[{tmp_path}/nope.jsonl]"],
                 r"'sft\.resume' \(from command line.*\): sft\.resume=null starts fresh, but "
                 r".*/out/sft holds another run's checkpoints \(newest step_00000040\); set "
                 r"sft\.resume=auto to continue that run, or output_dir=")


def test_resuming_a_checkpoint_without_hashes(world, tmp_path: Path) -> None:
    """A checkpoint from before manifests recorded hashes: resume=auto stops in the preflight
    (resuming unpickles DeepSpeed state that nothing can check)."""
    done = committed_checkpoint(world, tmp_path / "out" / "sft", 40)
    manifest = json.loads((done / "umerl_checkpoint.json").read_text())
    manifest["files"] = {name: (done / name).stat().st_size for name in manifest["files"]}
    (done / "umerl_checkpoint.json").write_text(json.dumps(manifest))
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"sft.data=[{tmp_path}/nope.jsonl]"],
                 r"'sft\.resume' \(from .*\): .*step_00000040: its umerl_checkpoint\.json records "
                 r"no SHA-256 hashes")


def test_malformed_rl_line(world, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rl.jsonl", [rl_pair(0), '{"id": "p1", "task":', rl_pair(2)])
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"rl.data=[{data}]"],
                 rf"{re.escape(str(data))}:2: malformed JSON")


def test_sft_media_that_is_not_an_image(world, tmp_path: Path) -> None:
    bad = world["root"] / "not_an_image.png"
    pairs = [{"id": f"s{i}", "task": "t",
              "query": {"text": "q", "images": [str(world["root"] / "red.png")],
                        "completion": COMPLETION},
              "target": {"text": f"t{i}", "completion": COMPLETION}} for i in range(20)]
    pairs[6]["query"]["images"] = [str(bad)]
    data = write_jsonl(tmp_path / "sft.jsonl", pairs)
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"sft.data=[{data}]"],
                 r"sft\.jsonl:7: query: field 'images\[0\]': not a readable image: ")


def test_video_frames_of_different_sizes(world, tmp_path: Path) -> None:
    frames = [str(world["root"] / "red.png"), str(world["root"] / "wide.png")]
    data = write_jsonl(tmp_path / "rl.jsonl",
                       [rl_pair(0), rl_pair(1, {"text": "clip", "video": frames})])
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"rl.data=[{data}]"],
                 r"rl\.jsonl:2: .*video frame 1 is 48x32 but frame 0 is 32x32")


def test_overlong_query_is_a_data_error(world, tmp_path: Path) -> None:
    huge = " ".join(["word"] * 400_000)
    data = write_jsonl(tmp_path / "rl.jsonl", [rl_pair(0), rl_pair(1, {"text": huge})])
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"rl.data=[{data}]"],
                 r"rl\.jsonl:2: query prompt is \d+ tokens, over data\.max_prompt_tokens=4096")


def test_control_token_in_a_query_text_is_named_by_the_preflight(world, tmp_path: Path) -> None:
    """Without the check the processor fails later: "prompt has 2 <|image_pad|> but 1 media",
    naming no file, and takes its whole batch with it."""
    query = {"text": "what is <|image_pad|> here", "images": [str(world["root"] / "red.png")]}
    data = write_jsonl(tmp_path / "rl.jsonl", [rl_pair(0), rl_pair(1, query)])
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"rl.data=[{data}]"],
                 r"rl\.jsonl:2: query: field 'text' holds <\|image_pad\|>")


def test_too_few_pairs_for_a_step(world, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "rl.jsonl", [rl_pair(0), rl_pair(1)])
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"rl.data=[{data}]"],
                 r"rl\.pairs_per_step = 16 \(from .*cpu_tiny\.yaml:\d+\): no sub-dataset has 16")


def test_model_path_that_is_not_a_checkpoint(world, tmp_path: Path) -> None:
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"model.path={tmp_path}"],
                 r"'model\.path' \(from command line.*\): .*not a Hugging Face checkpoint")


def truncated_copy(model: str, where: Path) -> Path:
    copy = where / "truncated"
    shutil.copytree(model, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return copy


def test_truncated_weights(world, tmp_path: Path) -> None:
    copy = truncated_copy(world["model"], tmp_path)
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"model.path={copy}"],
                 r"model\.safetensors: truncated: \d+ bytes, its header needs \d+")
    assert_fails(["eval", str(copy), "digits_cls", "--benchmark-dir", world["bench"]],
                 r"CHECKPOINT: .*model\.safetensors: truncated")


def test_latest_pointing_nowhere(world, tmp_path: Path) -> None:
    root = tmp_path / "sft"
    root.mkdir()
    (root / "latest").write_text("step_00000050")
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"model.path={root}"],
                 r"no complete checkpoint here \('latest' names step_00000050, which does not "
                 r"exist\)")


def test_explicit_resume_of_an_incomplete_checkpoint(world, tmp_path: Path) -> None:
    partial = shutil.copytree(world["model"], tmp_path / "step_00000010")
    (partial / "umerl_checkpoint.json").write_text(json.dumps(
        {"step": 10, "files": {"model.safetensors": 1}}))
    assert_fails(["train", RECIPE, *base(world, tmp_path), f"sft.resume={partial}"],
                 r"'sft\.resume' .*incomplete checkpoint: model\.safetensors is \d+ bytes, "
                 r"the manifest says 1")


# -- umerl eval and annotate: options through the same schema, data named by file:line -------

def eval_task(world: dict, tmp_path: Path, image: str) -> Path:
    return write_jsonl(tmp_path / "task.jsonl", [
        {"qry_inst": "find", "qry_text": "red", "qry_img_path": str(world["root"] / "red.png"),
         "tgt_text": ["a", "b"]},
        {"qry_inst": "find", "qry_text": "x", "qry_img_path": image, "tgt_text": ["a", "b"]},
    ])


def test_eval_media_that_is_not_an_image(world, tmp_path: Path) -> None:
    task = eval_task(world, tmp_path, str(world["root"] / "not_an_image.png"))
    assert_fails(["eval", world["model"], str(task)],
                 r"task\.jsonl:2: field 'qry_img_path': not a readable image")


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|im_end|>"])
def test_eval_control_token_in_a_query_text(world, tmp_path: Path, token: str) -> None:
    task = eval_task(world, tmp_path, str(world["root"] / "red.png"))
    lines = task.read_text().splitlines()
    lines[1] = lines[1].replace('"qry_text": "x"', json.dumps({"qry_text": f"x {token} y"})[1:-1])
    task.write_text("\n".join(lines) + "\n")
    assert_fails(["eval", world["model"], str(task)],
                 rf"task\.jsonl:2: field 'qry_text' holds {re.escape(token)}")


def test_eval_non_utf8_line(world, tmp_path: Path) -> None:
    task = eval_task(world, tmp_path, str(world["root"] / "red.png"))
    task.write_bytes(task.read_bytes() + b'{"qry_text": "caf\xe9"}\n')
    assert_fails(["eval", world["model"], str(task)], r"task\.jsonl:3: not valid UTF-8")


@pytest.mark.parametrize(("options", "pattern"), [
    (["--batch-size", "0"], r"'eval\.batch_size' \(from option --batch-size\): 0 is below"),
    (["--modes", "disc:foo"], r"'eval\.modes' \(from option --modes\): entry \[0\]"),
    (["--dtype", "int8"], r"'model\.dtype' \(from option --dtype\)"),
    (["--max-prompt-tokens", "many"], r"'data\.max_prompt_tokens' \(from option "
                                      r"--max-prompt-tokens\)"),
])
def test_eval_options_are_checked_like_recipe_keys(world, options, pattern) -> None:
    assert_fails(["eval", world["model"], "digits_cls", "--benchmark-dir", world["bench"],
                  *options], pattern)


def test_eval_unknown_task(world) -> None:
    assert_fails(["eval", world["model"], "no_such_task", "--benchmark-dir", world["bench"]],
                 r"unknown task 'no_such_task'.*bundled tasks are: digits_cls")


def test_annotate_options_are_checked(world, tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [rl_pair(0)])
    assert_fails(["annotate", str(pairs), "--teacher", world["model"], "--out",
                  str(tmp_path / "o.jsonl"), "--temperature", "-1"],
                 r"'annotate\.temperature' \(from option --temperature\)")
