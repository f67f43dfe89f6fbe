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
	$(PY) -m pip install --quiet -e '.[dev,onnx,portable]'
	touch $(STAMP)

# The demo: config.demo() (3 epochs of 32 steps of 32 synthetic images, 3,840 images in all).
train: install
	$(PY) -m keras_alexnet.train --preset=demo

# TEST_WORKERS processes (pytest-xdist; a module to one, so its fixtures are built once; each takes up
# to 6 GB); passed tests' directories are removed; the 15 slowest tests are listed at the end.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q tests -o tmp_path_retention_policy=failed -n $(TEST_WORKERS) --dist loadscope --durations=15

test: install
	$(PYTEST)

# The tests not marked slow (@pytest.mark.slow): what a laptop runs between changes.
test-fast: install
	$(PYTEST) -m "not slow"

bench: install
	$(PY) benchmarks/bench.py $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) runs
