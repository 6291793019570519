# Fresh machine: `make train` or `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without CUDA, install the CPU torch wheel first so no multi-GB CUDA build is pulled.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	TORCHDYNAMO_DISABLE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	TORCHDYNAMO_DISABLE=1 $(PY) benchmarks/kernel_speed.py
	TORCHDYNAMO_DISABLE=1 $(PY) benchmarks/model_speed.py --threads 1
	TORCHDYNAMO_DISABLE=1 $(PY) benchmarks/export_speed.py
	TORCHDYNAMO_DISABLE=1 $(PY) benchmarks/save_blocking.py

clean:
	rm -rf $(VENV) .pytest_cache
