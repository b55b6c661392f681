#!/usr/bin/env python
"""The GPU path on one CUDA device, without Ray or vLLM: what a cluster's learners run.

    python scripts/gpu_check.py                  # on the first CUDA device
    python scripts/gpu_check.py --device cpu     # the same checks on CPU (what CI runs)

Runs from the source tree (no install). Needs Python >= 3.10, torch >= 2.4 with CUDA,
transformers >= 5.18 (torchvision not needed), deepspeed >= 0.17, omegaconf >= 2.3, pillow,
numpy, pyyaml; Ray and vLLM are not used. A machine with only torch, transformers, numpy, pillow
and pyyaml and no network gets the rest from the wheel folder `scripts/device_bundle.sh` builds
elsewhere (docs/gpu.md, "Checking the GPU path"); without them this script says which are missing
and exits 1. It builds the tiny offline Qwen2-VL model, then for DeepSpeed ZeRO-2 and ZeRO-3 (world
size 1, bf16 where the GPU has it, gradient checkpointing on):

- a few SFT steps on one fixed contrastive batch: the loss is finite and falls;
- the model trains in train mode and gradient checkpointing really recomputes its layers;
- a checkpoint is saved, verified and reloaded: its Hugging Face weights equal the live
  (under ZeRO-3: gathered) weights bit for bit, and it resumes at the saved step;
- a few GRPO learner steps: the frozen reference sits on the policy's device, the loss is
  finite, and the gathered weights a rollout engine would receive equal the saved ones;
- the frozen reference as a ZeRO-3 engine (``learner.reference_placement`` zero3 and
  zero3_offload): its log-probs equal the full copy's; on CUDA the offloaded one is never
  whole on the GPU;
- the same learner under ZeRO-2 without gradient checkpointing, where it runs each prompt once
  (``learner.shared_prompt``): its forward equals whole rows' on the device;
- chunked log-probs equal the full log_softmax on the device;
- a GRPO learner step's peak memory on the GPU is within ``umerl plan``'s estimate.

One line per check as it runs, then a one-screen report (every check, PASS or FAIL, its figure;
the versions, the device and the process's peak memory) and a summary line last; exit status 1
if any check failed. Without CUDA (and no --device cpu) it says so and exits 0 having checked
nothing. Under 5 minutes on a modern GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS: list[tuple[str, bool, str]] = []
# What the checks import beyond torch, transformers, numpy, pillow and pyyaml (the device bundle).
BUNDLED = ("deepspeed", "omegaconf")
REPORT_NAME, REPORT_FIGURE = 56, 56  # columns of the report: one screen of 120


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, bool(ok), detail))
    print(f"[{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)


def guarded(name: str, body: Callable[[], None]) -> None:
    try:
        body()
    except Exception as err:  # noqa: BLE001 - every failure becomes a FAIL line, then the summary
        check(name, False, f"{type(err).__name__}: {err}")
        traceback.print_exc()


def write_data(root: Path, n: int = 8) -> Path:
    from umerl.data.tokens import format_completion

    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps({
        "id": str(i), "task": "check",
        "query": {"text": f"find the note about topic {i}",
                  "completion": format_completion(f"the query asks for topic {i}", f"topic {i}")},
        "target": {"text": f"a note about topic {i} and its details",
                   "completion": format_completion(f"the note covers topic {i}", f"topic {i}")},
    }) + "\n" for i in range(n)))
    return path


def config(out: Path, data: Path, zero: int, bf16: bool, steps: int, *extra: str):
    from umerl.config.recipe import load_recipe

    flag = str(bf16).lower()
    return load_recipe(None, [
        f"output_dir={out}", f'sft.data=["{data}"]', f'rl.data=["{data}"]', "wandb.mode=disabled",
        f"sft.max_steps={steps}", "sft.micro_batch_size=8", "sft.num_workers=1", "sft.lr=2e-3",
        "sft.warmup_ratio=0", f"sft.zero_stage={zero}", f"sft.bf16={flag}", "sft.save_every=1000",
        "sft.gradient_checkpointing=true", "sft.resume=null",
        "rl.pairs_per_step=2", "rl.group_size=2", "rl.max_new_tokens=8", "rl.lr=1e-4",
        "rl.max_steps=2", "learner.num_workers=1", f"learner.zero_stage={zero}",
        f"learner.bf16={flag}", "learner.gradient_checkpointing=true", "rl.resume=null", *extra,
    ])


def count_layer_calls(model, run_step: Callable[[], object]) -> int:
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    calls: list[int] = []
    handle = layer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        run_step()
    finally:
        handle.remove()
    return len(calls)


def sft_checks(tag: str, cfg, model_dir: str) -> None:
    import torch

    from umerl.model.loading import load_policy
    from umerl.train import checkpoint as ckpt
    from umerl.train.engine import full_state_dict
    from umerl.train.sft import SftRun

    run = SftRun(cfg, model_dir)
    model = run.bundle.model
    # one sub-dataset of exactly one batch: every step sees the same pairs, so the loss falls
    losses = [run.optimizer_step()["sft/loss"]]
    calls = count_layer_calls(model, lambda: losses.append(run.optimizer_step()["sft/loss"]))
    for _ in range(3):
        losses.append(run.optimizer_step()["sft/loss"])
    run.state.step = len(losses)
    check(f"{tag} SFT loss finite and falling", all(map(math.isfinite, losses))
          and losses[-1] < losses[0], " ".join(f"{v:.3f}" for v in losses))
    check(f"{tag} SFT trains in train mode with gradient checkpointing",
          model.training and model.is_gradient_checkpointing, f"device {run.engine.device}")
    check(f"{tag} SFT checkpointing recomputes layers", calls == 4,
          f"first decoder layer ran {calls} times for 2 forwards (4 = recomputed in backward)")
    saved = run.save()
    ckpt.verify(saved)
    live = full_state_dict(run.engine, int(cfg.sft.zero_stage))
    if live is None:
        live = {k: v for k, v in model.state_dict().items()}
    # through from_pretrained: the file may use the checkpoint's own (older) tensor names
    exported = load_policy(saved, dtype=str(cfg.model.dtype)).model.state_dict()
    common = [k for k in exported if k in live]
    mismatched = [k for k in common
                  if not torch.equal(live[k].detach().cpu().to(exported[k].dtype), exported[k])]
    check(f"{tag} SFT export equals the live weights", not mismatched and len(common) > 10,
          f"{len(common)} tensors compared, {len(mismatched)} differ")
    cfg.sft.resume = "auto"
    resumed = SftRun(cfg, model_dir)
    check(f"{tag} SFT checkpoint resumes", resumed.resume() == saved and
          resumed.state.step == run.state.step, f"{saved.name}, step {resumed.state.step}")


def learner_checks(tag: str, cfg, model_dir: str) -> None:
    import torch

    from rollout.transformers_engine import TransformersEngine
    from rollout.weight_sync import BucketPlan, Digest
    from umerl.data.formats import read_rl_pairs
    from umerl.model.loading import load_policy
    from umerl.model.sampling import SamplingParams
    from umerl.train.learner import Learner, StepShard

    learner = Learner(cfg, model_dir, model_dir)
    policy_device = next(learner.engine.module.parameters()).device
    reference_devices = {p.device for p in learner.reference.parameters()}
    check(f"{tag} learner reference on the policy's device",
          reference_devices == {learner.engine.device} and
          policy_device.type == learner.engine.device.type,
          f"policy {learner.engine.device}, reference {sorted(map(str, reference_devices))}")
    pairs, _ = read_rl_pairs(cfg.rl.data[0])
    engine = TransformersEngine(learner.bundle)
    plan = BucketPlan.build(learner.weight_specs(), 1 << 20)

    def synced_weights() -> dict:  # what a weight sync sends: full tensors, bucket by bucket
        return {m.name: t.detach().cpu().clone() for metas, group in
                zip(plan.buckets, learner.weight_buckets(plan)) for m, t in zip(metas, group)}

    start_digest = Digest.of(plan, synced_weights())
    losses = []
    for step in (1, 2):
        batch = pairs[2 * step - 2:2 * step]
        sampling = SamplingParams(max_new_tokens=8, seed=step)
        learner.bundle.model.eval()  # generation with the policy's own weights, as a rollout
        q = engine.generate([p.query for p in batch], 2, sampling, seeds=[10 * step, 10 * step + 1])
        t = engine.generate([p.target for p in batch], 2, sampling, seeds=[10 * step + 2,
                                                                           10 * step + 3])
        learner.bundle.model.train()
        if learner.shared_prompt and step == 1:
            shared_prompt_check(tag, learner, [p.query for p in batch] + [p.target for p in batch],
                                q + t)
        losses.append(learner.step(StepShard(step, batch, 0, q, t))["actor/loss"])
    weights = synced_weights()
    digest = Digest.of(plan, weights)
    check(f"{tag} learner steps finite and update the policy", all(map(math.isfinite, losses))
          and digest != start_digest, " ".join(f"{v:.3e}" for v in losses))
    full = all(t.numel() > 0 for t in weights.values())
    saved = learner.save(2, {"data": {}})
    exported = load_policy(saved, dtype=str(cfg.model.dtype)).model.state_dict()
    common = [(n, t) for n, t in weights.items() if n in exported]
    same = all(torch.equal(exported[n].to(t.dtype), t.cpu()) for n, t in common)
    check(f"{tag} learner weights for rollouts: full tensors, equal to the checkpoint",
          full and same and len(common) > 10,
          f"{len(common)} of {len(weights)} tensors compared, digest "
          f"{digest[:12]}")


def reference_checks(tag: str, cfg, model_dir: str, data: Path) -> None:
    """``learner.reference_placement`` zero3 and zero3_offload (world size 1) against the full
    copy: the same log-probs on a batch of prompts and completions; on CUDA, the offloaded
    reference is never whole on the GPU (partitioned before DeepSpeed would move it there) and
    keeps only its small persistent parameters there after a forward."""
    import torch

    from umerl.data.formats import read_sft_pairs
    from umerl.model.loading import load_encoder
    from umerl.train.reference import build_reference, resident_elements

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    pairs = read_sft_pairs(data)[0][:3]
    encoder = load_encoder(model_dir, max_pixels=cfg.model.max_pixels)
    logprobs, held, peaks = {}, {}, {}
    for placement in ("device", "zero3", "zero3_offload"):
        cfg.learner.reference_placement = placement
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        reference = build_reference(cfg, model_dir, device)
        if device.type == "cuda":
            peaks[placement] = torch.cuda.max_memory_allocated() - base
        inputs = encoder.policy_inputs([encoder.encode(p.query) for p in pairs],
                                       [encoder.tokenizer(p.query.completion,
                                                          add_special_tokens=False)["input_ids"]
                                        for p in pairs])
        with torch.no_grad():
            out = reference(**{k: v.to(device) for k, v in inputs.items()})
        logprobs[placement] = out.logprobs[out.completion_mask].float().cpu()
        held[placement] = resident_elements(reference)
        del reference, out
    full = sum(held["device"].values())
    tolerance = 1e-2 if str(cfg.model.dtype) == "bfloat16" else 1e-5
    worst = max(float((logprobs[p] - logprobs["device"]).abs().max())
                for p in ("zero3", "zero3_offload"))
    check(f"{tag} reference log-probs equal the full copy's", worst <= tolerance,
          f"max |d logp| {worst:.2e} over {logprobs['device'].numel()} tokens "
          f"(tolerance {tolerance:g})")
    if device.type == "cuda":
        on_gpu = held["zero3_offload"].get("cuda", 0)
        full_bytes = peaks["device"]
        check(f"{tag} offloaded reference stays off the GPU",
              on_gpu < 0.1 * full and peaks["zero3_offload"] < 0.5 * full_bytes,
              f"{on_gpu} of {full} elements on the GPU after a forward; peak "
              f"{peaks['zero3_offload'] / 2**20:.1f} MiB while building (full copy "
              f"{full_bytes / 2**20:.1f} MiB)")


def shared_prompt_check(tag: str, learner, sides: list, completions: list) -> None:
    """The learner's shared-prompt forward against whole rows, on its device and dtype:
    image and text prompts of different lengths, completions cut to different lengths, so both
    layouts pad."""
    import torch

    encoder, G = learner.bundle.encoder, len(completions[0])
    prompts = [encoder.encode(side) for side in sides]
    flat = [c[:max(1, len(c) - i % 4)] for i, c in enumerate(c for g in completions for c in g)]
    with torch.no_grad():
        shared = learner.engine.module(**learner._to_device(
            encoder.shared_prompt_inputs(prompts, flat)))
        whole = learner.engine.module(**learner._to_device(
            encoder.policy_inputs([p for p in prompts for _ in range(G)], flat)))
    logp = (shared.logprobs[shared.completion_mask] - whole.logprobs[whole.completion_mask])
    gen = (shared.gen - whole.gen).abs().max()
    tolerance = 0.1 if learner.engine.bfloat16_enabled() else 1e-4
    check(f"{tag} shared-prompt forward equals whole rows",
          float(logp.abs().max()) < tolerance and float(gen) < tolerance,
          f"max |d logp| {float(logp.abs().max()):.2e}, max |d gen| {float(gen):.2e} "
          f"(tolerance {tolerance:g})")


# Chunked log-probs against the full log_softmax. In bf16 the head's logits are rounded to 8
# bits of mantissa in both, but the chunked GEMMs may round differently (other tile shapes):
# up to a spacing of bf16 at the logit's magnitude (2^-6 below 4), so 0.05 nats; fp32: 1e-4.
LOGPROB_TOLERANCE = {True: 5e-2, False: 1e-4}


def logprob_chunk_check(device: str, bf16: bool) -> None:
    """``chunked_token_logprobs`` (the learner's, 1024-token chunks) equals the full
    log_softmax on this device, values and the hidden states' gradients, at a Qwen2-VL vocab
    on CUDA (smaller on CPU); on CUDA also the peak memory of each, forward and backward."""
    import torch

    from umerl.model.policy import chunked_token_logprobs

    tokens, width, vocab = (4096, 1536, 151_936) if device == "cuda" else (512, 64, 4096)
    dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=False).to(device, dtype)
    with torch.no_grad():  # unit-variance logits: the targets' stay below ~4, where bf16's
        # spacing is 2^-6, well inside the tolerance
        head.weight.copy_(torch.randn(vocab, width, generator=gen) / width ** 0.5)
    hidden0 = torch.randn(tokens, width, generator=gen).to(device, dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)

    def run(chunked: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        hidden = hidden0.clone().requires_grad_()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        if chunked:
            values = chunked_token_logprobs(head, hidden, targets, chunk_tokens=1024)
        else:
            values = torch.log_softmax(head(hidden).float(), dim=-1).gather(
                -1, targets.unsqueeze(-1)).squeeze(-1)
        values.sum().backward()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else 0.0
        return values.detach().float(), hidden.grad.float(), peak

    full, full_grad, full_peak = run(chunked=False)
    part, part_grad, part_peak = run(chunked=True)
    worst = float((part - full).abs().max())
    worst_grad = float((part_grad - full_grad).abs().max() / full_grad.abs().max())
    tolerance = LOGPROB_TOLERANCE[bf16]
    peaks = (f"; peak {part_peak:.2f} GiB chunked vs {full_peak:.2f} GiB full"
             if device == "cuda" else "")
    check(f"chunked log-probs {'bf16' if bf16 else 'fp32'} equal the full log_softmax",
          worst <= tolerance and worst_grad <= tolerance and (device != "cuda"
                                                             or part_peak < full_peak),
          f"{tokens} tokens x vocab {vocab}: max |diff| {worst:.2e} (tolerance {tolerance:g}), "
          f"gradient {worst_grad:.2e} of its largest{peaks}")


def learner_peak_check(tag: str, cfg, model_dir: str, device: str) -> None:
    """One GRPO learner step's peak memory on the device within ``umerl plan``'s estimate of
    the same learner (the tiny model's config; rows and tokens of this step; its fixed
    allowance for the CUDA context and allocator slack included), and what the learner held
    before the step."""
    import torch

    from rollout.transformers_engine import TransformersEngine
    from umerl.data.formats import read_rl_pairs
    from umerl.model.sampling import SamplingParams
    from umerl.plan import learner_column, resolve_shape
    from umerl.train.learner import Learner, StepShard

    learner = Learner(cfg, model_dir, model_dir)
    held = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0
    pairs, _ = read_rl_pairs(cfg.rl.data[0])
    batch = pairs[:2]
    engine = TransformersEngine(learner.bundle)
    sampling = SamplingParams(max_new_tokens=8, seed=1)
    learner.bundle.model.eval()
    q = engine.generate([p.query for p in batch], 2, sampling, seeds=[1, 2])
    t = engine.generate([p.target for p in batch], 2, sampling, seeds=[3, 4])
    learner.bundle.model.train()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loss = learner.step(StepShard(1, batch, 0, q, t))["actor/loss"]
    estimate = learner_column(cfg, resolve_shape(model_dir), 80 << 30).total / 2**30
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        figure = (f"peak {peak:.3f} GiB allocated ({held:.3f} GiB before the step); "
                  f"umerl plan: {estimate:.3f} GiB")
    else:
        peak, figure = 0.0, f"umerl plan: {estimate:.3f} GiB (no device peak on CPU)"
    check(f"{tag} learner step peak memory", math.isfinite(loss) and peak <= estimate, figure)


def eval_check(device: str, checkpoint: str, out: Path) -> None:
    """``--eval CHECKPOINT``: the CPU recipe's evaluation (every bundled task, disc and greedy
    gen, pass@k; ``UMERL_DATA_DIR``'s build) of the checkpoint on the device in float32 gives
    the scores the same code gives on the CPU, to one query of each task; the device's
    bfloat16 scores and the times are figures. A GPU cluster's ``umerl eval`` and the
    driver's evaluations run this ``run_eval`` in a Ray task with a GPU."""
    from umerl.config.recipe import load_recipe
    from umerl.data.tasks import recipe_tasks
    from umerl.eval.runner import eval_settings, run_eval

    cfg = load_recipe(str(REPO / "recipes" / "cpu_tiny.yaml"), [])
    specs = recipe_tasks(list(cfg.eval.tasks), cfg.eval.split, cfg.data)
    settings = eval_settings(cfg)
    runs, seconds = {}, {}
    for name, dtype, where in (("cpu", "float32", "cpu"), (device, "float32", device),
                               (f"{device} bf16", "bfloat16", device)):
        start = time.perf_counter()
        runs[name] = run_eval(checkpoint, specs, settings, out / name.replace(" ", "-"), dtype,
                              where)["tasks"]
        seconds[name] = time.perf_counter() - start
    worst, where_worst = 0.0, ""
    for task, result in runs["cpu"].items():
        one_query = 1 / result["num_queries"]
        for mode, score in result["scores"].items():
            gap = round(abs(runs[device][task]["scores"][mode] - score) / one_query, 6)
            if gap > worst:
                worst, where_worst = gap, f"{task} {mode}"
    overall = {name: sum(t["scores"]["gen"] for t in r.values()) / len(r)
               for name, r in runs.items()}
    check(f"evaluation on {device} float32 scores as on the CPU", worst <= 1,
          f"largest gap {worst:.0f} quer{'y' if worst == 1 else 'ies'} ({where_worst or '-'}); "
          f"mean gen cpu {overall['cpu']:.3f}, {device} {overall[device]:.3f}, bf16 "
          f"{overall[f'{device} bf16']:.3f}; " + ", ".join(f"{n} {t:.0f} s"
                                                          for n, t in seconds.items()))


def missing_modules() -> list[str]:
    """The bundled modules this interpreter cannot import (find_spec: nothing is imported)."""
    return [name for name in BUNDLED if importlib.util.find_spec(name) is None]


def peak_memory(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated on the GPU"
    # ru_maxrss is in KiB on Linux
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident"


def first_line(text: str, width: int) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= width else line[:width - 3] + "..."


def report(header: list[str]) -> None:
    """Every check on one screen: name, PASS/FAIL, its figure (the detail's first line)."""
    print("=" * (REPORT_NAME + REPORT_FIGURE + 8))
    for line in header:
        print(line)
    print(f"{'check':<{REPORT_NAME}}  {'':4}  figure")
    for name, ok, detail in RESULTS:
        print(f"{first_line(name, REPORT_NAME):<{REPORT_NAME}}  {'PASS' if ok else 'FAIL'}  "
              f"{first_line(detail, REPORT_FIGURE)}")
    print("=" * (REPORT_NAME + REPORT_FIGURE + 8), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--eval", metavar="CHECKPOINT", default=None,
                        help="also evaluate this checkpoint on the device and on the CPU "
                             "(the CPU recipe's evaluation) and compare their scores")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
    bundle = ("on a machine without network, build the wheel folder elsewhere with `bash "
              "scripts/device_bundle.sh` and install it with `pip install --no-index "
              "--find-links build/device-bundle -r build/device-bundle/requirements.txt`")
    missing = missing_modules()
    if missing:
        print(f"gpu_check: {', '.join(missing)} not installed here; {bundle}")
        return 1
    from transformers import Qwen2VLModel

    from umerl.model.policy import require_encoder_outputs

    try:  # the learners' own check, before any of them is built
        require_encoder_outputs(Qwen2VLModel)
    except RuntimeError as err:
        print(f"gpu_check: {err}; {bundle} (it carries one)")
        return 1
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing checked (use --device cpu to run the "
              "same checks on CPU)")
        return 0
    import deepspeed
    import transformers

    from umerl.model.tiny import build_tiny_model
    from umerl.runtime.console import quiet
    from umerl.runtime.devices import use_bf16
    from umerl.train import dist as udist

    quiet()
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"gpu_check on {where}: torch {torch.__version__}, transformers "
          f"{transformers.__version__}, deepspeed {deepspeed.__version__}", flush=True)
    start = time.perf_counter()
    root = Path(args.out or tempfile.mkdtemp(prefix="umerl-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    model_dir = str(build_tiny_model(root / "tiny", family="qwen2_vl"))
    data = write_data(root)
    udist.init_single_process()
    bf16 = args.device == "cuda" and use_bf16("auto")
    for zero in (2, 3):
        tag = f"ZeRO-{zero}{' bf16' if bf16 else ''}"
        cfg = config(root / f"zero{zero}", data, zero, bf16, steps=5)
        guarded(f"{tag} SFT", lambda tag=tag, cfg=cfg: sft_checks(tag, cfg, model_dir))
        guarded(f"{tag} learner", lambda tag=tag, cfg=cfg: learner_checks(tag, cfg, model_dir))
    tag = f"ZeRO-3{' bf16' if bf16 else ''}"
    cfg = config(root / "reference", data, 3, bf16, 5)
    guarded(f"{tag} reference", lambda: reference_checks(tag, cfg, model_dir, data))
    # Without gradient checkpointing the learner runs each prompt once (learner.shared_prompt).
    tag = f"ZeRO-2{' bf16' if bf16 else ''} shared prompt"
    cfg = config(root / "shared", data, 2, bf16, 5, "learner.gradient_checkpointing=false")
    guarded(f"{tag} learner", lambda: learner_checks(tag, cfg, model_dir))
    tag = "bf16" if bf16 else "fp32"
    guarded(f"chunked log-probs {tag}", lambda: logprob_chunk_check(args.device, bf16))
    tag = f"ZeRO-2{' bf16' if bf16 else ''}"
    cfg = config(root / "peak", data, 2, bf16, 5)
    guarded(f"{tag} learner step peak memory",
            lambda: learner_peak_check(tag, cfg, model_dir, args.device))
    if args.eval:
        guarded(f"evaluation on {args.device}",
                lambda: eval_check(args.device, args.eval, root / "eval"))
    failed = [name for name, ok, _ in RESULTS if not ok]
    seconds = time.perf_counter() - start
    report([f"gpu_check report: {where}, Python {sys.version.split()[0]}, torch "
            f"{torch.__version__}, transformers {transformers.__version__}, deepspeed "
            f"{deepspeed.__version__}",
            f"{len(RESULTS)} checks in {seconds:.0f} s, peak memory {peak_memory(args.device)}"])
    print(f"gpu_check: {len(RESULTS) - len(failed)} passed, {len(failed)} failed in "
          f"{seconds:.0f} s ({root})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
