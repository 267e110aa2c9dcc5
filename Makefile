# Two entry points for a fresh machine: `make demo` and `make test`.
# TORCH_SPEC lets GPU users install their own build, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmlab-installed

.PHONY: install demo test test-slow bench repro clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The whole lifecycle on the embedded data: tokenizer, pretraining, math CPT with replay, SFT,
# GRPO, a comparison of every stage's model, and a report (recipes/quickstart.yaml)
demo: $(STAMP)
	$(BIN)/lmlab run recipes/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The long tests (the studies, ablations, an accelerate launch, a killed pipeline): about 3 minutes on
# 2 cores. CI runs them after `make test` (which runs every README command as written).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/pretrain_throughput.py
	$(BIN)/python benchmarks/memory_model.py
	$(BIN)/python benchmarks/planner_references.py
	$(BIN)/python benchmarks/eval_throughput.py

# Slow: the two paper reproductions (EvoLM about 65 minutes on 2 CPU cores, docs/experiments/evolm.md; the
# data-constrained study about 56 minutes, run D3); reports: runs/*/evolm.md, study.md
repro: $(STAMP)
	$(BIN)/lmlab study recipes/evolm_small.yaml
	$(BIN)/lmlab study recipes/data_constrained_small.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache
