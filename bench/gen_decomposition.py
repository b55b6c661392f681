"""Where RL's change in gen scores comes from: the reasoning the model writes, or how it reads it.

    .venv/bin/python bench/gen_decomposition.py BEFORE AFTER [TASKS ...] [--max-new-tokens 96]

A gen embedding takes two steps: the model writes its reasoning (greedy), then its hidden
state at ``<gen_emb>`` over prompt + reasoning is the embedding. RL changes both. This scores
gen mode on the test split for the four pairings of *which checkpoint writes* the reasoning and
*which checkpoint reads* it (queries and candidates alike), and prints per task and overall,
with 95% paired bootstrap intervals (``umerl.eval.compare``), three differences from BEFORE:

- total: AFTER writes and reads, as ``umerl eval`` scores AFTER;
- text: BEFORE reads what AFTER wrote (only the reasoning changed);
- reader: AFTER reads what BEFORE wrote (only the embedding map changed).

A reader effect with the text fixed is drift that nothing in GRPO's loss holds in place: the
policy gradient moves the hidden states, and the reward only looks at them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollout.transformers_engine import TransformersEngine  # noqa: E402
from umerl.data.formats import Side  # noqa: E402
from umerl.data.tasks import resolve_tasks  # noqa: E402
from umerl.eval.compare import compare, compare_table  # noqa: E402
from umerl.eval.evaluate import EvalSettings, evaluate  # noqa: E402
from umerl.model.loading import load_policy  # noqa: E402
from umerl.model.sampling import RolloutEngine, SamplingParams  # noqa: E402


class Recording:
    """An engine that keeps every completion it generates, by side."""

    def __init__(self, engine: RolloutEngine):
        self.engine, self.written = engine, {}

    def generate(self, sides: Sequence[Side], n: int, sampling: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[list[int]]]:
        out = self.engine.generate(sides, n, sampling, seeds)
        self.written.update(zip(sides, out))
        return out


class Replay:
    """An engine that writes nothing: it returns what another model wrote for each side."""

    def __init__(self, written: dict[Side, list[list[int]]]):
        self.written = written

    def generate(self, sides: Sequence[Side], n: int, sampling: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[list[int]]]:
        return [self.written[side][:n] for side in sides]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("tasks", nargs="*", default=["umerl-mini"])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64, help="as the CPU recipe's "
                        "eval.batch_size, so the total column is the driver's RL - SFT")
    args = parser.parse_args()
    settings = EvalSettings(modes=(("gen", "gen"),), pass_k=(),
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    specs = resolve_tasks(args.tasks, "test", None)
    bundles = {name: load_policy(path) for name, path in
               (("before", args.before), ("after", args.after))}
    writers = {name: Recording(TransformersEngine(b, args.batch_size))
               for name, b in bundles.items()}
    summaries = {}
    for name, bundle in bundles.items():  # each model reads what it wrote itself
        summaries[name, name] = evaluate(bundle, writers[name], specs, settings)
    for reader, writer in (("before", "after"), ("after", "before")):
        summaries[reader, writer] = evaluate(bundles[reader], Replay(writers[writer].written),
                                             specs, settings)
    base = summaries["before", "before"]
    columns = {"total": summaries["after", "after"], "text": summaries["before", "after"],
               "reader": summaries["after", "before"]}
    merged = {"tasks": {}, "overall": {}}
    for column, summary in columns.items():
        result = compare(base, summary)
        for task, per in result["tasks"].items():
            merged["tasks"].setdefault(task, {})[column] = per["gen"]
        merged["overall"][column] = result["overall"]["gen"]
    print("\ngen scores (reader / writer):")
    for (reader, writer), summary in summaries.items():
        score = 100 * summary['modes']['gen']['overall']
        print(f"  {reader:>6} reads {writer:>6}'s reasoning: {score:.1f}")
    print("\nchange from BEFORE in points, 95% paired bootstrap interval:")
    print(compare_table(merged, list(columns)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
