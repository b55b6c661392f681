"""``umerl check``: a dry run that calls every reward once and never starts Ray."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import umerl.runtime.ray_start
from umerl.cli import main
from umerl.config.recipe import RECIPES_DIR

ROOT = RECIPES_DIR.parent
TINY = str(RECIPES_DIR / "cpu_tiny.yaml")


def no_ray(*_args, **_kwargs):
    raise AssertionError("Ray was started")


@pytest.fixture
def fast(tiny_model_dir, benchmark_manifest, tmp_path, monkeypatch) -> list[str]:
    """cpu_tiny with the session's tiny model and benchmark, in a fresh output_dir."""
    monkeypatch.setattr(umerl.runtime.ray_start, "init_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}",
            f"data.benchmark_dir={benchmark_manifest.parent}",
            "data.benchmark_rl_extra.digits_cls=0"]


def test_check_cpu_tiny_passes_in_seconds_without_ray(fast, capsys) -> None:
    start = time.perf_counter()
    assert main(["check", TINY, *fast]) == 0
    assert time.perf_counter() - start < 60
    out = capsys.readouterr().out
    assert "[check] ok: schema, checkpoint, data, 2 rewards called on a synthetic step" in out
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_a_reward_that_raises_fails_the_check_naming_it(fast, tmp_path, capsys) -> None:
    plugin = tmp_path / "judge.py"
    plugin.write_text("def judge(ctx):\n    raise RuntimeError('judge model not loaded')\n")
    rewards = f"rewards=[{{name: format}}, {{name: embedding}}, {{name: '{plugin}:judge'}}]"
    assert main(["check", TINY, *fast, rewards]) == 2
    err = capsys.readouterr().err
    assert "rewards[2] (from command line" in err
    assert f"reward '{plugin}:judge'" in err and "judge model not loaded" in err
    assert "synthetic step of 2 pairs x G=8" in err


def test_a_reward_with_the_wrong_shape_fails_the_check(fast, tmp_path, capsys) -> None:
    plugin = tmp_path / "short.py"
    plugin.write_text("def short(ctx):\n    return [0.0]\n")
    assert main(["check", TINY, *fast, f"rewards=[{{name: '{plugin}:short'}}]"]) == 2
    assert "returned 1 values at step 0, expected 32" in capsys.readouterr().err


def test_module_rewards_import_under_the_console_script(tiny_model_dir, benchmark_manifest,
                                                        tmp_path) -> None:
    """The ``umerl`` console script's sys.path has its own folder, not the working directory
    (unlike ``python -m umerl.cli``): a ``package.module:attr`` reward of the user's project
    did not import there."""
    project, bin_dir = tmp_path / "project", tmp_path / "bin"
    (project / "myrewards").mkdir(parents=True)
    bin_dir.mkdir()
    (project / "myrewards" / "__init__.py").write_text("")
    (project / "myrewards" / "short.py").write_text(
        "def brevity(ctx):\n    return [1.0 / (1 + len(c)) for c in ctx.completions]\n")
    script = bin_dir / "umerl"  # what pip writes for [project.scripts]
    script.write_text("import sys\nfrom umerl.cli import main\nsys.exit(main())\n")
    argv = [sys.executable, str(script), "check", TINY, f"output_dir={tmp_path / 'run'}",
            f"model.path={tiny_model_dir}", f"data.benchmark_dir={benchmark_manifest.parent}",
            "data.benchmark_rl_extra.digits_cls=0",
            "sft.enabled=false", "eval.enabled=false",
            "rewards=[{name: 'myrewards.short:brevity'}]"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path)}
    done = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 rewards called on a synthetic step" in done.stdout


def test_check_with_an_address_checks_the_cluster(fast, monkeypatch, capsys) -> None:
    """--address adds what only the live cluster can say: a cluster too small for the recipe
    fails the check (exit 2, naming the keys) before any run; one that fits passes."""
    import umerl.config.cluster as cluster

    joined: list[str] = []
    monkeypatch.setattr(umerl.runtime.ray_start, "init_ray",
                        lambda cfg: joined.append(cfg.ray.address))
    monkeypatch.setattr(cluster, "check_shared_output_dir", lambda *_a, **_k: None)
    monkeypatch.setattr(cluster, "nodes_from_ray", lambda: [{"CPU": 1.0}])
    assert main(["check", TINY, *fast, "--address", "127.0.0.1:6379"]) == 2
    assert joined == ["127.0.0.1:6379"]
    err = capsys.readouterr().err
    assert "needs 'sft.num_workers'" in err and "but the cluster has 1" in err, err
    monkeypatch.setattr(cluster, "nodes_from_ray", lambda: [{"CPU": 64.0}])
    assert main(["check", TINY, *fast, "--address", "127.0.0.1:6379"]) == 0
    assert "2 rewards called on a synthetic step, cluster (" in capsys.readouterr().out
