# `make demo` runs the whole pipeline on toy clips; `make test` runs the test suite.
# Both install what they need first (scripts/bootstrap.sh).
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.PHONY: install demo test toy bench clean vbench-env

install:
	REGDPO_VENV=$(VENV) scripts/bootstrap.sh

toy/captions.csv: | install
	$(BIN)/regdpo toy-data toy

toy: toy/captions.csv

demo: install toy
	$(BIN)/regdpo run configs/toy.yaml
	$(BIN)/regdpo report --run toy

test: install
	$(BIN)/python -m pytest -q -ra

# The isolated VBench env (transformers 4.33, numpy<2, torchvision) the evaluate stage calls as
# a subprocess; ~5 min and ~6.7 GB here, then cached (a stamp records the pins).
VBENCH_VENV ?= .venv-vbench
vbench-env:
	scripts/vbench_env.sh $(VBENCH_VENV)

bench: install
	$(BIN)/python benchmarks/curate.py

clean:
	rm -rf artifacts toy
