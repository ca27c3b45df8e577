# Two commands a new user needs (see README): `make demo` and `make test`.
# Both create the environment in .venv/ with a Python >= 3.12 found by scripts/find-python.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.geocmid-installed
DEMO_DIR ?= demo_out

.PHONY: demo test venv bench clean

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

bench: $(STAMP)
	$(PY) bench/loader.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
