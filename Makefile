# Everything runs inside .venv, created on first use. torch is installed first from an
# overridable spec so that a CPU-only machine does not pull a CUDA build:
#   make test TORCH_SPEC="torch==2.5.1"      (or TORCH_SPEC=torch on a GPU machine)
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.pfc-installed

.PHONY: venv test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/head.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
