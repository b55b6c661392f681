"""The dtype names every layer shares: a recipe's ``model.dtype``, the weights a sync moves.

Names are torch's without ``torch.``; ``torch_dtype`` turns one into the torch object. The
config layer reads the names without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# What a model's weights load in (model.dtype, the rollout engines' dtype).
MODEL_DTYPES = ("float32", "bfloat16", "float16")
# What a weight sync moves: a model's buffers need not be floats.
DTYPES = (*MODEL_DTYPES, "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``, for a name in ``DTYPES``."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)
