# keras-alexnet: every target builds its own environment from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test bench clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,onnx]'
	touch $(STAMP)

train: install
	$(PY) -m keras_alexnet.train --dataset=synthetic --model_dir=runs/demo --epochs=5 --batch_size=32 \
		--export_dir=export/alexnet

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m keras_alexnet.bench

clean:
	rm -rf $(VENV) runs
