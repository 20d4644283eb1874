# `make demo` runs the whole pipeline on toy clips; `make test` runs the test suite.
# Both install what they need first (scripts/bootstrap.sh).
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
VBENCH_VENV ?= .venv-vbench
export REGDPO_VBENCH_PYTHON ?= $(abspath $(VBENCH_VENV))/bin/python

.PHONY: install demo test toy bench clean vbench-env

install:
	REGDPO_VENV=$(VENV) scripts/bootstrap.sh

# Written last by `regdpo toy-data`: clips, captions.csv, edge cases, then the tiny models.
TOY := toy/models/tiny-wan-i2v/model_index.json
$(TOY): | install
	$(BIN)/regdpo toy-data toy

toy: $(TOY)

demo: install toy
	$(BIN)/regdpo run configs/toy.yaml
	$(BIN)/regdpo report --run toy

# The VBench tests run the real vbench package in its own env, so `make test` builds it first
# (REGDPO_SKIP_VBENCH=1 skips both the env and those tests).
test: install $(if $(filter 1,$(REGDPO_SKIP_VBENCH)),,vbench-env)
	$(BIN)/python -m pytest -q -ra --durations=25

# The isolated VBench env (transformers 4.33, numpy<2, torchvision) the evaluate stage calls as
# a subprocess; ~5 min and ~6.7 GB here, then cached (a stamp records the pins).
vbench-env:
	scripts/vbench_env.sh $(VBENCH_VENV)

bench: install
	$(BIN)/python benchmarks/curate.py

clean:
	rm -rf artifacts toy
