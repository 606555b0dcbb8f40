# Set-up and tests. `make setup` builds .venv (CPU PyTorch first, so that pip never pulls a CUDA
# build) and runs the demo; `make test` runs the suite, setting up first on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed demo

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/latest.json
	$(PY) benchmarks/report.py benchmarks/results/latest.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
