# `make test` / `make demo` / `make bench` set up .venv with pinned
# dependencies on first use, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): requirements.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# test-only (tests/test_libraries.py, Griffin): its metadata asks for
	# numpy<2.4 and absl-py<2, but the JAX code runs with the pins above
	$(PY) -m pip install --quiet --no-deps recurrentgemma==1.0.1
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 tests scanagram adapters README.md

demo: $(STAMP)
	$(PY) examples/transformer.py

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) out
