# keras-alexnet: every target builds its own environment from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast bench clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,onnx]'
	touch $(STAMP)

# The demo: config.demo() (3 epochs of 32 steps of 32 synthetic images, 3,840 images in all).
train: install
	$(PY) -m keras_alexnet.train --preset=demo

# Passed tests' directories are removed at the end (a session writes about 1.5 GB to /tmp).
test: install
	$(PY) -m pytest -q tests -o tmp_path_retention_policy=failed

# The tests not marked slow (@pytest.mark.slow): what a laptop runs between changes.
test-fast: install
	$(PY) -m pytest -q tests -o tmp_path_retention_policy=failed -m "not slow"

bench: install
	$(PY) benchmarks/bench.py $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) runs
