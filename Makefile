# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install kdkit + the FAS plugin, run the demo recipe
#   make test   same set-up, then the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo digits test lint clean

$(STAMP): pyproject.toml plugins/fas/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,export]' -e plugins/fas
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/kdkit run recipes/kdfas-demo.yaml

digits: install
	$(BIN)/kdkit run recipes/digits-kd.yaml

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
