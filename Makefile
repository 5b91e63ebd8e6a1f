# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU torch: pip finds the local wheel; an unpinned torch would pull the CUDA stack.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check
DATA_DIR ?= $(abspath ../shared/data)

.PHONY: demo test lint install clean-demo

$(BIN)/scproto-scale: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP_INSTALL) -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	@$(BIN)/python -c "import scproto_scale, torch; assert torch.__version__.startswith('2.13.0')"
	@touch $@

install: $(BIN)/scproto-scale

data/demo_atlas.h5ad: | install
	$(BIN)/scproto-scale simulate --out $@ --n-cells 10000 --n-genes 2000 --n-studies 4 --seed 0

demo: install data/demo_atlas.h5ad
	$(BIN)/scproto-scale run configs/demo.yaml --out runs/demo

test: install
	SCPROTO_DATA_DIR=$${SCPROTO_DATA_DIR:-$(DATA_DIR)} $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check scproto_scale pipelines tests benchmarks

clean-demo:
	rm -rf runs/demo data/demo_atlas.h5ad
