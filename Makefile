# Two commands: `make demo` and `make test`. Each builds .venv from nothing.
# Python 3.12 or 3.13 (jax 0.12 needs >= 3.12). pyenv puts a shim on PATH for every version it
# has, and a shim fails for a version that is not selected, so each candidate is run, not just
# found; the path printed is the real interpreter.
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)
PYTHON_CANDIDATES := python3.12 python3.13 $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12) \
	$(wildcard $(PYENV_ROOT)/versions/3.13*/bin/python3.13) python3
PYTHON ?= $(shell for p in $(PYTHON_CANDIDATES); do \
	$$p -c 'import sys; assert (3, 12) <= sys.version_info[:2] <= (3, 13); print(sys.executable)' \
	2>/dev/null && break; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `eval` (lm-eval, no torch) so the lm-eval adapter is tested. libtpu ships for x86-64 Linux
# only: there the `tpu` extra is installed so the tests can compile for a TPU topology ahead
# of time (`dvar plan-memory`, the Pallas kernels).
comma := ,
EXTRAS := dev$(comma)eval$(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),$(comma)tpu)

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): setup.py
	@test -n "$(PYTHON)" || { echo "Python 3.12 or 3.13 is required (jax 0.12 needs >= 3.12), and none was found: tried $(PYTHON_CANDIDATES). Install one (e.g. pyenv install 3.12) or pass PYTHON=/path/to/python3.12." >&2; exit 1; }
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 12) else f"Python >= 3.12 is required (jax 0.12), found {v.major}.{v.minor} at {sys.executable}")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dvar demo --workdir=runs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs

# The CPU scaling-law demonstration: every run of configs/grids/small.py (80 runs, at most 90 min
# on 2 cores; rerunning skips finished runs), then the fits with bootstrap intervals and the
# plots, in runs/grid-demo/. The sweep's own estimate is printed first.
# alpha is tied to beta (as Muennighoff et al.): four CPU sizes cannot pin both exponents.
.PHONY: grid-demo
grid-demo: $(STAMP)
	$(BIN)/dvar sweep list --grid=small | tail -n 2
	$(BIN)/dvar sweep run --grid=small --workdir=runs/grid-demo
	$(BIN)/dvar fit --results=runs/grid-demo/results.jsonl --plots=runs/grid-demo/plots \
		--tie_alpha_beta --bootstrap=100 > runs/grid-demo/fits.txt
	cat runs/grid-demo/fits.txt
