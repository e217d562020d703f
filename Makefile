# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.chatforge-installed
# DeepSpeed JIT-builds a small C++ op on CPU; keep that cache per checkout so other
# environments on the machine cannot invalidate it.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=

.PHONY: setup test test-slow demo lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "GPU found: installing the default (CUDA) torch"; $(PIP) install torch; \
	else \
	  echo "no GPU: installing the CPU wheel torch==2.13.0"; $(PIP) install torch==2.13.0; \
	fi
	$(PIP) install -e '.[dev,serve,trackers]'
	@mkdir -p $(TORCH_EXTENSIONS_DIR)
	@touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(VENV)/bin/python -m pytest -m slow $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/chatforge demo

clean:
	rm -rf $(VENV) .cache build dist src/*.egg-info
