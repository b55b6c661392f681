"""The ``umerl`` command.

    umerl train RECIPE [key=value ...]      a recipe's job: evaluate, SFT, GRPO, evaluate again
    umerl rl RECIPE --checkpoint CKPT       the GRPO stage alone, from an SFT checkpoint
    umerl eval CHECKPOINT TASK ... [opts]   MMEB-style evaluation of a checkpoint
    umerl eval CHECKPOINT --mmeb-v2 DIR     MMEB-V2 from a local copy (VLM2Vec's score files)
    umerl compare A B                       paired difference of two evaluations, with intervals
    umerl plot RUN_DIR                      PNG plots of a run's metrics and evaluations
    umerl annotate PAIRS --teacher M --out F  cold-start SFT data from a teacher model
    umerl build-tiny OUT [--family F]       build the tiny offline Qwen-VL model
    umerl build-benchmark [--out DIR]       build the bundled mini benchmark
    umerl serve CHECKPOINT [--router R]     the embedding service (Ray Serve, HTTP)
    umerl route fit CHECKPOINT TASK ... --out R  fit the disc/gen router for mode auto
    umerl check RECIPE [key=value ...]      schema, preflight and each reward called once; no Ray
    umerl config show RECIPE [key=value ...]  the merged config, each key with its source
    umerl recipes                           the bundled recipes and what each is for
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from umerl.config.origins import ConfigError
from umerl.config.recipe import defaults, load_recipe, load_recipe_with_sources
from umerl.runtime.run_lock import FolderLocked, run_lock

if TYPE_CHECKING:
    from umerl.eval.evaluate import EvalSettings


def _offline_env() -> None:
    # Weights and data never come from a hub at run time; wandb stays offline unless asked.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cwd_importable() -> None:
    # `python -m umerl.cli` puts the working directory on sys.path, the `umerl` console script
    # does not: a `package.module:attr` reward imports from there under both (Ray's workers
    # get the driver's working directory on their path too).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def main(argv: Sequence[str] | None = None) -> int:
    _offline_env()
    _cwd_importable()
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
    from umerl.runtime.remote import StageError

    try:
        return args.handler(args)
    except (ConfigError, ValueError, FileNotFoundError, FolderLocked) as err:  # DataError, ...
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
    parser.add_argument("--version", action="version", version=f"umerl {_version()}")
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
    ev.add_argument("tasks", nargs="*",
                    help="umerl-mini, a bundled task name, tasks.json, or task .jsonl files "
                    "(none with --mmeb-v2)")
    _options(ev, EVAL_OPTIONS)
    ev.add_argument("--recipe", default=None, help=EVAL_RECIPE_HELP)
    ev.add_argument("--out", default=None, help="output folder (default runs/eval-<time>)")
    ev.add_argument("--pool", default="local", choices=["local", "global"],
                    help="pool type for plain .jsonl task files")
    ev.add_argument("--modality", default="image", help="modality for plain .jsonl task files")
    ev.add_argument("--router", default=None,
                    help="router file (umerl route fit) for mode auto; implies --modes auto")
    ev.add_argument("--mmeb-v2", default=None, metavar="DIR",
                    help="evaluate on MMEB-V2 from a local copy in DIR (docs/mmeb-v2.md)")
    ev.add_argument("--modalities", nargs="+", default=None,
                    help="with --mmeb-v2: image, video and/or visdoc (default: all three)")
    ev.add_argument("--tasks", dest="mmeb_tasks", nargs="+", default=None,
                    help="with --mmeb-v2: only these tasks (e.g. ImageNet-1K MSR-VTT)")
    ev.add_argument("--chunk-size", type=int, default=256,
                    help="with --mmeb-v2: inputs embedded and cached per chunk (default: 256)")
    ev.set_defaults(handler=_cmd_eval)

    cmp_ = sub.add_parser("compare", help="paired difference of two evaluations (B - A) per "
                          "task and overall, with 95%% bootstrap intervals over queries")
    cmp_.add_argument("a", help="summary.json of evaluation A (or its folder)")
    cmp_.add_argument("b", help="summary.json of evaluation B (or its folder)")
    cmp_.add_argument("--resamples", type=int, default=2000)
    cmp_.add_argument("--seed", type=int, default=0)
    cmp_.set_defaults(handler=_cmd_compare)

    plot = sub.add_parser("plot", help="PNG plots of a run's step metrics and evaluations "
                          "into RUN_DIR/plots/")
    plot.add_argument("run_dir", help="a run's output_dir")
    plot.add_argument("--eval-dir", default=None,
                      help="where its evaluations are (default: RUN_DIR/eval)")
    plot.set_defaults(handler=_cmd_plot)

    ann = sub.add_parser("annotate", help="write cold-start SFT data with a teacher model "
                         "(in this process, on CPU in float32)")
    ann.add_argument("pairs", help="RL-pair JSONL (query/target sides, no completions)")
    ann.add_argument("--teacher", required=True, help="Hugging Face folder of the teacher")
    ann.add_argument("--gguf-file", default=None, help="GGUF file inside --teacher")
    ann.add_argument("--out", required=True, help="SFT JSONL to write")
    ann.add_argument("--limit", type=int, default=None, help="annotate only the first N pairs")
    ann.add_argument("--media-root", default=None)
    _options(ann, ANNOTATE_OPTIONS)
    ann.set_defaults(handler=_cmd_annotate)

    pl = sub.add_parser("plan", help="per-GPU memory estimate of a recipe's learners and "
                        "rollout engines (exit 3 when a GPU does not fit)")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys")
    pl.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    pl.add_argument("--model-config", default=None, help="the model's config.json (or its "
                    "folder) when model.path is not on this machine")
    pl.add_argument("--model", default=None, help="built-in shapes: qwen2-vl-2b, qwen2-vl-7b")
    pl.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt "
                    "(default: one model.max_pixels image + 256 text tokens)")
    pl.set_defaults(handler=_cmd_plan)

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
    _serve_parsers(sub)
    _recipe_parsers(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("umerl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _recipe_parsers(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser("check", help="check a recipe without running it: schema, preflight "
                           "(checkpoint, data, tasks) and each reward called once on a small "
                           "synthetic step; with --address also the cluster (exit 2 on a problem)")
    check.add_argument("recipe")
    check.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys")
    check.add_argument("--address", default=None,
                       help="also check this Ray cluster's resources and output_dir (joins it; "
                       "without it Ray is not started)")
    check.set_defaults(handler=_cmd_check)

    config = sub.add_parser("config", help="recipe configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the merged config (defaults, includes, "
                                 "recipe, overrides), each key with its source file:line")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys")
    show.set_defaults(handler=_cmd_config_show)

    recipes = sub.add_parser("recipes", help="list the bundled recipes with their purpose")
    recipes.set_defaults(handler=_cmd_recipes)


def _serve_parsers(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="serve disc, gen and auto embeddings over HTTP (Ray "
                         "Serve; serve.* keys)")
    srv.add_argument("checkpoint", help="Hugging Face checkpoint folder (or a run's root)")
    srv.add_argument("overrides", nargs="*", help="key=value overrides, e.g. serve.port=8001")
    srv.add_argument("--router", default=None, help="router file (umerl route fit): enables "
                     "mode auto")
    srv.add_argument("--recipe", default=None, help=RECIPE_HELP.replace("eval.", "serve."))
    srv.add_argument("--print-config", action="store_true", help="print a Ray Serve config "
                     "for `serve deploy` (on a running Ray cluster) instead of serving")
    srv.set_defaults(handler=_cmd_serve)

    route = sub.add_parser("route", help="the router of mode auto")
    route_sub = route.add_subparsers(dest="route_command", required=True)
    fit = route_sub.add_parser("fit", help="fit a router on per-query disc and gen outcomes "
                               "of a training split")
    fit.add_argument("checkpoint", help="Hugging Face checkpoint folder (or a run's root)")
    fit.add_argument("tasks", nargs="+",
                     help="umerl-mini, a bundled task name, tasks.json, or task .jsonl files")
    fit.add_argument("--out", required=True, help="router file to write (JSON)")
    fit.add_argument("--pool", default="local", choices=["local", "global"],
                     help="pool type for plain .jsonl task files")
    fit.add_argument("--modality", default="image", help="modality for plain .jsonl task files")
    _options(fit, ROUTE_OPTIONS)
    fit.add_argument("--recipe", default=None, help=EVAL_RECIPE_HELP)
    fit.set_defaults(handler=_cmd_route_fit)


RECIPE_HELP = ("take the decoding settings (eval.max_new_tokens, temperature, top_k, "
               "model.dtype) from this recipe; default: those stored in the checkpoint by its "
               "run (options and key=value still override)")
EVAL_RECIPE_HELP = RECIPE_HELP.replace(") from", ") and the bundled benchmark's build "
                                       "(data.benchmark_seed, benchmark_rl_extra) from")

# CLI options that set recipe keys: (flag, key, argparse kwargs). Their defaults come from
# umerl/config/defaults.yaml and their values go through the recipe schema, like any recipe key.
EVAL_OPTIONS = [
    ("--split", "eval.split", {}),
    ("--modes", "eval.modes", {"nargs": "+", "help": "query:target mode pairs (disc or gen)"}),
    ("--pass-k", "eval.pass_k", {"nargs": "*", "type": int,
                                 "help": "the k of pass@k (max(k) samples per query); a bare "
                                 "--pass-k, with no values, turns pass@k off"}),
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
    ("--gpus", "eval.gpus_per_worker",
     {"type": float, "help": "> 0: the model work runs in a Ray task with this many GPUs "
      "(joins RAY_ADDRESS, else starts a local Ray)"}),
]
ROUTE_OPTIONS = [
    ("--split", "serve.route.split", {"help": "the training split (never the test split)"}),
    ("--folds", "serve.route.folds", {"type": int}),
    ("--batch-size", "eval.batch_size", {"type": int}),
    ("--max-new-tokens", "eval.max_new_tokens",
     {"type": int, "help": "greedy budget of the gen outcomes (default: the checkpoint's, as "
                          "eval and serve use)"}),
    ("--seed", "seed", {"type": int}),
    ("--dtype", "model.dtype", {}),
    ("--skip-invalid", "data.skip_invalid", {"action": "store_const", "const": True}),
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


def _options_config(args: argparse.Namespace, options: list,
                    base: tuple[list[str], dict[str, str]] = ([], {})) -> DictConfig:
    """The defaults with ``base`` (overrides and their sources: a checkpoint's decoding
    settings) and then the given options applied, checked by the recipe schema."""
    overrides, named = list(base[0]), dict(base[1])
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
    from umerl.config.stored import BENCHMARK, DECODING, decoding_from, unstored_note
    from umerl.data.tasks import recipe_tasks
    from umerl.eval.runner import eval_settings, run_eval, run_eval_work
    from umerl.model.loading import load_encoder, prompt_limit
    from umerl.preflight import check_checkpoint, check_eval_specs
    from umerl.runtime.console import quiet
    from umerl.train.checkpoint import stored_recipe

    quiet()
    auto = _take_auto(args)
    checkpoint = check_checkpoint(args.checkpoint, "CHECKPOINT")
    run_recipe = stored_recipe(checkpoint)
    cfg = _options_config(args, EVAL_OPTIONS, decoding_from(
        run_recipe, str(checkpoint), args.recipe, DECODING + BENCHMARK))
    if run_recipe is None and args.recipe is None:  # a Hub model: say what it decodes with
        print(unstored_note(str(checkpoint), cfg, DECODING), file=sys.stderr, flush=True)
    cfg.data.max_prompt_tokens = prompt_limit(cfg.data.max_prompt_tokens, checkpoint)
    # Absolute: with --gpus the work runs in a Ray worker, which may start in another folder.
    out = str(Path(args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}").resolve())
    if args.mmeb_v2 or args.modalities or args.mmeb_tasks:
        return _cmd_eval_mmeb_v2(args, cfg, checkpoint, out)
    if not args.tasks:
        raise ValueError("umerl eval needs TASK arguments, or --mmeb-v2 DIR")
    specs = recipe_tasks(args.tasks, cfg.eval.split, cfg.data, args.pool, args.modality)
    check_eval_specs(specs, load_encoder(checkpoint), cfg)
    specs = [dataclasses.replace(spec, path=spec.path.resolve()) for spec in specs]
    settings = _routed_settings(eval_settings(cfg), args.router, auto)
    with run_lock(out):  # two evaluations never write into one folder
        run_eval_work(cfg, "eval", run_eval, str(checkpoint), specs, settings, out,
                      cfg.model.dtype)
    return 0


def _cmd_eval_mmeb_v2(args: argparse.Namespace, cfg: DictConfig, checkpoint: Path,
                      out: str) -> int:
    from umerl.eval.mmeb_v2 import select_tasks
    from umerl.eval.runner import eval_settings, run_eval_work, run_mmeb_v2_eval

    if not args.mmeb_v2:
        raise ValueError("--modalities and --tasks select MMEB-V2 tasks: they need --mmeb-v2 DIR")
    if args.tasks:
        raise ValueError(f"--mmeb-v2 reads its tasks from DIR; got TASK arguments {args.tasks}")
    tasks = select_tasks(args.modalities, args.mmeb_tasks)
    with run_lock(out):
        run_eval_work(cfg, "MMEB-V2", run_mmeb_v2_eval, str(checkpoint),
                      str(Path(args.mmeb_v2).resolve()), tasks, eval_settings(cfg), out,
                      cfg.model.dtype, chunk_size=args.chunk_size)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from umerl.eval.compare import compare, compare_table

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


def _cmd_plot(args: argparse.Namespace) -> int:
    from umerl.eval.plots import plot_run

    written = plot_run(args.run_dir, args.eval_dir)
    if not written:
        raise ValueError(f"{args.run_dir}: nothing to plot (no metrics/*.jsonl, no "
                         "eval/*/summary.json)")
    print("\n".join(str(p) for p in written))
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


def _cmd_plan(args: argparse.Namespace) -> int:
    from umerl.plan import run_plan

    return run_plan(args.recipe, list(args.overrides), args.gpu_memory, args.model_config,
                    args.model, args.prompt_tokens)


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    from umerl.model.tiny import build_tiny_model

    path = build_tiny_model(args.out, family=args.family, seed=args.seed, size=args.size)
    print(f"tiny {args.family} model written to {path}")
    return 0


def _take_auto(args: argparse.Namespace) -> bool:
    """Remove ``auto`` from ``--modes`` (it is no recipe mode: a recipe has no router) and
    say whether it was there; ``--modes auto`` alone leaves disc:disc and gen:gen."""
    modes = args.modes or []
    kept = [m for m in modes if m not in ("auto", "auto:auto")]
    if len(kept) == len(modes):
        return False
    args.modes = kept or ["disc:disc", "gen:gen"]
    return True


def _routed_settings(settings: EvalSettings, router: str | None, auto: bool) -> EvalSettings:
    """``--router`` adds mode auto; ``--modes auto`` without ``--router`` is an error."""
    from umerl.eval.evaluate import parse_modes

    if router is None:
        if auto:
            raise ValueError("--modes auto needs --router ROUTER (written by umerl route fit)")
        return settings
    if not Path(router).is_file():
        raise FileNotFoundError(f"--router {router}: no such file")
    modes = parse_modes([f"{q}:{t}" for q, t in settings.modes] + ["auto"])
    return dataclasses.replace(settings, modes=modes, router=str(Path(router).resolve()))


def _cmd_serve(args: argparse.Namespace) -> int:
    from umerl.config.stored import SERVE_DECODING, decoding_from, unstored_note
    from umerl.preflight import check_checkpoint
    from umerl.runtime.console import quiet
    from umerl.serve.service import run_service, serve_config
    from umerl.train.checkpoint import stored_recipe

    quiet()
    checkpoint = str(check_checkpoint(args.checkpoint, "CHECKPOINT"))
    run_recipe = stored_recipe(checkpoint)
    stored, named = decoding_from(run_recipe, checkpoint, args.recipe, SERVE_DECODING)
    overrides = [*stored, *args.overrides]
    cfg = load_recipe(None, overrides, option_sources=named)
    if run_recipe is None and args.recipe is None:  # stderr: --print-config's YAML is stdout
        print(unstored_note(checkpoint, cfg, SERVE_DECODING), file=sys.stderr, flush=True)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(serve_config(checkpoint, cfg, args.router, overrides),
                             sort_keys=False), end="")
        return 0
    run_service(checkpoint, cfg, args.router)
    return 0


def _cmd_route_fit(args: argparse.Namespace) -> int:
    from umerl.config.stored import BENCHMARK, DECODING, decoding_from, unstored_note
    from umerl.data.tasks import recipe_tasks
    from umerl.eval.router import describe
    from umerl.eval.runner import eval_settings, fit_router_on
    from umerl.model.loading import load_encoder, prompt_limit
    from umerl.preflight import check_checkpoint, check_eval_specs
    from umerl.runtime.console import quiet
    from umerl.train.checkpoint import stored_recipe

    quiet()
    checkpoint = check_checkpoint(args.checkpoint, "CHECKPOINT")
    # Decoded as `umerl eval` and `umerl serve` decode this checkpoint: the router learns
    # from the gen outcomes serving will have.
    run_recipe = stored_recipe(checkpoint)
    cfg = _options_config(args, ROUTE_OPTIONS, decoding_from(
        run_recipe, str(checkpoint), args.recipe, DECODING + BENCHMARK))
    if run_recipe is None and args.recipe is None:
        print(unstored_note(str(checkpoint), cfg, DECODING), file=sys.stderr, flush=True)
    cfg.data.max_prompt_tokens = prompt_limit(cfg.data.max_prompt_tokens, checkpoint)
    specs = recipe_tasks(args.tasks, cfg.serve.route.split, cfg.data, args.pool,
                         args.modality)
    check_eval_specs(specs, load_encoder(checkpoint), cfg)
    router = fit_router_on(checkpoint, specs, eval_settings(cfg), int(cfg.serve.route.folds),
                           cfg.model.dtype)
    print(f"[route] {describe(router)}")
    print(f"[route] router written to {router.save(args.out)}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from umerl.check import check_recipe

    overrides, named = list(args.overrides), {}
    if args.address:
        overrides.append(f"ray.address={args.address}")
        named["ray.address"] = "option --address"
    check_recipe(*load_recipe_with_sources(args.recipe, overrides, named),
                 cluster=bool(args.address))
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from umerl.config.show import config_lines

    print("\n".join(config_lines(*load_recipe_with_sources(args.recipe, args.overrides))))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from umerl.config.show import bundled_recipes

    found = bundled_recipes()
    width = max(len(name) for name, _ in found)
    print("\n".join(f"{name:<{width}}  {purpose}" for name, purpose in found))
    return 0


def _cmd_build_benchmark(args: argparse.Namespace) -> int:
    from umerl.data.tasks import ensure_benchmark

    print(f"benchmark manifest: {ensure_benchmark(args.out, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
