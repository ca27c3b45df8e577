# Two commands a new user needs (see README): `make demo` and `make test`.
# Both create the environment in .venv/ with a Python >= 3.12 found by scripts/find-python.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.geocmid-installed
DEMO_DIR ?= demo_out

.PHONY: demo test venv bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@PYBIN=$$(scripts/find-python) || exit 1; \
	if [ ! -x $(PY) ]; then echo "creating $(VENV) with $$PYBIN"; "$$PYBIN" -m venv $(VENV) || exit 1; fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" sh scripts/demo.sh $(DEMO_DIR)

# The three benchmarks print our figure beside its anchor (see BENCHMARKS.md); about 10 min on 2 cores.
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) bench/loader.py
	OMP_NUM_THREADS=2 $(PY) bench/pretrain.py
	OMP_NUM_THREADS=1 $(PY) -u bench/segment.py --repeats 3

lint: $(STAMP)
	$(VENV)/bin/ruff format --check geocmid cli bench tests scripts sample_data
	$(VENV)/bin/ruff check geocmid cli bench tests scripts sample_data
	$(VENV)/bin/mypy

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
