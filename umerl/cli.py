"""The ``umerl`` command.

    umerl train RECIPE [key=value ...]      a recipe's job: evaluate, SFT, GRPO, evaluate again
    umerl rl RECIPE --checkpoint CKPT       the GRPO stage alone, from an SFT checkpoint
    umerl eval CHECKPOINT TASK ... [opts]   MMEB-style evaluation of a checkpoint
    umerl annotate PAIRS --teacher M --out F  cold-start SFT data from a teacher model
    umerl build-tiny OUT [--family F]       build the tiny offline Qwen-VL model
    umerl build-benchmark [--out DIR]       build the bundled mini benchmark
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from umerl.config import ConfigError


def _offline_env() -> None:
    # Weights and data never come from a hub at run time; wandb stays offline unless asked.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    _offline_env()
    parser = _parser()
    # key=value overrides may come before or after options (argparse alone would refuse
    # "train RECIPE --address A key=value").
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    if not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")):
        # A local Ray binds to loopback only; read by Ray at import, so set before importing it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        return args.handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"umerl: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umerl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run a recipe: evaluate, SFT, GRPO, evaluate again")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys")
    train.add_argument("--address", default=None,
                       help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    train.set_defaults(handler=_cmd_train)

    rl = sub.add_parser("rl", help="run a recipe's GRPO stage from a given checkpoint")
    rl.add_argument("recipe")
    rl.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys")
    rl.add_argument("--checkpoint", required=True,
                    help="the SFT checkpoint: the starting policy and the KL reference")
    rl.add_argument("--address", default=None,
                    help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    rl.set_defaults(handler=_cmd_rl)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on MMEB-format tasks")
    ev.add_argument("checkpoint", help="Hugging Face checkpoint folder")
    ev.add_argument("tasks", nargs="+",
                    help="umerl-mini, a bundled task name, tasks.json, or task .jsonl files")
    ev.add_argument("--split", default="test")
    ev.add_argument("--modes", nargs="+", default=["disc:disc", "gen:gen"],
                    help="query:target mode pairs (disc or gen each)")
    ev.add_argument("--pass-k", nargs="*", type=int, default=[1, 2, 4])
    ev.add_argument("--out", default=None, help="output folder (default runs/eval-<time>)")
    ev.add_argument("--save-embeddings", action="store_true")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-k", type=int, default=50)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--dtype", default="float32")
    ev.add_argument("--skip-invalid", action="store_true",
                    help="skip (and count) malformed lines instead of stopping")
    ev.add_argument("--pool", default="local", choices=["local", "global"],
                    help="pool type for plain .jsonl task files")
    ev.add_argument("--modality", default="image", help="modality for plain .jsonl task files")
    ev.add_argument("--benchmark-dir", default=None)
    ev.set_defaults(handler=_cmd_eval)

    ann = sub.add_parser("annotate", help="write cold-start SFT data with a teacher model")
    ann.add_argument("pairs", help="RL-pair JSONL (query/target sides, no completions)")
    ann.add_argument("--teacher", required=True, help="Hugging Face folder of the teacher")
    ann.add_argument("--gguf-file", default=None, help="GGUF file inside --teacher")
    ann.add_argument("--out", required=True, help="SFT JSONL to write")
    ann.add_argument("--limit", type=int, default=None, help="annotate only the first N pairs")
    ann.add_argument("--max-new-tokens", type=int, default=96)
    ann.add_argument("--max-completion-tokens", type=int, default=256,
                     help="drop pairs whose reasoning + summary are longer")
    ann.add_argument("--temperature", type=float, default=0.7)
    ann.add_argument("--top-k", type=int, default=50)
    ann.add_argument("--batch-size", type=int, default=8)
    ann.add_argument("--seed", type=int, default=0)
    ann.add_argument("--media-root", default=None)
    ann.add_argument("--skip-invalid", action="store_true")
    ann.set_defaults(handler=_cmd_annotate)

    tiny = sub.add_parser("build-tiny", help="build the tiny offline model")
    tiny.add_argument("out")
    tiny.add_argument("--family", default="qwen2_vl")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--size", default="tiny", choices=["tiny", "small"])
    tiny.set_defaults(handler=_cmd_build_tiny)

    bench = sub.add_parser("build-benchmark", help="build the bundled mini benchmark")
    bench.add_argument("--out", default=None)
    bench.add_argument("--seed", type=int, default=0)
    bench.set_defaults(handler=_cmd_build_benchmark)
    return parser


def _cmd_eval(args: argparse.Namespace) -> int:
    from umerl.evaluate import EvalSettings, parse_modes
    from umerl.tasks import resolve_tasks

    settings = EvalSettings(
        modes=parse_modes(args.modes), pass_k=tuple(args.pass_k), batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        seed=args.seed, save_embeddings=args.save_embeddings, skip_invalid=args.skip_invalid,
    )
    specs = resolve_tasks(args.tasks, args.split, args.benchmark_dir,
                          pool=args.pool, modality=args.modality)
    out = args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}"
    run_eval(args.checkpoint, specs, settings, out, args.dtype)
    return 0


def run_eval(checkpoint: str | Path, specs, settings, out_dir: str | Path,
             dtype: str = "float32") -> dict:
    """Load, evaluate, write JSON, print the table; returns the summary."""
    from rollout.transformers_engine import TransformersEngine
    from umerl.evaluate import evaluate, summary_table
    from umerl.model import load_policy

    bundle = load_policy(checkpoint, dtype=dtype)
    summary = evaluate(bundle, TransformersEngine(bundle, settings.batch_size), specs, settings,
                       out_dir)
    print(f"\n{checkpoint} on {len(specs)} task(s), {summary['seconds']:.0f} s")
    print(summary_table(summary))
    print(f"scores: {Path(out_dir) / 'summary.json'}")
    return summary


def _cmd_train(args: argparse.Namespace) -> int:
    from umerl.config import load_recipe
    from umerl.driver import train

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    train(load_recipe(args.recipe, overrides))
    return 0


def _cmd_rl(args: argparse.Namespace) -> int:
    from umerl.config import load_recipe
    from umerl.driver import train

    overrides = [*args.overrides, f"model.path={args.checkpoint}", "sft.enabled=false",
                 "rl.enabled=true"]
    if args.address:
        overrides.append(f"ray.address={args.address}")
    train(load_recipe(args.recipe, overrides))
    return 0


def ensure_tiny_model(tiny_cfg) -> str:
    """Build the tiny model once; later runs reuse the folder."""
    from umerl.tiny import build_tiny_model

    out = Path(tiny_cfg.dir)
    if (out / "config.json").is_file():
        return str(out)
    print(f"building the tiny {tiny_cfg.family} model into {out} ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: an interrupted build leaves nothing.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build_tiny_model(staging, family=tiny_cfg.family, seed=tiny_cfg.seed,
                         size=tiny_cfg.size)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)


def _cmd_annotate(args: argparse.Namespace) -> int:
    from umerl.annotate import run_annotate

    run_annotate(args)
    return 0


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    from umerl.tiny import build_tiny_model

    path = build_tiny_model(args.out, family=args.family, seed=args.seed, size=args.size)
    print(f"tiny {args.family} model written to {path}")
    return 0


def _cmd_build_benchmark(args: argparse.Namespace) -> int:
    from umerl.tasks import ensure_benchmark

    print(f"benchmark manifest: {ensure_benchmark(args.out, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
