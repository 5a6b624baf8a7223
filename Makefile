# folk_nb: set-up, the main job and the tests. Every target creates .venv/ on first use.
#   make demo   - the main job on the embedded default data (writes reports/demo.html)
#   make test   - everything: library in sync with the notebooks, every notebook run, pytest
#   make lab    - JupyterLab on nbs/
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lab venv export sync nbtest pytest bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

demo: venv
	$(BIN)/folk_nb_demo --out reports/demo.html

lab: venv
	$(BIN)/jupyter lab --notebook-dir=nbs

export: venv
	$(BIN)/nbdev_export

# The library must be exactly what the notebooks export.
sync: venv
	@tmp=$$(mktemp -d); cp -r folk_nb "$$tmp/"; $(BIN)/nbdev_export; \
	if diff -r -q -x __pycache__ "$$tmp/folk_nb" folk_nb; then echo "folk_nb/ is in sync with nbs/"; rm -rf "$$tmp"; \
	else echo "folk_nb/ differed from what nbs/ exports (nbdev_export has now rewritten it): edit the notebooks, not folk_nb/*.py"; rm -rf "$$tmp"; exit 1; fi

nbtest: venv   # two notebooks at a time, one thread each (2-core machines)
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2

pytest: venv
	$(BIN)/python -m pytest tests

test: sync nbtest pytest

bench: venv
	$(BIN)/python bench/masks.py

clean:
	rm -rf reports build dist *.egg-info .pytest_cache
