# One-command set-up: every target creates .venv and installs the project on first use.
# RANKSEARCH_DEVICE=cpu|cuda picks the torch/fbgemm build (default: cuda when nvidia-smi works).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RANKSEARCH_DEVICE ?= $(shell nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
FBGEMM := $(if $(filter cuda,$(RANKSEARCH_DEVICE)),fbgemm-gpu==1.8.0,fbgemm-gpu-cpu==1.8.0)
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(FBGEMM)
	$(PY) -m pip install -q --no-deps torchrec==1.8.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "import torch, fbgemm_gpu, torchrec, ray, optuna" 
	$(PY) -c "from ranksearch.models.tensorized import tt_kernel; tt_kernel.load(); print(tt_kernel.build_dir())" || echo "fused TT kernel not built: tables use the PyTorch lookup path"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ranksearch demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs bench/out .pytest_cache
