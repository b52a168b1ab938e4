# Two entry points for a fresh machine (see README "Quick start"):
#   make demo   - create .venv, install the package, pre-train the tiny model on the bundled real
#                 audio for a few CPU minutes, then linear-probe it against random encoders
#                 (ARGS=--short: a few steps only, as CI runs it)
#   make test   - create .venv, install the package with its test extra, run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test test-fast clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# The test extra adds pytest, pytest-xdist, scikit-learn and libtpu (the TPU ahead-of-time
# compilation test).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m aasp_jax.quickstart $(ARGS)

# Two workers, whole files to each (module fixtures such as the ViT-B TPU compile run once).
test: $(VENV)/.installed-test
	$(PY) -m pytest tests -n 2 --dist loadfile

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest tests -n 2 --dist loadfile -m 'not slow'

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
