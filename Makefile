# Set-up and everyday commands. `make run` and `make test` work from a fresh clone with no model hub.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test install install-test bench bench-cost clean

# torch is pinned and installed first: anything that depends on it would otherwise pull a CUDA build.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e '.[test]'
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }
	@command -v valgrind >/dev/null || { apt-get update -q && apt-get install -y -q valgrind; }
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/quill serve --host $(HOST) --port $(PORT)

test: install-test
	$(PY) -m pytest -q

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PIP) install -q -e '.[test,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	$(PY) bench/decode.py

# Counts instructions under callgrind (valgrind, installed with the test extras): about two hours of a core
# per precision with valgrind 3.24, many more with 3.19 (docs/cost.md); resumable.
bench-cost: $(VENV)/.installed-bench
	$(PY) bench/cost.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
