"""Loading rewards by name and running them, guarded, as a weighted sum.

A reward name is one of:

- a built-in: ``embedding``, ``format``, ``rank``, ``margin`` (``rewards.builtin``);
- ``package.module:attr``: imported with ``importlib.import_module``;
- ``path/to/file.py:attr``: loaded from that file (relative paths: from the working directory,
  then from ``base_dir`` when given) under a module name unique to the file's absolute path.

``attr`` may be a function, called ``fn(ctx, **kwargs)`` every step, or a class, instantiated
once ``cls(**kwargs)`` when the reward is loaded and then called ``instance(ctx)`` every step
(the place for state: a model loaded once per learner, running statistics, ...).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rewards.builtin import BUILTIN_REWARDS
from rewards.context import RewardContext

logger = logging.getLogger("umerl.rewards")

_PLUGIN_HINT = "a plug-in is 'package.module:function' or 'path/to/file.py:function'"


class RewardError(Exception):
    """A reward could not be loaded, or misbehaved during a step.

    The message names the reward, where it came from (built-in, module or file) and what was
    wrong; rewards built from a recipe list start with the entry, ``rewards[i]: ...``.
    """

    def __init__(self, reward: str, origin: str, problem: str, entry: str | None = None):
        self.reward, self.origin, self.problem, self.entry = reward, origin, problem, entry
        message = f"reward '{reward}' ({origin}): {problem}"
        super().__init__(f"{entry}: {message}" if entry else message)

    def __reduce__(self) -> tuple:
        # Ray pickles a worker's exception to raise it in the driver: rebuild from the parts.
        return (type(self), (self.reward, self.origin, self.problem, self.entry))


@dataclass(frozen=True)
class RewardSpec:
    """One recipe entry: the reward's name, its weight in the total, its keyword arguments.

    ``label`` names the reward's part in logs (default: the built-in name or the plug-in's
    attribute name); two entries need distinct labels.
    """

    name: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None


@dataclass
class Reward:
    """A loaded reward: ``reward(ctx)`` runs it (unguarded; ``RewardSet`` adds the guard)."""

    name: str
    origin: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __call__(self, ctx: RewardContext) -> Any:
        return self.fn(ctx, **self.kwargs)


def load_reward(spec_name: str, kwargs: Mapping[str, Any] | None = None,
                base_dir: str | Path | None = None) -> Reward:
    """Resolve a reward name (built-in, ``pkg.mod:attr`` or ``file.py:attr``) and bind kwargs.

    A class is instantiated here, once, with ``kwargs``; a function gets ``kwargs`` at every
    call, and they are checked against its signature now. Every failure is a ``RewardError``.
    """
    kwargs = dict(kwargs or {})
    if not isinstance(spec_name, str) or not spec_name.strip():
        raise RewardError(str(spec_name), "unresolved", "a reward name must be a non-empty string")
    spec_name = spec_name.strip()
    if spec_name in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[spec_name]
        return _bind(spec_name, f"built-in, {fn.__module__}:{fn.__name__}", fn, kwargs,
                     label=spec_name)
    if ":" not in spec_name:
        raise RewardError(
            spec_name, "unresolved",
            f"unknown reward: built-ins are {', '.join(sorted(BUILTIN_REWARDS))}; {_PLUGIN_HINT}",
        )
    where, attr_path = spec_name.rsplit(":", 1)
    if not where or not attr_path:
        raise RewardError(spec_name, "unresolved", f"malformed reward name: {_PLUGIN_HINT}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = _find_file(spec_name, where, base_dir)
        origin = f"file {path}"
        module = _load_file(spec_name, path)
    else:
        origin = f"module {where}"
        try:
            module = importlib.import_module(where)
        except Exception as err:
            raise RewardError(spec_name, origin,
                              f"import failed: {type(err).__name__}: {err}") from err
        if getattr(module, "__file__", None):
            origin = f"module {where} ({module.__file__})"
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            available = sorted(
                n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
            )
            raise RewardError(spec_name, origin,
                              f"has no attribute '{attr_path}' (callables there: {available})")
        obj = getattr(obj, part)
    return _bind(spec_name, origin, obj, kwargs, label=attr_path.rsplit(".", 1)[-1])


def _find_file(spec_name: str, where: str, base_dir: str | Path | None) -> Path:
    candidates = [Path(where).expanduser()]
    if base_dir is not None and not candidates[0].is_absolute():
        candidates.append(Path(base_dir) / where)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    # base_dir is often the working directory itself: name each place tried once.
    tried = ", ".join(dict.fromkeys(str(c.resolve()) for c in candidates))
    raise RewardError(spec_name, f"file {where}", f"file not found (tried {tried})")


_FILE_MODULES: dict[Path, Any] = {}


def _load_file(spec_name: str, path: Path) -> Any:
    """Import a .py file once per process, under a name unique to its absolute path."""
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"umerl_reward_plugin_{_identifier(path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardError(spec_name, f"file {path}", "cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise RewardError(spec_name, f"file {path}",
                          f"import failed: {type(err).__name__}: {err}") from err
    _FILE_MODULES[path] = module
    return module


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _bind(name: str, origin: str, obj: Any, kwargs: dict[str, Any], label: str) -> Reward:
    if inspect.isclass(obj):
        try:
            instance = obj(**kwargs)
        except Exception as err:
            raise RewardError(name, origin, f"constructing {obj.__name__}(**{kwargs}) failed: "
                                            f"{type(err).__name__}: {err}") from err
        if not callable(instance):
            raise RewardError(name, origin, f"class {obj.__name__} has no __call__(self, ctx)")
        return Reward(name, origin, instance, {}, label)
    if not callable(obj):
        raise RewardError(name, origin, f"is a {type(obj).__name__}, not a function or class")
    try:
        inspect.signature(obj).bind(None, **kwargs)
    except TypeError as err:
        raise RewardError(name, origin, f"arguments (ctx, **{kwargs}) do not fit its "
                                        f"signature: {err}") from None
    except ValueError:  # no signature available (some builtins): checked at the first call
        pass
    return Reward(name, origin, obj, kwargs, label)


@dataclass
class WeightedReward:
    reward: Reward
    weight: float


class RewardSet:
    """Weighted rewards. ``reward_set(ctx) -> (total [R], parts {label: [R]}, timings {label: s})``.

    ``parts`` are each reward's own (unweighted) values; ``total = sum(weight * part)``. Each
    call is guarded: an exception, a wrong type or length, NaN or inf raises ``RewardError``
    naming the reward, its origin, the step and the problem. Every reward is timed; one slower
    than ``slow_seconds`` is logged as a warning (others at debug level). With ``timeout_s``,
    one that has not returned by then raises ``RewardError`` (``run_with_timeout``).
    """

    def __init__(self, rewards: Sequence[WeightedReward | tuple[Reward, float]],
                 slow_seconds: float = 30.0, timeout_s: float | None = None):
        self.rewards = [r if isinstance(r, WeightedReward) else WeightedReward(*r)
                        for r in rewards]
        if not self.rewards:
            raise ValueError("a RewardSet needs at least one reward")
        labels = [r.reward.label or r.reward.name for r in self.rewards]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"reward labels {duplicates} appear twice: give each entry a "
                             "distinct 'label'")
        for entry in self.rewards:
            if not math.isfinite(entry.weight):
                raise ValueError(f"reward '{entry.reward.name}': weight must be finite")
        self.slow_seconds, self.timeout_s = slow_seconds, timeout_s

    @property
    def labels(self) -> list[str]:
        return [r.reward.label or r.reward.name for r in self.rewards]

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.labels, (r.weight for r in self.rewards)))

    def __call__(self, ctx: RewardContext) -> tuple[Tensor, dict[str, Tensor], dict[str, float]]:
        total = torch.zeros(ctx.num_rollouts, dtype=torch.float32, device=ctx.device)
        parts: dict[str, Tensor] = {}
        timings: dict[str, float] = {}
        for label, entry in zip(self.labels, self.rewards):
            start = time.perf_counter()
            values = (run_guarded(entry.reward, ctx) if self.timeout_s is None
                      else run_with_timeout(entry.reward, ctx, self.timeout_s))
            elapsed = time.perf_counter() - start
            timings[label] = elapsed
            level = logging.WARNING if elapsed > self.slow_seconds else logging.DEBUG
            logger.log(level, "reward '%s' (%s) took %.3f s at step %d", entry.reward.name,
                       entry.reward.origin, elapsed, ctx.step)
            parts[label] = values
            total += entry.weight * values
        return total, parts, timings

    def __repr__(self) -> str:
        inner = ", ".join(f"{label}={r.weight:g}" for label, r in zip(self.labels, self.rewards))
        return f"RewardSet({inner})"


def reward_metrics(ctx: RewardContext, total: Tensor, parts: Mapping[str, Tensor],
                   timings: Mapping[str, float]) -> dict[str, float]:
    """Flat metrics for a logger: the mean of the total and of each (unweighted) part, overall
    and per side, its mean within-group standard deviation (what group-normalised advantages
    see: the part with the larger spread drives learning), and each reward's time:
    ``reward/total``, ``reward/<label>``, ``reward/<label>/query``, ``reward/<label>/target``,
    ``reward/<label>/group_std``, ``timing_s/reward/<label>``."""
    metrics: dict[str, float] = {}
    for label, values in {"total": total, **parts}.items():
        metrics[f"reward/{label}"] = float(values.mean())
        metrics[f"reward/{label}/query"] = float(values[ctx.query_slice].mean())
        metrics[f"reward/{label}/target"] = float(values[ctx.target_slice].mean())
        groups = values.float().view(-1, ctx.group_size)
        metrics[f"reward/{label}/group_std"] = (
            float(groups.std(dim=1).mean()) if ctx.group_size > 1 else 0.0)
    for label, seconds in timings.items():
        metrics[f"timing_s/reward/{label}"] = float(seconds)
    return metrics | answer_metrics(ctx)


def answer_metrics(ctx: RewardContext) -> dict[str, float]:
    """The share of sampled completions whose ``<answer>`` names the gold answer, over the
    rollouts whose pair declares one (none: no metric): ``rollout/answer_accuracy``, per side
    (``/query``, ``/target``) and, when the step mixes tasks, per task (``/<task>``)."""
    correct = ctx.answer_correct()
    checked = ~torch.isnan(correct)
    if not bool(checked.any()):
        return {}
    out = {"rollout/answer_accuracy": float(correct[checked].mean())}
    for side, rows in (("query", ctx.query_slice), ("target", ctx.target_slice)):
        if bool(checked[rows].any()):
            out[f"rollout/answer_accuracy/{side}"] = float(correct[rows][checked[rows]].mean())
    tasks = [ctx.meta[p].get("task", "") for p in ctx.pair_index.tolist()]
    if len(set(tasks)) > 1:
        for task in sorted(set(tasks)):
            rows = torch.tensor([t == task for t in tasks]) & checked
            if bool(rows.any()):
                out[f"rollout/answer_accuracy/{task}"] = float(correct[rows].mean())
    return out


def run_guarded(reward: Reward, ctx: RewardContext) -> Tensor:
    """Run one reward and check its output; returns float32 ``[R]`` on ``ctx.device``."""
    where = f"step {ctx.step}"
    try:
        out = reward(ctx)
    except Exception as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        raise RewardError(
            reward.name, reward.origin,
            f"raised {type(err).__name__} at {where} ({frame.filename}:{frame.lineno}): {err}",
        ) from err
    values = _to_tensor(reward, out, where)
    expected = ctx.num_rollouts
    if values.shape[0] != expected:
        raise RewardError(
            reward.name, reward.origin,
            f"returned {values.shape[0]} values at {where}, expected {expected} (one per "
            f"rollout: 2 sides x {ctx.num_pairs} pairs x {ctx.group_size} samples)",
        )
    for kind, mask in (("NaN", torch.isnan(values)), ("inf", torch.isinf(values))):
        if bool(mask.any()):
            bad = mask.nonzero().flatten().tolist()
            shown = "; ".join(f"{r}: {ctx.describe(r)}" for r in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise RewardError(reward.name, reward.origin,
                              f"returned {kind} at {where} for rollouts [{shown}]{more}")
    return values.to(ctx.device)


def run_with_timeout(reward: Reward, ctx: RewardContext, timeout_s: float) -> Tensor:
    """``run_guarded`` in a thread of its own, waited for at most ``timeout_s``; a reward still
    running then raises ``RewardError`` naming it, the step and ``rl.reward_timeout_s``.

    Python cannot stop a thread: the stuck reward keeps running, in a daemon thread that does
    not hold the process open. In a learner that is harmless: the error fails the RL stage,
    whose end kills every learner actor, the thread with its process."""
    box: dict[str, Any] = {}
    grad = torch.is_grad_enabled()  # per thread in torch: the caller's mode, not the default

    def run() -> None:
        try:
            with torch.set_grad_enabled(grad):
                box["values"] = run_guarded(reward, ctx)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=run, name=f"reward {reward.name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RewardError(reward.name, reward.origin,
                          f"no result within rl.reward_timeout_s={timeout_s:g} s at step "
                          f"{ctx.step} (still running when the stage stops)")
    if "error" in box:
        raise box["error"]
    return box["values"]


def _to_tensor(reward: Reward, out: Any, where: str) -> Tensor:
    def fail(problem: str) -> RewardError:
        return RewardError(reward.name, reward.origin, f"{problem} at {where}")

    accepted = "a 1-D torch.Tensor, numpy array, list or tuple of numbers"
    if isinstance(out, Tensor):
        values = out.detach()
    elif isinstance(out, np.ndarray):
        if out.dtype.kind not in "biuf":
            raise fail(f"returned a numpy array of dtype {out.dtype}, expected {accepted}")
        values = torch.from_numpy(np.ascontiguousarray(out))
    elif isinstance(out, (list, tuple)):
        for i, item in enumerate(out):
            if isinstance(item, Tensor) and item.dim() == 0:
                continue
            if not isinstance(item, (int, float, np.integer, np.floating)):
                raise fail(f"returned a {type(out).__name__} whose element {i} is "
                           f"{type(item).__name__} ({item!r}), expected numbers")
        values = torch.tensor([float(item) for item in out], dtype=torch.float32)
    else:
        raise fail(f"returned {type(out).__name__}, expected {accepted}")
    if values.is_complex() or not (values.is_floating_point() or values.dtype in _INT_DTYPES):
        raise fail(f"returned a tensor of dtype {values.dtype}, expected real numbers")
    if values.dim() != 1:
        raise fail(f"returned shape {tuple(values.shape)}, expected 1-D (one value per rollout)")
    return values.float()


_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
