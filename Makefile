# Two entry points for users (see README.md): `make run` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FMNIST_DIR := /usr/share/datasets/fashion-mnist

# Offline and telemetry settings for every command the project runs: the one list in pipeline/environment.py
# (a value already set in the environment is kept, as in the Python processes).
$(foreach setting,$(shell $(PYTHON) pipeline/environment.py),$(eval export $(subst =, ?= ,$(setting))))

.PHONY: setup data plots-offline run test lint clean

setup: $(VENV)/.setup-stamp data plots-offline

$(VENV)/.setup-stamp: pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c requirements/lock.txt -e '.[dev]'
	touch $@

# Debian's dataset-fashion-mnist package gives the default dataset offline. Elsewhere the loader
# downloads it through torchvision on first use.
data:
	@if [ -d $(FMNIST_DIR) ]; then echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST not installed system-wide: it will be downloaded through torchvision on first use"; fi

# `dvc plots show` offline: vega, vega-lite and vega-embed from npm into the ignored .vega/ folder, inlined
# into .vega/template.html (named by plots.html_template in .dvc/config); without npm the template loads them
# from their CDN. Nothing third-party is committed.
plots-offline: .vega/template.html

.vega/template.html: pipeline/plots_template.py $(VENV)/.setup-stamp
	@if command -v npm >/dev/null; then \
	  npm install --silent --no-audit --no-fund --prefix .vega vega@5 vega-lite@5 vega-embed@6 && \
	  $(BIN)/python -m pipeline.plots_template --node-modules .vega/node_modules --out $@; \
	else $(BIN)/python -m pipeline.plots_template --cdn --out $@ && \
	  echo "npm not found: dvc plots show loads vega from its CDN (the plots draw with internet access)"; fi

# Independent stages (the distillation seeds, evaluations, baselines) run JOBS at a time, one core each.
JOBS ?= $(shell nproc)

run: setup
	$(BIN)/ast-dd run --jobs $(JOBS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .vega .pytest_cache .ruff_cache
