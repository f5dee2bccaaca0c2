# The two commands a newcomer needs: `make demo` and `make test`.
# Both install what is missing into ./.venv first (torch==2.13.0 before anything else, so a
# machine without torch takes the local CPU wheel instead of resolving a multi-GB CUDA build).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.neurofuse-installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neurofuse demo --out demo_output

test: $(STAMP)
	$(PY) -m ruff check neurofuse tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check neurofuse tests benchmarks
	$(PY) -m ruff format --check neurofuse tests benchmarks
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/fusion_speed.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache .mypy_cache
