# Two entry points for a fresh machine (see README "Quick start"):
#   make test   - create .venv, install the package with its test extra, run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv test test-fast clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest tests

test-fast: venv
	$(PY) -m pytest tests -m 'not slow'

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
