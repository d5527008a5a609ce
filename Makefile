# Everything runs inside .venv, created on first use. torch is installed first from an
# overridable spec so that a CPU-only machine does not pull a CUDA build:
#   make test TORCH_SPEC="torch==2.8.0"      (the oldest supported; or TORCH_SPEC=torch on a GPU machine)
# `make gpu-check` defaults to TORCH_SPEC=torch (PyPI's default Linux wheel is a CUDA build).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.pfc-installed

.PHONY: venv test bench demo readme-numbers gpu-check readme-capacity check-readme-capacity readme-backbones check-readme-backbones clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# the suite runs in TEST_WORKERS pytest processes (pytest-xdist), a test file per process at a time
# (its module fixtures stay shared): 6 min instead of 7.5 on 2 cores; TEST_WORKERS=0 runs it serially
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 $(PY) bench/head.py
	THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 $(PY) bench/head.py --classes 1000000 --rates 0.1 --variants plain mhe triplet --update backward
	THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 $(PY) bench/head.py --classes 1000000 --rates 0.1 1.0 --update backward --momentum-dtype bfloat16
	THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 $(PY) bench/head.py --classes 1000000 --rates 0.1 1.0 --update backward \
		--center-dtype fp32 bf16 --logits keep recompute
	OMP_NUM_THREADS=1 $(PY) bench/data.py
	OMP_NUM_THREADS=1 $(PY) bench/augment.py
	$(PY) bench/train.py

# On a GPU machine: the CUDA tests, the head at 10M classes on one GPU and a 200-step iresnet50
# training (NCCL), within 8 minutes on one H100/H200 once the venv exists; prints the summary for
# docs/benchmarks.md and writes runs/gpu-check/gpu_check.json. A venv made earlier with a CPU torch
# must go first (make clean), or pass your own CUDA build's spec: make gpu-check TORCH_SPEC="torch==2.11.0".
gpu-check: TORCH_SPEC = torch
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out runs/gpu-check

# The README's capacity table and its text, made by the planner (tools/capacity_table.py, about a
# minute of simulations on 2 cores): readme-capacity rewrites the block, check-readme-capacity fails
# with a diff when it is stale (tests/test_capacity_table.py runs the same check in make test)
readme-capacity: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tools/capacity_table.py --write README.md

check-readme-capacity: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tools/capacity_table.py --check README.md

# The README's backbone table (tools/backbone_table.py: parameters, GFLOPs, the planner's training
# memory of every registered network; minutes of simulations on 2 cores); tests/test_backbone_table.py
# checks its parameters and GFLOPs in make test
readme-backbones: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tools/backbone_table.py --write README.md

check-readme-backbones: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tools/backbone_table.py --check README.md

# The demo: synthetic identities (train + disjoint held-out set with a pairs list) → shards →
# 2 CPU ranks with gloo → held-out verification accuracy, trained vs untrained. Its accuracies and
# time: README, Quick start, written there by `make readme-numbers`.
DEMO       ?= demo
DEMO_RUN   ?= runs/demo
demo: $(STAMP)
	rm -rf $(DEMO) $(DEMO_RUN)
	$(PY) tools/make_synthetic.py $(DEMO)/train --ids 200 --per 24 --seed 1
	$(PY) tools/make_synthetic.py $(DEMO)/heldout --ids 100 --per 6 --seed 2 --pairs 1200
	$(PY) tools/pack_shards.py folder $(DEMO)/train $(DEMO)/shards --shard-size 600 --workers 2
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=2 \
		launch/train.py configs/synthetic_cpu.py --data $(DEMO)/shards --output $(DEMO_RUN) \
		--val_pairs $(DEMO)/heldout/pairs.txt
	OMP_NUM_THREADS=1 $(PY) tools/evaluate.py $(DEMO_RUN) --pairs $(DEMO)/heldout/pairs.txt --untrained > $(DEMO_RUN)/untrained.json
	OMP_NUM_THREADS=1 $(PY) tools/evaluate.py $(DEMO_RUN) --pairs $(DEMO)/heldout/pairs.txt > $(DEMO_RUN)/trained.json
	$(PY) tools/compare_eval.py $(DEMO_RUN)/untrained.json $(DEMO_RUN)/trained.json

# Reruns `make demo` (its steps timed), records the result in docs/results/demo.json and rewrites
# the README's generated blocks from it (tools/readme_numbers.py; tests/test_readme_numbers.py
# fails while a block or the results file is stale). Commit README.md and docs/results/ after it.
# The inner `make demo` takes the .venv this target made as it is (-o).
readme-numbers: $(STAMP)
	$(PY) tools/readme_numbers.py demo --run-dir $(DEMO_RUN) -- -o $(STAMP) \
		VENV=$(VENV) DEMO=$(DEMO) DEMO_RUN=$(DEMO_RUN) TORCH_SPEC="$(TORCH_SPEC)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache $(DEMO) $(DEMO_RUN)
