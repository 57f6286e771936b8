# The README's two commands: `make demo` (`dvc repro`: the default pipeline, FFN on fmnist_lt, from
# data to ONNX, tracked in MLflow) and `make test`. Both create .venv when missing and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo train test data install

$(BIN)/ltrepro: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(BIN)/ltrepro

install: $(BIN)/ltrepro

data: install
	$(BIN)/ltrepro data prepare

demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

train: data
	$(BIN)/ltrepro train $(ARGS)

# One pytest worker per CPU this process may use (psutil's count, xdist's `auto`, can be the host's).
test: data
	$(BIN)/python -m pytest -q --durations=25 -n $$($(BIN)/python -c "import os; print(len(os.sched_getaffinity(0)))") $(ARGS)
