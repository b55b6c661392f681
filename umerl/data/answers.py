"""Verifiable answers: what a completion's ``<answer>`` should name, and the check.

A pair declares its gold answer in its data: ``meta.answer`` (any task), or, for the bundled
tasks whose answer is their class label (``ANSWER_IS_LABEL``), ``meta.label``. Tasks without
either (retrieval by caption or article) have no verifiable answer. The RL loop logs the share
of sampled completions that name the gold answer (``rollout/answer_accuracy``), and rewards can
read the same check through ``RewardContext.answer_correct`` (or the built-in ``answer``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# The bundled umerl-mini tasks whose completions answer with the class label itself.
ANSWER_IS_LABEL = frozenset({"digits_cls", "faces_cls", "digits_reason"})

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def gold_answer(task: str, meta: Mapping[str, Any]) -> str | None:
    """The answer a completion for this pair should give, or ``None`` if none is declared."""
    if meta.get("answer") is not None:
        return str(meta["answer"])
    if task in ANSWER_IS_LABEL and meta.get("label") is not None:
        return str(meta["label"])
    return None


def answer_text(completion: str) -> str | None:
    """The text between the first ``<answer>`` and its ``</answer>``, or ``None``."""
    found = _ANSWER.search(completion)
    return None if found is None else found.group(1)


def normalise(text: str) -> str:
    """Case, surrounding quotes and punctuation, and runs of whitespace do not count."""
    return " ".join(text.casefold().split()).strip(" .,;:!?\"'")


def names_answer(completion: str, gold: str) -> bool:
    """True if the completion's ``<answer>`` is the gold answer (after ``normalise``)."""
    answer = answer_text(completion)
    return answer is not None and normalise(answer) == normalise(gold)
