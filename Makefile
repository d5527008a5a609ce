# Everything runs inside .venv, created on first use. torch is installed first from an
# overridable spec so that a CPU-only machine does not pull a CUDA build:
#   make test TORCH_SPEC="torch==2.5.1"      (or TORCH_SPEC=torch on a GPU machine)
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.pfc-installed

.PHONY: venv test bench demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: $(STAMP)
	THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 $(PY) bench/head.py
	THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 $(PY) bench/head.py --classes 1000000 --rates 0.1 --variants plain mhe triplet --update backward
	THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 $(PY) bench/head.py --classes 1000000 --rates 0.1 1.0 --update backward --momentum-dtype bfloat16
	OMP_NUM_THREADS=1 $(PY) bench/data.py
	$(PY) bench/train.py

# The demo: synthetic identities (train + disjoint held-out set with a pairs list) → shards →
# 2 CPU ranks with gloo → held-out verification accuracy, trained vs untrained. About 2 min on 2
# cores in a fresh clone, .venv included (README, Quick start: 2 min 7 s; up to 2 min 48 s under load).
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache $(DEMO) $(DEMO_RUN)
