# Two commands: `make demo` and `make test`. Each builds .venv from nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
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
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else f"Python >= 3.11 is required, found {v.major}.{v.minor} at {sys.executable}")'
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

# The CPU scaling-law demonstration: every run of configs/grids/small.py (about 50 min on 2
# cores; rerunning skips finished runs), then the fits and the plots, in runs/grid-demo/.
# alpha is tied to beta (as Muennighoff et al.): three model sizes cannot pin both exponents.
.PHONY: grid-demo
grid-demo: $(STAMP)
	$(BIN)/dvar sweep run --grid=small --workdir=runs/grid-demo
	$(BIN)/dvar fit --results=runs/grid-demo/results.jsonl --plots=runs/grid-demo/plots \
		--tie_alpha_beta > runs/grid-demo/fits.txt
	cat runs/grid-demo/fits.txt
