"""MMEB-V2-style evaluation: disc and gen modes, the oracle, and pass@k.

For each task: embed every query and every unique candidate in the modes asked for, rank each
query's pool (its own candidates for ``local`` tasks, all unique candidates for ``global`` ones)
by cosine similarity, and score with ``umerl.eval.metrics``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from umerl.data.formats import EvalQuery, Side, read_eval_queries
from umerl.data.tasks import TaskSpec
from umerl.eval import metrics
from umerl.eval.router import Router, RoutingData, fit_router, routed
from umerl.model.embed import disc_embeddings, gen_embeddings
from umerl.model.inputs import check_prompt_lengths
from umerl.model.loading import PolicyBundle
from umerl.model.sampling import RolloutEngine, SamplingParams
from umerl.runtime.console import Progress

MODES = ("disc", "gen")
# Mode "auto": a router (umerl.eval.router) picks disc or gen per query; a routed query is scored
# against the candidate index of its own mode, so auto needs disc:disc and gen:gen.
AUTO = ("auto", "auto")
SHARE_COLUMN = "auto->gen"  # the table column: share of queries auto sent to gen


@dataclass(frozen=True)
class EvalSettings:
    modes: tuple[tuple[str, str], ...] = (("disc", "disc"), ("gen", "gen"))
    pass_k: tuple[int, ...] = (1, 2, 4)
    batch_size: int = 16
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0
    save_embeddings: bool = False
    skip_invalid: bool = False
    # Longer prompts are data errors (or, with skip_invalid, skipped queries); None: no limit.
    max_prompt_tokens: int | None = None
    # The router file (`umerl route fit`) mode auto routes with.
    router: str | None = None
    # model.max_pixels: the largest image area the evaluated policy's processor takes (None:
    # the checkpoint's own), so a base checkpoint is evaluated on the images its run trains on.
    max_pixels: int | None = None


def parse_modes(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``["disc:disc", "gen:gen"]`` -> pairs of (query mode, target mode); ``auto`` (or
    ``auto:auto``) adds the routed mode and the disc:disc and gen:gen modes it routes between."""
    modes = []
    for item in items:
        if item in ("auto", "auto:auto"):
            modes += [m for m in (("disc", "disc"), ("gen", "gen"), AUTO) if m not in modes]
            continue
        parts = item.split(":")
        if len(parts) != 2 or any(p not in MODES for p in parts):
            raise ValueError(f"mode '{item}' must be query:target with each of {MODES}")
        if (parts[0], parts[1]) not in modes:
            modes.append((parts[0], parts[1]))
    if not modes:
        raise ValueError("at least one mode is needed")
    return tuple(modes)


def mode_name(mode: tuple[str, str]) -> str:
    return mode[0] if mode[0] == mode[1] else f"{mode[0]}->{mode[1]}"


@dataclass
class TaskPools:
    """A task's queries, its unique candidates, and each query's pool over them."""

    queries: list[Side]
    candidates: list[Side]
    pools: list[np.ndarray]  # per query: indices into candidates
    relevance: list[np.ndarray]  # per query: grade of each pool entry


def build_pools(items: Sequence[EvalQuery], pool: str) -> TaskPools:
    """Merge identical candidates (MMEB dedups by candidate name) and lay out each pool."""
    index: dict[str, int] = {}
    candidates: list[Side] = []
    per_query: list[dict[int, float]] = []
    for item in items:
        grades: dict[int, float] = {}
        for side, grade in zip(item.candidates, item.relevance):
            idx = index.setdefault(side.key(), len(candidates))
            if idx == len(candidates):
                candidates.append(side)
            grades[idx] = max(grades.get(idx, 0.0), grade)
        per_query.append(grades)
    pools, relevance = [], []
    everything = np.arange(len(candidates))
    for grades in per_query:
        members = everything if pool == "global" else np.array(list(grades))
        pools.append(members)
        relevance.append(np.array([grades.get(int(i), 0.0) for i in members]))
    return TaskPools([item.query for item in items], candidates, pools, relevance)


@dataclass
class TaskResult:
    spec: TaskSpec
    num_queries: int
    num_candidates: int
    per_mode: dict[str, dict[str, float]] = field(default_factory=dict)
    pass_at_k: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    per_query: dict[str, list[float]] = field(default_factory=dict)  # headline, per query
    routed_to_gen: int | None = None  # mode auto: how many queries the router sent to gen
    # What `umerl route fit` learns from: the queries and their disc embeddings (not saved).
    queries: list[Side] = field(default_factory=list, repr=False)
    query_disc: np.ndarray | None = field(default=None, repr=False)

    def headline(self, mode: str) -> float:
        return self.per_mode[mode][self.spec.metric]


