"""What ``auto`` resolves to (engines, bf16) and the dtype names: one place for each."""

from __future__ import annotations

import pytest
import torch

from umerl.data.dtypes import DTYPES, MODEL_DTYPES, torch_dtype
from umerl.runtime.devices import engine_for, training_dtype, use_bf16


def test_auto_engine_is_vllm_only_with_gpus() -> None:
    assert engine_for("auto", 0) == "transformers"
    assert engine_for("auto", 0.5) == "vllm"
    assert engine_for("transformers", 1) == "transformers"  # an explicit choice stands
    assert engine_for("vllm", 0) == "vllm"


def test_bf16_auto_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert use_bf16(True) and not use_bf16(False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not use_bf16("auto") and training_dtype("auto", "float16") == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert use_bf16("auto") and training_dtype("auto", "float32") == "bfloat16"
    assert training_dtype(False, "float32") == "float32"


def test_dtype_names_are_torch_names() -> None:
    assert set(MODEL_DTYPES) <= set(DTYPES)
    for name in DTYPES:
        assert str(torch_dtype(name)) == f"torch.{name}"
    with pytest.raises(ValueError, match="complex64"):
        torch_dtype("complex64")
