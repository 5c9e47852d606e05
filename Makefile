# lora_lab — every setup step lives here, so a fresh machine needs only `make setup`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LORA_LAB := $(VENV)/bin/lora-lab
FASHION_DIR := /usr/share/datasets/fashion-mnist
# Extra Hydra overrides for `make sweep`, e.g. make sweep ARGS="sweep.ranks=[1,8] trainer.max_epochs=2"
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup data sweep test test-full bench bench-gpu lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed data  ## create .venv, install torch, lora_lab[dev] and the offline Fashion-MNIST

# $(call side_venv,DIR,EXTRA): a venv in DIR that also sees .venv's packages, with the
# requirements of pyproject's optional-dependencies EXTRA installed into it.
define side_venv
	$(PY) -m venv $(1)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')')" \
	  > "$$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/lora_lab_main.pth"
	$(1)/bin/python -m pip install $$($(PY) -c 'import tomllib; \
	  print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["$(2)"])')
endef

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The CPU/CUDA torch pair that lies on this machine's disk; other pairings break torchvision.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[dev]'
	# Side venvs that see this one's packages (a .pth file adds its site dir after their own),
	# so pip adds only what they need beyond them (lora_lab/interop.py explains):
	# PEFT for the interop tests and bench/lora_layers.py (its transformers, on the main path,
	# would cost every command ~1.3 s of imports), and the Ray launcher (its cloudpickle<3
	# breaks the joblib launcher's cloudpickle>=3).
	$(call side_venv,$(VENV)/interop,interop)
	$(call side_venv,$(VENV)/ray,ray)
	touch $@

data:  ## install Debian's Fashion-MNIST (the offline default dataset) if it is missing
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST present in $(FASHION_DIR)"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; \
	fi

sweep: setup  ## run the default study (Fashion-MNIST "which rank?", offline; 38-42 s measured on 2 cores at load 1.5) into outputs/
	$(LORA_LAB) sweep $(ARGS)

test:  ## the default test suite (7 min 45 s in .ci/run beside a second .ci/run on 2 cores)
	$(PY) -m pytest -m "not slow" -q

test-full:  ## every test, slow ones included
	$(PY) -m pytest -q

bench:  ## benchmarks: print ratios measured side by side (not gpu_check.py: make bench-gpu)
	@for b in bench/[!_]*.py; do \
	  [ "$$b" = bench/gpu_check.py ] && continue; echo "== $$b"; $(PY) $$b || exit 1; done

bench-gpu:  ## fused vs sequential on a CUDA device: exactness, bf16-mixed, a 21-run grid
	$(PY) bench/gpu_check.py

lint:  ## ruff, and the import layers cli → pipeline → report/analysis → models → core (import-linter, .importlinter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

format:  ## ruff format + fix imports
	$(VENV)/bin/ruff check --fix --select I .
	$(VENV)/bin/ruff format .

clean:  ## remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache .ruff_cache .hypothesis
