# Fresh machine: `make train` or `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test lint format bench clean gpu-wheels

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without CUDA, install the CPU torch wheel first so no multi-GB CUDA build is pulled.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	TORCHDYNAMO_DISABLE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# ruff (lint and format check) and mypy, configured in pyproject.toml; `make format` rewrites.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	TORCHDYNAMO_DISABLE=1 $(PY) benchmarks/kernel_speed.py
	TORCHDYNAMO_DISABLE=1 $(PY) benchmarks/model_speed.py --threads 1
	TORCHDYNAMO_DISABLE=1 $(PY) benchmarks/export_speed.py
	TORCHDYNAMO_DISABLE=1 $(PY) benchmarks/save_blocking.py
	TORCHDYNAMO_DISABLE=1 $(PY) benchmarks/lora_speed.py --threads 1
	TORCHDYNAMO_DISABLE=1 $(PY) benchmarks/recompute_memory.py --threads 1

# Wheels for benchmarks/gpu_check.sh, carried to a GPU machine that has no package registry
# (Python 3.12 with torch, transformers, peft, lightning, safetensors there): exactly what it
# lacks, pinned, into .whl/ (git-ignored, at most 64 MiB). causal-conv1d has no wheel (the check
# uses the torch conv path); antlr4-python3-runtime 4.9.3, which omegaconf 2.3 pins, is a source
# archive only, so its pure-Python wheel is built here.
GPU_WHEELS := megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1 fla-core==0.5.2 flash-linear-attention==0.5.2
GPU_SOURCE_ONLY := antlr4-python3-runtime==4.9.3
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps -w .whl $(GPU_SOURCE_ONLY)
	@size=$$(du -sm .whl | cut -f1); ls .whl; echo ".whl: $$size MiB"; \
		test $$size -le 64 || { echo "error: .whl is $$size MiB, over the 64 MiB a GPU run can carry" >&2; exit 1; }

clean:
	rm -rf $(VENV) .pytest_cache
