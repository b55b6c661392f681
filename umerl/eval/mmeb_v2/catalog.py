"""The 78 MMEB-V2 tasks: where each one's records and media live in a local copy, its pool.

Facts from VLM2Vec (TIGER-AI-Lab/VLM2Vec at 6e1e1d4): the task names and groups of
``experiments/report_score_v2.py``, the parsers, roots and ``eval_type`` of
``experiments/public/eval/{image,video,visdoc}.yaml``, and the Hugging Face dataset each parser
reads (``src/constant/dataset_hf_path.py``; image tasks: ``ziyjiang/MMEB_Test_Instruct``).

A task's ``name`` is what its score file is called (``<name>_score.json``), the key
``report_score_v2.py`` looks for.
"""

from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("image", "video", "visdoc")
# The headline metric per modality, as report_score_v2.py reads it.
HEADLINE = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}


@dataclass(frozen=True)
class TaskInfo:
    name: str
    modality: str
    parser: str  # which record layout: image_cls, ..., video_ret, vidore, visrag
    pool: str  # VLM2Vec's eval_type: "local" or "global"
    repo: str  # the Hugging Face dataset holding the records (a folder of the local copy)
    subset: str | None  # its config, if any
    split: str
    media_root: str  # image_root or frame_root, relative to the local copy
    # Frames sampled per video (VLM2Vec's num_frames); None: every frame shipped (MomentSeeker,
    # whose loader reads its frame folders whole).
    num_frames: int | None = 8

    @property
    def metric(self) -> str:
        return HEADLINE[self.modality]


IMAGE_REPO = "ziyjiang/MMEB_Test_Instruct"
_IMAGE_TASKS = {
    "image_cls": ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365",
                  "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"],
    "image_qa": ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
                 "ScienceQA", "VizWiz", "GQA", "TextVQA"],
    "image_i2t": ["MSCOCO_i2t", "VisualNews_i2t"],
    "image_t2i": ["VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ"],
    "image_i2i_vg": ["CIRR", "NIGHTS", "OVEN", "FashionIQ", "MSCOCO", "RefCOCO",
                     "RefCOCO-Matching", "Visual7W-Pointing"],
}

# name: (parser, pool, hf repo, subset, split, frame_root under video-tasks/frames/)
_VIDEO_TASKS = {
    "K700": ("video_cls", "global", "VLM2Vec/Kinetics-700", None, "test", "video_cls/K700"),
    "SmthSmthV2": ("ssv2", "local", "VLM2Vec/SmthSmthV2", None, "test", "video_cls/SSv2"),
    "HMDB51": ("video_cls", "global", "VLM2Vec/HMDB51", None, "test", "video_cls/HMDB51"),
    "UCF101": ("video_cls", "global", "VLM2Vec/UCF101", None, "test", "video_cls/UCF101"),
    "Breakfast": ("video_cls", "global", "VLM2Vec/Breakfast", None, "test",
                  "video_cls/Breakfast"),
    "MVBench": ("mvbench", "local", "VLM2Vec/MVBench", None, "train", "video_qa/MVBench"),
    "Video-MME": ("videomme", "local", "VLM2Vec/Video-MME", None, "test", "video_qa/Video-MME"),
    "NExTQA": ("nextqa", "local", "VLM2Vec/NExTQA", "MC", "test", "video_qa/NExTQA"),
    "EgoSchema": ("egoschema", "local", "VLM2Vec/EgoSchema", "Subset", "test",
                  "video_qa/EgoSchema"),
    "ActivityNetQA": ("activitynetqa", "local", "VLM2Vec/ActivityNetQA", None, "test",
                      "video_qa/ActivityNetQA"),
    "DiDeMo": ("didemo", "global", "VLM2Vec/DiDeMo", None, "test", "video_ret/DiDeMo"),
    "MSR-VTT": ("msrvtt", "global", "VLM2Vec/MSR-VTT", "test_1k", "test", "video_ret/MSR-VTT"),
    "MSVD": ("msvd", "global", "VLM2Vec/MSVD", None, "test", "video_ret/MSVD"),
    "VATEX": ("vatex", "global", "VLM2Vec/VATEX", None, "test", "video_ret/VATEX"),
    "YouCook2": ("youcook2", "global", "lmms-lab/YouCook2", None, "val", "video_ret/YouCook2"),
    "QVHighlight": ("moment_retrieval", "local", "VLM2Vec/QVHighlight", None, "test",
                    "video_mret/QVHighlight"),
    "Charades-STA": ("moment_retrieval", "local", "VLM2Vec/Charades-STA", None, "test",
                     "video_mret/Charades_STA"),
    "MomentSeeker": ("momentseeker", "local", "VLM2Vec/MomentSeeker", None, "test",
                     "video_mret/MomentSeeker"),
}

