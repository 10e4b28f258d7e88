# Two commands do everything on a fresh machine:
#   make reproduce   # trains every variant and regenerates every figure and table into results/$(SCALE)
#   make test        # runs the test suite
# Both create .venv on first use (a minute or two) and reuse it afterwards.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SCALE  ?= cpu
ARGS   ?=

.PHONY: venv test reproduce bench clean-venv

# The install stamp is named after a hash of pyproject.toml and of the install recipe (the lines between the two
# "install recipe" markers), never after file times: a copied checkout (every mtime new) keeps its .venv and runs
# no pip at all, so `make test` works offline on a prepared .venv; a changed dependency or recipe installs again.
INSTALL_KEY := $(shell { sed -n '/^. install recipe: begin/,/^. install recipe: end/p' Makefile; cat pyproject.toml; } \
                 | { sha256sum 2>/dev/null || cksum; } | cut -c1-16)
STAMP  := $(VENV)/.sosvae-installed-$(INSTALL_KEY)

venv: $(STAMP)

# install recipe: begin
# pip is upgraded only when it is too old for an editable install from pyproject.toml (PEP 660, pip 21.3), so a
# working venv never needs the network for it. facenet-pytorch: the face detector of the CelebA sample-quality
# metrics (its weights ship in the package); its metadata pins an old torch and numpy, so it is installed without
# dependencies (the ones it uses are here).
$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import pip, sys; sys.exit(tuple(map(int, pip.__version__.split('.')[:2])) < (21, 3))" \
	    || $(PY) -m pip install "pip>=21.3"
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[notebooks,dev]"
	$(PY) -m pip install --no-deps facenet-pytorch==2.6.0
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	rm -f $(VENV)/.sosvae-installed*
	touch $(STAMP)
# install recipe: end

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

# not echoed: the command prints its own first line (the plan), or one line saying why it cannot start
reproduce: $(STAMP)
	@$(PY) -m sosvae_lib.reproduce --scale $(SCALE) $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_distributions.py
	$(PY) benchmarks/bench_train.py

clean-venv:
	rm -rf $(VENV)
