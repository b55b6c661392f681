"""The paper's reward ablation in miniature: GRPO with rank x margin (the built-in
``embedding``), rank only (``rank``) and margin only (``margin``), each beside the ``format``
reward, from the same SFT checkpoint, and a control: rank x margin shuffled within each group
(``bench/shuffled_reward.py``); then each result's gen scores on the test split.

    .venv/bin/python bench/bench_reward_ablation.py --checkpoint runs/cpu_tiny/sft \\
        [--out /tmp/umerl-reward-ablation] [--recipe recipes/cpu_tiny.yaml] [key=value ...]

Each variant is one ``umerl rl`` run (its own local Ray, the recipe's RL and eval settings,
the same seed: the variants differ only in their reward). The first run also evaluates the SFT
checkpoint (``eval.before``). Printed: per task and overall, the gen score after RL for each
variant; then for each variant its difference to the SFT checkpoint and to rank x margin, in
points with 95% paired bootstrap intervals over queries (``umerl.eval.compare``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# label -> (folder, the reward beside format): only the embedding part is ablated, as in the
# paper; "shuffled" is a control, rank x margin shuffled within each group
VARIANTS = {
    "rank x margin": ("embedding", "embedding"),
    "rank only": ("rank", "rank"),
    "margin only": ("margin", "margin"),
    "shuffled": ("shuffled", "'bench/shuffled_reward.py:shuffled_embedding'"),
}
MODE = "gen"


def run_variant(args: argparse.Namespace, checkpoint: Path, label: str, folder: str,
                reward: str, evaluate_start: bool) -> Path:
    """One ``umerl rl`` run into its own folder (replaced); returns that folder."""
    out = Path(args.out) / folder
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = [
        sys.executable, "-m", "umerl.cli", "rl", str(args.recipe), "--checkpoint",
        str(checkpoint), f"output_dir={out}",
        f"rewards=[{{name: format, weight: 1.0}}, {{name: {reward}, weight: 1.0}}]",
        f"eval.before={'true' if evaluate_start else 'false'}", *args.overrides,
    ]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)  # each variant on its own local Ray
    start = time.perf_counter()
    with open(out / "run.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (out / "run.log").read_text(encoding="utf-8").splitlines()[-20:]
        raise SystemExit(f"{label}: umerl rl failed (exit {proc.returncode}); log "
                         f"{out / 'run.log'}:\n" + "\n".join(tail))
    print(f"[ablation] {label} ({reward}): RL + evaluation in {seconds:.0f} s, {out}",
          flush=True)
    return out


def read_summary(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _cell(entry: dict) -> str:
    return (f"{100 * entry['diff']:+.1f} [{100 * entry['low']:+.1f}, "
            f"{100 * entry['high']:+.1f}]")


def report(sft: dict, after: dict[str, dict], resamples: int, seed: int) -> str:
    from umerl.eval.compare import compare
    from umerl.eval.metrics import format_table

    labels = list(after)
    tasks = list(sft["tasks"])
    scores = [{"task": t, "sft": sft["tasks"][t]["scores"][MODE],
               **{label: after[label]["tasks"][t]["scores"][MODE] for label in labels}}
              for t in tasks]
    scores.append({"task": "overall", "sft": sft["modes"][MODE]["overall"],
                   **{label: after[label]["modes"][MODE]["overall"] for label in labels}})
    reference = labels[0]
    rows = []
    for label in labels:
        vs_sft = compare(sft, after[label], resamples=resamples, seed=seed)["overall"][MODE]
        row = {"variant": label, "gen after RL": after[label]["modes"][MODE]["overall"],
               "rl - sft": _cell(vs_sft), f"- {reference}": "-"}
        if label != reference:
            vs_ref = compare(after[reference], after[label], resamples=resamples, seed=seed)
            row[f"- {reference}"] = _cell(vs_ref["overall"][MODE])
        rows.append(row)
    return "\n".join([
        f"{MODE} score per task after RL (headline metric, %):",
        format_table(scores, ["task", "sft", *labels]),
        "",
        f"overall {MODE}, points [95% paired bootstrap interval over queries, {resamples} "
        "resamples]:",
        format_table(rows, ["variant", "gen after RL", "rl - sft", f"- {reference}"]),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="the SFT checkpoint (a step folder or a run's sft/ root)")
    parser.add_argument("--out", default="/tmp/umerl-reward-ablation")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "cpu_tiny.yaml"))
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    args = parser.parse_args()

    from umerl.train import checkpoint as ckpt

    start = Path(args.checkpoint).resolve()
    checkpoint = ckpt.latest(start) or start
    print(f"[ablation] from {checkpoint}", flush=True)
    after: dict[str, dict] = {}
    sft: dict | None = None
    for n, (label, (folder, reward)) in enumerate(VARIANTS.items()):
        out = run_variant(args, checkpoint, label, folder, reward, evaluate_start=n == 0)
        if n == 0:
            sft = read_summary(out / "eval" / "before" / "summary.json")
        after[label] = read_summary(out / "eval" / "rl" / "summary.json")
    print()
    print(report(sft, after, args.resamples, args.seed))


if __name__ == "__main__":
    main()