# name: (parser, hf repo, split, folder under visdoc-tasks/); every visdoc task is global.
_VISDOC_TASKS = {
    **{f"ViDoRe_{n}": ("vidore", f"vidore/{n}_test_subsampled_beir", "test", f"ViDoRe_{n}")
       for n in ("arxivqa", "docvqa", "infovqa", "tabfquad")},
    **{f"ViDoRe_{n}": ("vidore", f"vidore/{n}_test_beir", "test", f"ViDoRe_{n}")
       for n in ("tatdqa", "shiftproject", "syntheticDocQA_artificial_intelligence",
                 "syntheticDocQA_energy", "syntheticDocQA_government_reports",
                 "syntheticDocQA_healthcare_industry")},
    "ViDoRe_esg_reports_human_labeled_v2": ("vidore", "vidore/esg_reports_human_labeled_v2",
                                            "test", "esg_reports_human_labeled_v2"),
    # VLM2Vec evaluates the multilingual variants: all queries, no language filter.
    **{f"ViDoRe_{n}_v2_multilingual": ("vidore", f"vidore/{n}_v2", "test",
                                       f"{n}_v2_multilingual")
       for n in ("biomedical_lectures", "economics_reports", "esg_reports")},
    **{f"VisRAG_{n}": ("visrag", f"openbmb/VisRAG-Ret-Test-{n}", "train", f"VisRAG_{n}")
       for n in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")},
    "ViDoSeek-page": ("vidore", "VLM2Vec/ViDoSeek-page-fixed", "test", "ViDoSeek-page"),
    "ViDoSeek-doc": ("vidore", "VLM2Vec/ViDoSeek", "test", "ViDoSeek-doc"),
    "MMLongBench-page": ("vidore", "VLM2Vec/MMLongBench-page-fixed", "test",
                         "MMLongBench-page"),
    "MMLongBench-doc": ("vidore", "VLM2Vec/MMLongBench-doc", "test", "MMLongBench-doc"),
}


def _catalog() -> dict[str, TaskInfo]:
    tasks: dict[str, TaskInfo] = {}
    for parser, names in _IMAGE_TASKS.items():
        for name in names:
            tasks[name] = TaskInfo(name, "image", parser, "local", IMAGE_REPO, name, "test",
                                   "image-tasks")
    for name, (parser, pool, repo, subset, split, frames) in _VIDEO_TASKS.items():
        tasks[name] = TaskInfo(name, "video", parser, pool, repo, subset, split,
                               f"video-tasks/frames/{frames}",
                               None if parser == "momentseeker" else 8)
    for name, (parser, repo, split, folder) in _VISDOC_TASKS.items():
        tasks[name] = TaskInfo(name, "visdoc", parser, "global", repo, None, split,
                               f"visdoc-tasks/{folder}")
    return tasks


TASKS = _catalog()


def select_tasks(modalities: list[str] | None = None,
                 names: list[str] | None = None) -> list[TaskInfo]:
    """The catalog's tasks of these modalities (default: all), optionally only those named,
    in MMEB-V2's report order."""
    modalities = list(modalities or MODALITIES)
    for modality in modalities:
        if modality not in MODALITIES:
            raise ValueError(f"--modalities: '{modality}' must be one of {MODALITIES}")
    if names:
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown MMEB-V2 task(s) {unknown}; known: "
                             f"{', '.join(TASKS)}")
        chosen = [TASKS[n] for n in names]
        outside = [t.name for t in chosen if t.modality not in modalities]
        if outside:
            raise ValueError(f"--tasks {outside} are not of --modalities {modalities}")
        return chosen
    return [t for t in TASKS.values() if t.modality in modalities]
