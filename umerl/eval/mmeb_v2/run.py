"""Evaluate a checkpoint on MMEB-V2 from a local copy; write the tree VLM2Vec's tools read.

    <out>/<mode>/<modality>/<Dataset>_score.json   VLM2Vec's metric keys (report_score_v2.py
                                                   reads <out>/<mode> as an experiment path)
    <out>/summary.json                             umerl's summary: per task, per modality and
                                                   overall plain means (``umerl compare`` reads it)
    <out>/tasks/<Dataset>.json                     a finished task's record (resume skips it)
    <out>/cache/<Dataset>/<side>_<mode>/           embeddings in chunks (resume picks up there)
    <out>/completions/<Dataset>.json               gen mode's completions

Tasks run one after another and each streams its inputs through the model in chunks of
``chunk_size``; every chunk is written as it is done, so an interrupted run loses at most one
chunk, and a finished task is never recomputed. Scoring is umerl's (``umerl.eval.metrics``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umerl.data.formats import Side
from umerl.data.tasks import TaskSpec
from umerl.eval import metrics
from umerl.eval.evaluate import (
    MODES,
    EvalSettings,
    Evaluator,
    TaskPools,
    TaskResult,
    mode_name,
    summarize,
    summary_table,
)
from umerl.eval.mmeb_v2.catalog import TaskInfo
from umerl.eval.mmeb_v2.loaders import load_task, task_pools
from umerl.runtime.console import Progress

CHUNK_SIZE = 256
# VLM2Vec's RankingMetrics keys, in its order; num_pred and num_data follow.
SCORE_KEYS = [f"{name}@{k}" for name in ("hit", "ndcg_linear", "ndcg_exponential", "precision",
                                         "recall", "f1", "map", "mrr") for k in metrics.DEFAULT_KS]

Embed = Callable[[Sequence[Side]], tuple[np.ndarray, list]]


class ChunkedEmbeddings:
    """One (task, side, mode)'s embeddings on disk, chunk by chunk.

    ``meta.json`` fingerprints what they are embeddings of (the checkpoint, the settings that
    change them, every input's identity in order); a mismatch starts the folder over, so a
    cache is never reused for other inputs or another model.
    """

    def __init__(self, directory: Path, identity: dict[str, Any], sides: Sequence[Side],
                 chunk_size: int):
        self.directory, self.sides, self.chunk_size = directory, sides, chunk_size
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        for side in sides:
            digest.update(side.key().encode() + b"\n")
        self.fingerprint = digest.hexdigest()

    def compute(self, embed: Embed, label: str) -> tuple[np.ndarray, list]:
        self._check_meta()
        chunks = range(0, len(self.sides), self.chunk_size)
        done = sum(self._chunk(i).is_file() for i in range(len(chunks)))
        progress = Progress(len(self.sides), "inputs", done=min(done * self.chunk_size,
                                                                   len(self.sides)))
        arrays, completions = [], []
        for index, start in enumerate(chunks):
            path = self._chunk(index)
            if not path.is_file():
                emb, texts = embed(self.sides[start:start + self.chunk_size])
                _atomic_json(path.with_suffix(".json"), texts)
                _atomic_npy(path, emb)
                end = min(start + self.chunk_size, len(self.sides))
                print(f"[mmeb-v2] {label}: {end}/{len(self.sides)} | {progress.line(end)}",
                      flush=True)
            arrays.append(np.load(path))
            completions.extend(json.loads(path.with_suffix(".json").read_text("utf-8")))
        return np.concatenate(arrays), completions

    def _chunk(self, index: int) -> Path:
        return self.directory / f"chunk-{index:06d}.npy"

    def _check_meta(self) -> None:
        meta = self.directory / "meta.json"
        wanted = {"fingerprint": self.fingerprint, "chunk_size": self.chunk_size,
                  "count": len(self.sides)}
        if meta.is_file() and json.loads(meta.read_text("utf-8")) == wanted:
            return
        if self.directory.exists():
            print(f"[mmeb-v2] {self.directory}: cached for other inputs or settings; "
                  "recomputing", flush=True)
            for stale in self.directory.iterdir():
                stale.unlink()
        _atomic_json(meta, wanted)


class MmebV2Evaluation:
    """Runs tasks with one policy, loaded only when a task still needs the model."""

    def __init__(self, checkpoint: str | Path, root: Path, settings: EvalSettings, out: Path,
                 load: Callable[[], Evaluator], chunk_size: int = CHUNK_SIZE):
        if not root.is_dir():
            raise FileNotFoundError(f"--mmeb-v2 {root}: no such folder")
        if chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {chunk_size}")
        for mode in settings.modes:
            if any(part not in MODES for part in mode):
                raise ValueError(f"mode '{mode_name(mode)}': MMEB-V2 evaluation scores the "
                                 f"query:target modes of {MODES} (and their oracle)")
        self.checkpoint, self.root, self.settings, self.out = str(checkpoint), root, settings, out
        self.load, self.chunk_size = load, chunk_size
        self.evaluator: Evaluator | None = None

    def mode_names(self) -> list[str]:
        names = [mode_name(m) for m in self.settings.modes]
        return names + ["oracle"] if len(names) > 1 else names

    def finished(self, info: TaskInfo) -> TaskResult | None:
        """The task's result from a previous run with these modes, when all its files exist."""
        record = self.out / "tasks" / f"{info.name}.json"
        if not record.is_file():
            return None
        data = json.loads(record.read_text("utf-8"))
        wanted_pass = [f"pass@{k}" for k in self.settings.pass_k]
        if list(data["per_mode"]) != self.mode_names() or list(data["pass_at_k"]) != wanted_pass:
            return None
        if not all(self._score_path(m, info).is_file() for m in data["per_mode"]):
            return None
        return TaskResult(_spec(self.root, info), data["num_queries"], data["num_candidates"],
                          data["per_mode"], data["pass_at_k"], data["seconds"],
                          data["per_query"])

    def run_task(self, info: TaskInfo) -> TaskResult:
        start = time.perf_counter()
        pools = task_pools(load_task(self.root, info))
        query_emb, cand_emb, completions = self._embed(info, pools)
        per_query = {}
        for mode in self.settings.modes:
            per_query[mode_name(mode)] = _score(query_emb[mode[0]], cand_emb[mode[1]], pools,
                                                info.pool)
        if len(per_query) > 1:
            best = list(per_query.values())
            per_query["oracle"] = best[0]
            for other in best[1:]:
                per_query["oracle"] = metrics.oracle(per_query["oracle"], other)
        result = TaskResult(_spec(self.root, info), len(pools.queries), len(pools.candidates))
        for name, values in per_query.items():
            result.per_mode[name] = metrics.mean_metrics(values)
            result.per_query[name] = [float(v) for v in values[info.metric]]
        if self.settings.pass_k:
            result.pass_at_k = self._pass_at_k(info, pools, cand_emb["gen"])
        result.seconds = time.perf_counter() - start
        self._write(info, result, completions)
        return result

    def _evaluator(self) -> Evaluator:
        if self.evaluator is None:
            self.evaluator = self.load()
        return self.evaluator

    def _cache(self, info: TaskInfo, name: str, sides: Sequence[Side],
               extra: dict[str, Any]) -> ChunkedEmbeddings:
        s = self.settings
        identity = {"checkpoint": self.checkpoint, "max_new_tokens": s.max_new_tokens,
                    "seed": s.seed, **extra}
        return ChunkedEmbeddings(self.out / "cache" / info.name / name, identity, sides,
                                 self.chunk_size)

    def _embed(self, info: TaskInfo, pools: TaskPools) -> tuple[dict, dict, dict]:
        query_modes = sorted({m[0] for m in self.settings.modes})
        target_modes = {m[1] for m in self.settings.modes}
        if self.settings.pass_k:
            target_modes.add("gen")  # pass@k ranks sampled gen queries against gen targets
        query_emb, cand_emb, completions = {}, {}, {}
        for side, modes, sides, store in (("query", query_modes, pools.queries, query_emb),
                                          ("candidate", sorted(target_modes), pools.candidates,
                                           cand_emb)):
            for mode in modes:
                label = f"{info.name} {side}s [{mode}]"
                cache = self._cache(info, f"{side}_{mode}", sides, {"mode": mode})
                store[mode], completions[f"{side}_{mode}"] = cache.compute(
                    lambda chunk, m=mode, lb=label: self._evaluator().embed(chunk, m, lb), label)
        return query_emb, cand_emb, completions

    def _pass_at_k(self, info: TaskInfo, pools: TaskPools,
                   cand_gen: np.ndarray) -> dict[str, float]:
        s = self.settings
        n = max(s.pass_k)
        label = f"{info.name} queries [gen x{n}]"
        cache = self._cache(info, f"query_gen_x{n}", pools.queries,
                            {"samples": n, "temperature": s.temperature, "top_k": s.top_k})
        samples, _ = cache.compute(
            lambda chunk: (self._evaluator().sample_queries(chunk, n, label), []), label)
        correct = np.array([
            metrics.num_first_hits(_candidate_scores(cand_gen, pool, info.pool, samples[i].T).T,
                                   rel)
            for i, (pool, rel) in enumerate(zip(pools.pools, pools.relevance))
        ])
        return {f"pass@{k}": metrics.pass_at_k(correct, n, k) for k in s.pass_k}

    def _score_path(self, mode: str, info: TaskInfo) -> Path:
        return self.out / mode / info.modality / f"{info.name}_score.json"

    def _write(self, info: TaskInfo, result: TaskResult, completions: dict) -> None:
        for mode, values in result.per_mode.items():
            _atomic_json(self._score_path(mode, info), vlm2vec_scores(values,
                                                                      result.num_queries))
        if any(completions.values()):
            _atomic_json(self.out / "completions" / f"{info.name}.json",
                         {k: v for k, v in completions.items() if v})
        # Last: its presence says the task is finished.
        _atomic_json(self.out / "tasks" / f"{info.name}.json", {
            "name": info.name, "modality": info.modality, "pool": info.pool,
            "metric": info.metric, "num_queries": result.num_queries,
            "num_candidates": result.num_candidates, "per_mode": result.per_mode,
            "pass_at_k": result.pass_at_k, "seconds": result.seconds,
            "per_query": result.per_query,
        })


def _spec(root: Path, info: TaskInfo) -> TaskSpec:
    return TaskSpec(info.name, root / info.repo, info.modality, info.pool, info.metric)


def _candidate_scores(cand: np.ndarray, pool: np.ndarray, kind: str,
                      query: np.ndarray) -> np.ndarray:
    # A global pool is every candidate in order: no need to copy the whole matrix per query.
    return cand @ query if kind == "global" else cand[pool] @ query


def _score(query_emb: np.ndarray, cand_emb: np.ndarray, pools: TaskPools,
           kind: str) -> dict[str, np.ndarray]:
    """Per-query metrics of one mode, F1 (which VLM2Vec reports) included."""
    scores = [_candidate_scores(cand_emb, pool, kind, q)
              for q, pool in zip(query_emb, pools.pools)]
    per_query = metrics.score_queries(scores, pools.relevance)
    for k in metrics.DEFAULT_KS:
        p, r = per_query[f"precision@{k}"], per_query[f"recall@{k}"]
        total = p + r
        per_query[f"f1@{k}"] = np.divide(2 * p * r, total, out=np.zeros_like(total),
                                         where=total > 0)
    return per_query


def vlm2vec_scores(values: dict[str, float], num_queries: int) -> dict[str, float | int]:
    """A task's scores as VLM2Vec's ``<Dataset>_score.json``: its keys, then the counts."""
    return {**{key: values[key] for key in SCORE_KEYS}, "num_pred": num_queries,
            "num_data": num_queries}


def evaluate_mmeb_v2(evaluation: MmebV2Evaluation, tasks: Sequence[TaskInfo]) -> dict[str, Any]:
    """Every task (finished ones from their records), then summary.json and the table."""
    start = time.perf_counter()
    results: list[TaskResult] = []
    todo = [t for t in tasks if evaluation.finished(t) is None]
    if len(todo) < len(tasks):
        print(f"[mmeb-v2] {len(tasks) - len(todo)} of {len(tasks)} task(s) already finished in "
              f"{evaluation.out}: reused", flush=True)
    progress = Progress(len(todo), "tasks")
    for info in tasks:
        result = evaluation.finished(info)
        if result is None:
            result = evaluation.run_task(info)
            done = todo.index(info) + 1
            print(f"[mmeb-v2] {done}/{len(todo)} {info.modality}/{info.name}: "
                  f"{result.num_queries} queries, {result.num_candidates} candidates, "
                  f"{result.seconds:.1f} s | {progress.line(done)}", flush=True)
        results.append(result)
    summary = summarize(results, evaluation.settings)
    summary["benchmark"] = "MMEB-V2"
    summary["seconds"] = round(time.perf_counter() - start, 2)
    _atomic_json(evaluation.out / "summary.json", summary)
    print(summary_table(summary))
    print(f"scores: {evaluation.out}/<mode>/<modality>/<Dataset>_score.json; summary: "
          f"{evaluation.out / 'summary.json'}")
    return summary


def run_mmeb_v2(checkpoint: str | Path, root: str | Path, tasks: Sequence[TaskInfo],
                settings: EvalSettings, out_dir: str | Path, load: Callable[[], Evaluator],
                chunk_size: int = CHUNK_SIZE) -> dict[str, Any]:
    """Evaluate ``tasks`` of the copy at ``root``; ``load`` builds the evaluator (the policy
    and its engine: the driver's ``run_mmeb_v2_eval``), called only if a task needs it."""
    evaluation = MmebV2Evaluation(checkpoint, Path(root), settings, Path(out_dir), load,
                                  chunk_size)
    return evaluate_mmeb_v2(evaluation, tasks)


def _atomic_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        np.save(handle, array)
    tmp.replace(path)
