# Two commands do everything on a fresh machine:
#   make reproduce   # trains every variant and regenerates every figure and table into results/$(SCALE)
#   make test        # runs the test suite
# Both create .venv on first use (a minute or two) and reuse it afterwards.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sosvae-installed
SCALE  ?= cpu
ARGS   ?=

.PHONY: venv test reproduce bench clean-venv

venv: $(STAMP)

# facenet-pytorch: the face detector of the CelebA sample-quality metrics (its weights ship in the package); its
# metadata pins an old torch and numpy, so it is installed without dependencies (the ones it uses are here).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[notebooks,dev]"
	$(PY) -m pip install --no-deps facenet-pytorch==2.6.0
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

reproduce: $(STAMP)
	$(PY) -m sosvae_lib.reproduce --scale $(SCALE) $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_distributions.py
	$(PY) benchmarks/bench_train.py

clean-venv:
	rm -rf $(VENV)
