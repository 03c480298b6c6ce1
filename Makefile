# Set-up and entry points. Everything runs in .venv, created on first use with the CPU build of
# torch 2.13.0 pinned (any other torch request would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint typecheck bench gpu-check constraints clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -c constraints.txt "$(TORCH_PIN)" -e ".[test]"
	touch $(STAMP)

## make run: the main job - trainval fit on the embedded digits data (runs/digits/)
run: $(STAMP)
	$(VENV)/bin/trainval fit run.overwrite=true

## make test: format and type checks, then the whole test suite on 2 worker processes (about 10 minutes on 2 cores)
test: $(STAMP)
	$(PY) -m ruff format --check src
	$(PY) -m mypy
	$(PY) -m pytest -q -n 2 --dist worksteal

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

lint: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt ruff
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/trainval lint src examples

## make typecheck: mypy on src/trainval, configured in pyproject.toml [tool.mypy]
typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt "$(TORCH_PIN)" -e ".[bench]"
	$(PY) benchmarks/compare.py

## make constraints: pin what .venv holds now (after upgrading a package on purpose and passing make test)
constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^trainval' \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