class Evaluator:
    """Embeds with one policy and scores tasks; caches embeddings per task and mode."""

    def __init__(self, bundle: PolicyBundle, engine: RolloutEngine, settings: EvalSettings):
        self.bundle = bundle
        self.engine = engine
        self.settings = settings
        self.router = Router.load(settings.router) if settings.router else None

    def embed(self, sides: Sequence[Side], mode: str, label: str) -> tuple[np.ndarray, list]:
        """[N, d] embeddings in ``mode`` (gen: greedy decoding) and the completions written."""
        s = self.settings
        with tqdm(total=len(sides), desc=f"{label} [{mode}]", unit="input", leave=False,
                  disable=None) as bar:
            if mode == "disc":
                emb = disc_embeddings(self.bundle, sides, s.batch_size, progress=bar.update)
                return emb.numpy(), []
            greedy = SamplingParams(max_new_tokens=s.max_new_tokens, do_sample=False)
            out = gen_embeddings(
                self.bundle, self.engine, sides, 1, greedy, s.batch_size, progress=bar.update
            )
        return out.embeddings[:, 0].numpy(), [c[0] for c in out.completions]

    def sample_queries(self, sides: Sequence[Side], n: int, label: str) -> np.ndarray:
        """[N, n, d] sampled generative query embeddings for pass@k."""
        s = self.settings
        sampling = SamplingParams(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
            seed=s.seed,
        )
        with tqdm(total=len(sides), desc=f"{label} [gen x{n}]", unit="input", leave=False,
                  disable=None) as bar:
            out = gen_embeddings(
                self.bundle, self.engine, sides, n, sampling, s.batch_size, progress=bar.update
            )
        return out.embeddings.numpy()

    def run_task(self, spec: TaskSpec, out_dir: Path | None) -> TaskResult:
        start = time.perf_counter()
        items, report = read_eval_queries(spec.path, skip_invalid=self.settings.skip_invalid)
        skipped = list(report.skipped)
        if self.settings.max_prompt_tokens:
            items, too_long = check_prompt_lengths(self.bundle.encoder, items,
                                                   self.settings.max_prompt_tokens,
                                                   self.settings.skip_invalid)
            skipped += too_long
        if skipped:
            print(f"warning: {spec.path}: {len(items)} queries kept, {len(skipped)} skipped "
                  f"(first: {skipped[0]})", flush=True)
        pools = build_pools(items, spec.pool)
        result = TaskResult(spec, len(pools.queries), len(pools.candidates))
        query_emb, cand_emb, completions = self._embed_all(spec.name, pools)
        result.queries, result.query_disc = pools.queries, query_emb.get("disc")
        per_query = {}
        for mode in self._scored_modes():
            scores = [cand_emb[mode[1]][pool] @ q for q, pool in
                      zip(query_emb[mode[0]], pools.pools)]
            per_query[mode_name(mode)] = metrics.score_queries(scores, pools.relevance)
        oracle = _oracle(list(per_query.values())) if len(per_query) > 1 else None
        if AUTO in self.settings.modes:
            to_gen = self._router().route(pools.queries, query_emb["disc"])
            per_query["auto"] = routed(per_query, to_gen)
            result.routed_to_gen = int(to_gen.sum())
        if oracle is not None:
            per_query["oracle"] = oracle
        for name, values in per_query.items():
            result.per_mode[name] = metrics.mean_metrics(values)
            result.per_query[name] = [float(v) for v in values[spec.metric]]
        if self.settings.pass_k:
            per_query_pass = self._pass_at_k(spec.name, pools, cand_emb)
            result.pass_at_k = {key: float(np.mean(v)) for key, v in per_query_pass.items()}
            # per query too, so that `umerl compare` gives pass@k intervals as for the modes
            result.per_query.update({key: v.tolist() for key, v in per_query_pass.items()})
        result.seconds = time.perf_counter() - start
        if out_dir is not None:
            self._write_task(out_dir, spec, pools, result, query_emb, cand_emb, completions)
        return result

    def _scored_modes(self) -> list[tuple[str, str]]:
        """The modes embedded and scored directly (auto is derived from disc and gen)."""
        return [m for m in self.settings.modes if m != AUTO]

    def _router(self) -> Router:
        if self.router is None:
            raise ValueError("mode auto needs a router file: umerl eval --router ROUTER "
                             "(written by `umerl route fit`)")
        return self.router

    def _embed_all(self, label: str, pools: TaskPools) -> tuple[dict, dict, dict]:
        query_modes = sorted({m[0] for m in self._scored_modes()})
        target_modes = {m[1] for m in self._scored_modes()}
        if self.settings.pass_k:
            target_modes.add("gen")  # pass@k ranks sampled gen queries against gen targets
        query_emb, cand_emb, completions = {}, {}, {}
        for mode in query_modes:
            query_emb[mode], completions[f"query_{mode}"] = self.embed(
                pools.queries, mode, f"{label} queries"
            )
        for mode in sorted(target_modes):
            cand_emb[mode], completions[f"candidate_{mode}"] = self.embed(
                pools.candidates, mode, f"{label} candidates"
            )
        return query_emb, cand_emb, completions

    def _pass_at_k(self, label: str, pools: TaskPools, cand_emb: dict
                   ) -> dict[str, np.ndarray]:
        """``pass@k`` -> each query's unbiased estimate."""
        n = max(self.settings.pass_k)
        samples = self.sample_queries(pools.queries, n, f"{label} queries")
        correct = np.array([
            metrics.num_first_hits(samples[i] @ cand_emb["gen"][pool].T, rel)
            for i, (pool, rel) in enumerate(zip(pools.pools, pools.relevance))
        ])
        return {f"pass@{k}": metrics.pass_at_k_per_query(correct, n, k)
                for k in self.settings.pass_k}

    def _write_task(self, out_dir: Path, spec: TaskSpec, pools: TaskPools, result: TaskResult,
                    query_emb: dict, cand_emb: dict, completions: dict) -> None:
        for mode, values in result.per_mode.items():
            write_json(out_dir / mode / f"{spec.name}_score.json", values)
        if any(completions.values()):
            write_json(out_dir / "completions" / f"{spec.name}.json",
                        {k: v for k, v in completions.items() if v})
        if self.settings.save_embeddings:
            _save_embeddings(out_dir / "embeddings", spec.name, pools, query_emb, cand_emb)


