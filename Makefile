# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install kdkit + the FAS plugin, run the demo recipe
#   make test   same set-up, then the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo digits test lint clean figures

# facenet-pytorch brings MTCNN's weights (docs/fas.md, "Face detection"): its metadata pins an old
# torch and kdkit reads only its weight files, so it is installed without its dependencies.
$(STAMP): pyproject.toml plugins/fas/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,export,trackers,slurm]' -e plugins/fas
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt facenet-pytorch==2.6.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/kdkit run recipes/kdfas-demo.yaml

digits: install
	$(BIN)/kdkit run recipes/digits-kd.yaml

# pytest-xdist: one worker per core (at most 8); the tests set torch to one thread each.
test: install
	$(BIN)/python -m pytest -n auto --maxprocesses 8

# Redraw docs/img/architecture.png from the code; copy the demo's ROC/DET plot and ablation chart
# from a finished run and ablation folder, and draw the bridges chart from the bridge ablations
# (each skipped, with a note, where its source does not exist).
FIGURES_RUN ?= runs/kdfas-demo
FIGURES_ABLATION ?= runs/ablation-kdfas-demo
FIGURES_BRIDGES ?= runs/bridges
figures: install
	$(BIN)/python docs/figures.py --run $(FIGURES_RUN) --ablation $(FIGURES_ABLATION) --bridges $(FIGURES_BRIDGES)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
