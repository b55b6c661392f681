"""MMEB-V2's video QA tasks: a video and a question against that question's answer options.

Facts from VLM2Vec's loaders (TIGER-AI-Lab/VLM2Vec at 6e1e1d4, ``src/data/eval_dataset/
{mvbench,videomme,nextqa,egoschema,activitynetqa}_dataset.py``, ``qa_template`` in
``src/utils/vision_utils/vision_utils.py``): which columns hold the question, the options and
the answer; where each video's frames are (``<frame_root>/<folder>/``); what the query says
(the shared instruction, then the question and, per dataset, its options); each option's
*candidate name* (what the ground truth names) and the text that is embedded for it, which for
Video-MME and EgoSchema is the option with its letter cut off. Every pool is local: the
query's own options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from umerl.data.formats import DataError, EvalQuery, Side, join_instruction
from umerl.eval.mmeb_v2.catalog import TaskInfo
from umerl.eval.mmeb_v2.files import read_rows
from umerl.eval.mmeb_v2.sides import Names, frames, named_query, string, string_list

QA_INSTRUCTION = ("Given a video and a question, select the most accurate answer from the "
                  "provided candidates. Return only the exact text of your chosen answer. "
                  "Question:")
LETTERS = "ABCD"  # Video-MME's answer letters
YES_NO = ["yes", "no"]  # ActivityNetQA's options (VLM2Vec keeps its yes/no questions only)
# MVBench's configs, in the order VLM2Vec concatenates them (its subset_meta).
MVBENCH_SUBSETS = (
    "episodic_reasoning", "action_sequence", "action_prediction", "action_antonym",
    "fine_grained_action", "unexpected_action", "object_existence", "object_interaction",
    "object_shuffle", "moving_direction", "action_localization", "scene_transition",
    "action_count", "moving_count", "moving_attribute", "state_change", "fine_grained_pose",
    "character_order", "egocentric_navigation", "counterfactual_inference",
)


@dataclass(frozen=True)
class QaRow:
    """One question as VLM2Vec builds it."""

    folder: str  # its frame folder, relative to the task's frame root
    question: str  # the query text after the instruction
    names: list[str]  # the options' candidate names
    texts: list[str]  # what each option embeds
    answer: str  # the positive's candidate name


def lettered(question: str, options: list[str]) -> tuple[str, list[str]]:
    """VLM2Vec's ``qa_template``: the question with an "Options:" block, and the options
    written as "(A) ...", "(B) ..."."""
    marked = [f"({chr(ord('A') + i)}) {option}" for i, option in enumerate(options)]
    return f"{question}\nOptions:\n" + "\n".join(marked), marked


def without_letter(option: str) -> str:
    """Video-MME's and EgoSchema's embedded option: "A. Red." -> "Red". As VLM2Vec
    (``o[o.find('. '):].strip('. ')``), an option without ". " keeps only its last character."""
    return option[option.find(". "):].strip(". ")


def _index(value: Any, count: int, where: str, key: str) -> int:
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: field '{key}' must be an option index, got {value!r}") from None
    if not 0 <= index < count:
        raise DataError(f"{where}: field '{key}' = {index} but there are {count} options")
    return index


def _mvbench(row: dict[str, Any], where: str) -> QaRow:
    options = string_list(row, "candidates", where)
    question, marked = lettered(string(row, "question", where), options)
    answer = string(row, "answer", where)
    if answer not in options:
        raise DataError(f"{where}: answer {answer!r} is not one of the candidates {options}")
    # qa_template names the positive by the last option equal to the answer
    last = len(options) - 1 - options[::-1].index(answer)
    return QaRow(f"{row['subset']}/{row['video']}", question, marked, marked, marked[last])


def _videomme(row: dict[str, Any], where: str) -> QaRow:
    options = string_list(row, "options", where)
    answer = string(row, "answer", where)
    if answer not in LETTERS[:len(options)]:
        raise DataError(f"{where}: answer {answer!r} is not a letter of the {len(options)} "
                        "options")
    question = string(row, "question", where) + "\n" + "\n".join(options)
    return QaRow(str(row["videoID"]), question, options, [without_letter(o) for o in options],
                 options[LETTERS.index(answer)])


def _nextqa(row: dict[str, Any], where: str) -> QaRow:
    options = [string(row, f"a{i}", where) for i in range(5)]
    question, _ = lettered(string(row, "question", where), options)
    answer = _index(row["answer"], len(options), where, "answer")
    return QaRow(str(row["video"]), question, options, options, options[answer])


def _egoschema(row: dict[str, Any], where: str) -> QaRow:
    options = string_list(row, "option", where)
    answer = _index(row["answer"], len(options), where, "answer")
    # VLM2Vec joins the question and the options with no separator between them.
    question = string(row, "question", where) + " ".join(options)
    return QaRow(str(row["video_idx"]), question, options, [without_letter(o) for o in options],
                 options[answer])


def _activitynetqa(row: dict[str, Any], where: str) -> QaRow:
    answer = string(row, "answer", where)
    if answer not in YES_NO:
        raise DataError(f"{where}: answer {answer!r} must be 'yes' or 'no'")
    question = string(row, "question", where) + "? (A) yes; (B) no."
    return QaRow(f"v_{row['video_name']}", question, YES_NO, YES_NO, answer)


# parser: (the columns it reads, how a row becomes a QaRow)
QA_LAYOUTS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any], str], QaRow]]] = {
    "mvbench": (("video", "question", "candidates", "answer"), _mvbench),
    "videomme": (("videoID", "question", "options", "answer"), _videomme),
    "nextqa": (("video", "question", "answer", "a0", "a1", "a2", "a3", "a4"), _nextqa),
    "egoschema": (("video_idx", "question", "option", "answer"), _egoschema),
    "activitynetqa": (("video_name", "question", "answer"), _activitynetqa),
}


def _rows(root: Path, info: TaskInfo, columns: tuple[str, ...]) -> list[tuple[str, dict]]:
    if info.parser != "mvbench":
        return read_rows(root, info.repo, info.subset, info.split, columns)
    # MVBench is one config per subset; a row's frames are under its subset's folder.
    return [(where, {**row, "subset": subset}) for subset in MVBENCH_SUBSETS
            for where, row in read_rows(root, info.repo, subset, info.split, columns)]


def load_video_qa(root: Path, info: TaskInfo) -> tuple[list[EvalQuery], list[Side]]:
    """Each question (with the video's frames) against its own options; positive: the answer."""
    columns, parse = QA_LAYOUTS[info.parser]
    names, items = Names(), []
    for where, row in _rows(root, info, columns):
        qa = parse(row, where)
        video = frames(root / info.media_root / qa.folder, info.num_frames, where)
        query = Side(text=join_instruction(QA_INSTRUCTION, qa.question), video=video,
                     source=where)
        makers = [partial(Side, text=text, source=f"{where}: option {i}")
                  for i, text in enumerate(qa.texts)]
        items.append(named_query(names, query, qa.names, makers, {qa.answer: 1.0}, where))
    return items, []
