# The README's two commands: `make demo` (train + evaluate the CE baseline on fmnist_lt, tracked in
# MLflow) and `make test`. Both create .venv when it is missing and install the package first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test data install clean-runs

$(BIN)/ltrepro: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(BIN)/ltrepro

install: $(BIN)/ltrepro

data: install
	$(BIN)/ltrepro data prepare

demo: data
	$(BIN)/ltrepro train $(ARGS)

test: data
	$(BIN)/python -m pytest -q $(ARGS)
