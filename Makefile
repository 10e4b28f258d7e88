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

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[notebooks,dev]"
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
