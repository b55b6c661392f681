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
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from umerl.config import defaults, load_recipe, load_recipe_with_sources
from umerl.sources import ConfigError


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
    from umerl.driver import StageError

    try:
        return args.handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:  # DataError, CheckpointError
        print(f"umerl: error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"umerl: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("umerl: interrupted (checkpoints are atomic: the last one is intact)",
              file=sys.stderr)
        return 130


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
    ev.add_argument("checkpoint", help="Hugging Face checkpoint folder (or a run's checkpoint "
                    "root: its latest complete checkpoint)")
    ev.add_argument("tasks", nargs="+",
                    help="umerl-mini, a bundled task name, tasks.json, or task .jsonl files")
    _options(ev, EVAL_OPTIONS)
    ev.add_argument("--out", default=None, help="output folder (default runs/eval-<time>)")
    ev.add_argument("--pool", default="local", choices=["local", "global"],
                    help="pool type for plain .jsonl task files")
    ev.add_argument("--modality", default="image", help="modality for plain .jsonl task files")
    ev.set_defaults(handler=_cmd_eval)

    cmp_ = sub.add_parser("compare", help="paired difference of two evaluations (B - A) per "
                          "task and overall, with 95%% bootstrap intervals over queries")
    cmp_.add_argument("a", help="summary.json of evaluation A (or its folder)")
    cmp_.add_argument("b", help="summary.json of evaluation B (or its folder)")
    cmp_.add_argument("--resamples", type=int, default=2000)
    cmp_.add_argument("--seed", type=int, default=0)
    cmp_.set_defaults(handler=_cmd_compare)

    ann = sub.add_parser("annotate", help="write cold-start SFT data with a teacher model")
    ann.add_argument("pairs", help="RL-pair JSONL (query/target sides, no completions)")
    ann.add_argument("--teacher", required=True, help="Hugging Face folder of the teacher")
    ann.add_argument("--gguf-file", default=None, help="GGUF file inside --teacher")
    ann.add_argument("--out", required=True, help="SFT JSONL to write")
    ann.add_argument("--limit", type=int, default=None, help="annotate only the first N pairs")
    ann.add_argument("--media-root", default=None)
    _options(ann, ANNOTATE_OPTIONS)
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


# CLI options that set recipe keys: (flag, key, argparse kwargs). Their defaults come from
# umerl/defaults.yaml and their values go through the recipe schema, like any recipe key.
EVAL_OPTIONS = [
    ("--split", "eval.split", {}),
    ("--modes", "eval.modes", {"nargs": "+", "help": "query:target mode pairs (disc or gen)"}),
    ("--pass-k", "eval.pass_k", {"nargs": "*", "type": int}),
    ("--save-embeddings", "eval.save_embeddings", {"action": "store_const", "const": True}),
    ("--batch-size", "eval.batch_size", {"type": int}),
    ("--max-new-tokens", "eval.max_new_tokens", {"type": int}),
    ("--temperature", "eval.temperature", {"type": float}),
    ("--top-k", "eval.top_k", {"type": int}),
    ("--seed", "seed", {"type": int}),
    ("--dtype", "model.dtype", {}),
    ("--skip-invalid", "data.skip_invalid",
     {"action": "store_const", "const": True,
      "help": "skip (and count) malformed lines instead of stopping"}),
    ("--max-prompt-tokens", "data.max_prompt_tokens", {}),
    ("--benchmark-dir", "data.benchmark_dir", {}),
]
ANNOTATE_OPTIONS = [
    ("--max-new-tokens", "annotate.max_new_tokens", {"type": int}),
    ("--max-completion-tokens", "annotate.max_completion_tokens",
     {"type": int, "help": "drop pairs whose reasoning + summary are longer"}),
    ("--temperature", "annotate.temperature", {"type": float}),
    ("--top-k", "annotate.top_k", {"type": int}),
    ("--batch-size", "annotate.batch_size", {"type": int}),
    ("--seed", "seed", {"type": int}),
    ("--skip-invalid", "data.skip_invalid", {"action": "store_const", "const": True}),
]


def _options(parser: argparse.ArgumentParser, options: list) -> None:
    base = defaults()
    for flag, key, kwargs in options:
        default = OmegaConf.select(base, key)
        shown = list(default) if OmegaConf.is_list(default) else default
        helptext = kwargs.pop("help", "")
        parser.add_argument(flag, default=None, help=f"{helptext} (default: {shown}; recipe key "
                            f"{key})".lstrip(), **kwargs)


def _options_config(args: argparse.Namespace, options: list) -> DictConfig:
    """The defaults with the given options applied, checked by the recipe schema."""
    overrides, named = [], {}
    for flag, key, _ in options:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={_dotlist_value(value)}")
            named[key] = f"option {flag}"
    return load_recipe(None, overrides, option_sources=named)


def _dotlist_value(value: object) -> str:
    if isinstance(value, list):  # quoted items: "disc:disc" must stay one string
        return "[" + ",".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _cmd_eval(args: argparse.Namespace) -> int:
    from umerl.console import quiet
    from umerl.driver import eval_settings, run_eval
    from umerl.model import load_encoder, prompt_limit
    from umerl.preflight import check_checkpoint, check_eval_specs
    from umerl.tasks import resolve_tasks

    quiet()
    cfg = _options_config(args, EVAL_OPTIONS)
    checkpoint = check_checkpoint(args.checkpoint, "CHECKPOINT")
    cfg.data.max_prompt_tokens = prompt_limit(cfg.data.max_prompt_tokens, checkpoint)
    specs = resolve_tasks(args.tasks, cfg.eval.split, cfg.data.benchmark_dir,
                          pool=args.pool, modality=args.modality)
    check_eval_specs(specs, load_encoder(checkpoint), cfg)
    out = args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}"
    run_eval(checkpoint, specs, eval_settings(cfg), out, cfg.model.dtype)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from umerl.compare import compare, compare_table

    summaries = []
    for name in (args.a, args.b):
        path = Path(name)
        path = path / "summary.json" if path.is_dir() else path
        if not path.is_file():
            raise SystemExit(f"umerl: error: {name}: no summary.json there")
        summaries.append(json.loads(path.read_text(encoding="utf-8")))
    result = compare(*summaries, resamples=args.resamples, seed=args.seed)
    print(f"B - A, points, [95% bootstrap interval over queries, {args.resamples} resamples]")
    print(f"A: {args.a}\nB: {args.b}")
    print(compare_table(result))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from umerl.driver import train

    overrides, named = list(args.overrides), {}
    if args.address:
        overrides.append(f"ray.address={args.address}")
        named["ray.address"] = "option --address"
    train(*load_recipe_with_sources(args.recipe, overrides, named))
    return 0


def _cmd_rl(args: argparse.Namespace) -> int:
    from umerl.driver import train

    overrides = [*args.overrides, f"model.path={args.checkpoint}", "sft.enabled=false",
                 "rl.enabled=true"]
    named = {"model.path": "option --checkpoint"}
    if args.address:
        overrides.append(f"ray.address={args.address}")
        named["ray.address"] = "option --address"
    train(*load_recipe_with_sources(args.recipe, overrides, named))
    return 0


def _cmd_annotate(args: argparse.Namespace) -> int:
    from umerl.annotate import run_annotate

    cfg = _options_config(args, ANNOTATE_OPTIONS)
    for flag, key, _ in ANNOTATE_OPTIONS:
        setattr(args, flag.lstrip("-").replace("-", "_"), OmegaConf.select(cfg, key))
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