def _oracle(per_query: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    best = per_query[0]
    for other in per_query[1:]:
        best = metrics.oracle(best, other)
    return best


def _save_embeddings(directory: Path, name: str, pools: TaskPools,
                     query_emb: dict, cand_emb: dict) -> None:
    """Everything needed to recompute the scores without the model."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"query_{m}": v for m, v in query_emb.items()}
    arrays.update({f"candidate_{m}": v for m, v in cand_emb.items()})
    np.savez(directory / f"{name}.npz", **arrays)
    write_json(directory / f"{name}.json", {
        "candidate_ids": [c.key() for c in pools.candidates],
        "pools": [p.tolist() for p in pools.pools],
        "relevance": [r.tolist() for r in pools.relevance],
    })


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def summarize(results: Sequence[TaskResult], settings: EvalSettings) -> dict[str, Any]:
    """Per task headline scores per mode, then per-modality and overall plain means."""
    modality = {r.spec.name: r.spec.modality for r in results}
    columns = list(results[0].per_mode) if results else []
    summary: dict[str, Any] = {"tasks": {}, "modes": {}}
    for r in results:
        summary["tasks"][r.spec.name] = {
            "modality": r.spec.modality, "pool": r.spec.pool, "metric": r.spec.metric,
            "num_queries": r.num_queries, "num_candidates": r.num_candidates,
            "scores": {mode: r.headline(mode) for mode in columns},
            "pass_at_k": r.pass_at_k, "seconds": round(r.seconds, 2),
            # the headline metric of every query, in file order: what `umerl compare` pairs
            "per_query": r.per_query,
        }
        if r.routed_to_gen is not None:
            summary["tasks"][r.spec.name]["auto_gen_share"] = r.routed_to_gen / r.num_queries
    if results and results[0].routed_to_gen is not None:
        summary["auto"] = _routing_summary(results, settings)
    for mode in columns:
        summary["modes"][mode] = metrics.summarize(
            {r.spec.name: r.headline(mode) for r in results}, modality
        )
    for key in results[0].pass_at_k if results else []:
        summary["modes"][key] = metrics.summarize(
            {r.spec.name: r.pass_at_k[key] for r in results}, modality
        )
    return summary


def _routing_summary(results: Sequence[TaskResult], settings: EvalSettings) -> dict[str, Any]:
    """How much of the input the router sent down the reasoning path, over all queries."""
    routed_total = sum(r.routed_to_gen or 0 for r in results)
    queries = sum(r.num_queries for r in results)
    return {"router": settings.router, "routed_to_gen": routed_total, "num_queries": queries,
            "gen_share": routed_total / queries}


def summary_table(summary: dict[str, Any]) -> str:
    """Tasks, then modality means, then the overall mean; one column per mode and pass@k."""
    columns = list(summary["modes"])
    rows = []
    for name, task in summary["tasks"].items():
        row: dict[str, object] = {"task": f"{name} ({task['modality']}, {task['metric']})"}
        row.update(task["scores"])
        row.update(task["pass_at_k"])
        row[SHARE_COLUMN] = task.get("auto_gen_share")
        rows.append(row)
    modalities = sorted({t["modality"] for t in summary["tasks"].values()})
    for modality in modalities:
        row = {"task": f"mean: {modality}"}
        row.update({c: summary["modes"][c]["per_modality"].get(modality) for c in columns})
        rows.append(row)
    rows.append({"task": "overall", **{c: summary["modes"][c]["overall"] for c in columns},
                 SHARE_COLUMN: summary.get("auto", {}).get("gen_share")})
    share = [SHARE_COLUMN] if "auto" in summary else []
    return metrics.format_table(rows, ["task", *columns, *share])


def evaluate(
    bundle: PolicyBundle,
    engine: RolloutEngine,
    specs: Sequence[TaskSpec],
    settings: EvalSettings,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate every task; write per-task score JSON and summary.json when out_dir is set."""
    torch.manual_seed(settings.seed)
    out = Path(out_dir) if out_dir is not None else None
    start = time.perf_counter()
    results = []
    progress = Progress(len(specs), "tasks")
    for i, spec in enumerate(specs, start=1):
        result = Evaluator(bundle, engine, settings).run_task(spec, out)
        results.append(result)
        print(f"[eval] {i}/{len(specs)} {spec.name}: {result.num_queries} queries, "
              f"{result.num_candidates} candidates, {result.seconds:.1f} s | "
              f"{progress.line(i)}", flush=True)
    summary = summarize(results, settings)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    if out is not None:
        write_json(out / "summary.json", summary)
    return summary


def comparison_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Headline score per task and mode for each labelled evaluation (e.g. before, sft, rl),
    side by side: one column per mode and label, in the order given."""
    labels = list(summaries)
    last = summaries[labels[-1]]
    modes = [m for m in last["modes"] if not m.startswith("pass@")
             and all(m in summaries[label]["modes"] for label in labels)]
    rows = []
    for name in last["tasks"]:
        row: dict[str, object] = {"task": name}
        for mode in modes:
            for label in labels:
                task = summaries[label]["tasks"].get(name, {})
                row[f"{mode} {label}"] = task.get("scores", {}).get(mode)
        rows.append(row)
    overall: dict[str, object] = {"task": "overall"}
    for mode in modes:
        for label in labels:
            overall[f"{mode} {label}"] = summaries[label]["modes"][mode]["overall"]
    rows.append(overall)
    columns = ["task"] + [f"{m} {label}" for m in modes for label in labels]
    return metrics.format_table(rows, columns)


def routing_data(results: Sequence[TaskResult]) -> RoutingData:
    """The fitting data from evaluated tasks (each scored in disc and gen mode)."""
    sides, disc, disc_scores, gen_scores, tasks = [], [], [], [], []
    for r in results:
        if r.query_disc is None or not {"disc", "gen"} <= set(r.per_query):
            raise ValueError(f"task {r.spec.name}: routing data needs disc:disc and gen:gen")
        sides += r.queries
        disc.append(r.query_disc)
        disc_scores += r.per_query["disc"]
        gen_scores += r.per_query["gen"]
        tasks += [r.spec.name] * len(r.queries)
    return RoutingData(sides, np.concatenate(disc), np.asarray(disc_scores),
                       np.asarray(gen_scores), tasks)


def fit_on_tasks(bundle: PolicyBundle, engine: RolloutEngine, specs: Sequence[TaskSpec],
                 settings: EvalSettings, folds: int = 5) -> Router:
    """Evaluate ``specs`` in disc and gen mode (no pass@k) and fit a router on the outcomes."""
    settings = replace(settings, modes=(("disc", "disc"), ("gen", "gen")), pass_k=(),
                       router=None, save_embeddings=False)
    results = []
    for i, spec in enumerate(specs, start=1):
        results.append(Evaluator(bundle, engine, settings).run_task(spec, None))
        print(f"[route] {i}/{len(specs)} {spec.name}: {results[-1].num_queries} queries, "
              f"disc {results[-1].headline('disc'):.3f}, gen {results[-1].headline('gen'):.3f}",
              flush=True)
    router = fit_router(routing_data(results), folds=folds, seed=settings.seed)
    router.meta.update({"max_new_tokens": settings.max_new_tokens,
                        "task_files": [str(s.path) for s in specs]})
    return router
