# Two commands do all set-up: `make demo` and `make test` (each creates or reuses .venv).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mpqkit-installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mpqkit demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf results .pytest_cache .hypothesis
