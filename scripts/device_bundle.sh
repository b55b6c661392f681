#!/usr/bin/env bash
# Build, on a CPU machine with network, the wheel folder that scripts/gpu_check.py needs on a GPU
# machine that has Python, torch, transformers (any 5.x), numpy, pillow and pyyaml but no network:
#
#   bash scripts/device_bundle.sh                 # -> build/device-bundle (gitignored)
#   bash scripts/device_bundle.sh OUT [PYVER]     # another folder / Python (default 3.12)
#
# Then, on the GPU machine, from the source tree:
#
#   pip install --no-index --find-links build/device-bundle -r build/device-bundle/requirements.txt
#   python scripts/gpu_check.py
#
# What it holds: DeepSpeed (a wheel built here from its source distribution: PyPI has no
# DeepSpeed wheel), OmegaConf, and their dependencies as binary wheels for the target Python
# (msgpack and pydantic-core are compiled), and the newest transformers in pyproject.toml's range
# (pure Python, without its dependencies, which any transformers 5.x machine has): pip installs
# it only where the machine's own is outside that range (5.17 drops the learners' images:
# umerl/model/policy.py, require_encoder_outputs). Nothing of torch: the machine's own stays.
# At most 60 MiB (it is about 19 MiB); the script fails past that. Needs Python >= 3.11 here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/build/device-bundle}"
PYVER="${2:-3.12}"
PYTHON="${PYTHON:-python3}"
LIMIT_MIB=60
# Pins follow pyproject.toml's dependencies.
DEEPSPEED="deepspeed==0.19.8"
OMEGACONF="omegaconf==2.4.0"
# The project's own transformers requirement, read where it is written.
TRANSFORMERS=$("$PYTHON" -c 'import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(next(d for d in deps if d.startswith("transformers")))' "$ROOT/pyproject.toml")
# DeepSpeed's runtime dependencies (its METADATA) less torch and numpy, which the machine has.
DEEPSPEED_DEPS=(einops hjson msgpack ninja "packaging>=20.0" psutil py-cpuinfo "pydantic>=2.0.0"
  tqdm)

rm -rf "$OUT"
mkdir -p "$OUT"
PIP=("$PYTHON" -m pip --disable-pip-version-check)

# DeepSpeed's sdist builds a pure-Python wheel (no compiled ops: they are JIT-built when used,
# and the checks use none). Its recorded accelerator_name is informational: DeepSpeed picks the
# accelerator at run time (DS_ACCELERATOR, else CUDA when torch sees a GPU).
env -u DS_ACCELERATOR DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-cache-dir --no-deps --no-binary deepspeed \
  -w "$OUT" "$DEEPSPEED"

# Binary wheels for the target interpreter, resolved with their own dependencies.
"${PIP[@]}" download -q --dest "$OUT" --only-binary=:all: --implementation cp \
  --python-version "$PYVER" --abi "cp${PYVER/./}" --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "$OMEGACONF" "${DEEPSPEED_DEPS[@]}"

"${PIP[@]}" download -q --dest "$OUT" --no-deps --only-binary=:all: "$TRANSFORMERS"

printf '%s\n' "$DEEPSPEED" "$OMEGACONF" "$TRANSFORMERS" > "$OUT/requirements.txt"
size_kib=$(du -sk "$OUT" | cut -f1)
echo "device bundle: $OUT, $(ls "$OUT" | grep -c '\.whl$') wheels, $((size_kib / 1024)) MiB" \
  "(Python $PYVER)"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "device bundle: larger than $LIMIT_MIB MiB" >&2
  exit 1
fi
