# Two entry points for a fresh machine (see README "Quick start"):
#   make demo   - create .venv, install the package, pre-train the tiny model on the bundled real
#                 audio for a few CPU minutes, then linear-probe it against random encoders
#                 (ARGS=--short: a few steps only, as CI runs it)
#   make test   - create .venv, install the package with its test extra, run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test test-fast timm-env clean

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

# timm's own VisionTransformer for tests/test_export_timm.py, in an environment of its own: timm
# needs torchvision, whose PyPI wheels are CUDA builds that cannot load next to the test extra's CPU
# torch (and `pip install timm` there would replace it). ~5.5 GB, ~2 min; the test finds it.
timm-env: .venv-timm/.installed

.venv-timm/.installed:
	$(PYTHON) -m venv .venv-timm
	.venv-timm/bin/python -m pip install --quiet timm==1.0.31 torchvision==0.29.1 numpy safetensors
	touch $@

clean:
	rm -rf $(VENV) .venv-timm *.egg-info .pytest_cache
