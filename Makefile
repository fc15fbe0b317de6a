# `make train` and `make test` create the virtual environment on first use (Python 3.11, CPU jax).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test clean notebooks

$(STAMP): requirements.txt requirements-interop.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF" $(PY) -m pip install --quiet -r requirements.txt -r requirements-interop.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m bitnet_jax.compare --workdir=runs/quickstart

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile --durations=40 tests

clean:
	rm -rf $(VENV) .pytest_cache

# The notebooks in colab/ are paired by jupytext with percent-format sources (colab/NAME.py): edit the .py, then
# this updates each .ipynb's cells (keeping cell ids, and no outputs); tests/test_notebooks.py checks the pairs.
notebooks: $(STAMP)
	$(VENV)/bin/jupytext --update --to ipynb colab/[0-9]*.py
