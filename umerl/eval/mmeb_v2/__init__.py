"""MMEB-V2 from a local copy: its 78 tasks, read as VLM2Vec's loaders read them, scored by
umerl, written where VLM2Vec's ``report_score_v2.py`` looks (see docs/mmeb-v2.md)."""

from umerl.eval.mmeb_v2.catalog import MODALITIES, TASKS, TaskInfo, select_tasks
from umerl.eval.mmeb_v2.loaders import LoadedTask, load_task, task_pools
from umerl.eval.mmeb_v2.run import (
    MmebV2Evaluation,
    evaluate_mmeb_v2,
    run_mmeb_v2,
    vlm2vec_scores,
)

__all__ = ["MODALITIES", "TASKS", "LoadedTask", "MmebV2Evaluation", "TaskInfo", "evaluate_mmeb_v2",
           "load_task", "run_mmeb_v2", "select_tasks", "task_pools", "vlm2vec_scores"]
